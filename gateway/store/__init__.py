"""Conversation stores: where history lives outside the process."""

from .base import ConversationGone, ConversationStore, StoreError, StoredConversation, open_store

__all__ = ["ConversationGone", "ConversationStore", "StoreError", "StoredConversation", "open_store"]
