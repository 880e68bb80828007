"""The controller: registry of workers (heartbeats, expiry), dispatch, and the stream proxy."""
