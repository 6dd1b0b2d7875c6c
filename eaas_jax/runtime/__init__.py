"""Runtime: deployments, expert servers, the client's remote experts, server
processes (local or found through the etcd registry)."""
