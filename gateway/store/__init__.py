"""Conversation stores: where history lives outside the process."""

from .base import ConversationStore, StoreError, StoredConversation, open_store

__all__ = ["ConversationStore", "StoreError", "StoredConversation", "open_store"]
