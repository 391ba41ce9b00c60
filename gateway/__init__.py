"""novagate I/O layer: ASGI app, session actor, model transports, conversation stores, CLI."""
