"""Live event streams: the hub (one bounded ring) and the SSE / WebSocket wire formats."""
