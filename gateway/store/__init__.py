"""Conversation stores: where history lives outside the process."""

from .base import Conversation, ConversationStore, StoreError, open_store

__all__ = ["Conversation", "ConversationStore", "StoreError", "open_store"]
