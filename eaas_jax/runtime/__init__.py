"""Runtime: expert servers (and, next, the attention client step and registry)."""
