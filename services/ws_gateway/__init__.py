"""The WebSocket gateway: authenticates browsers, replays and relays task progress."""
