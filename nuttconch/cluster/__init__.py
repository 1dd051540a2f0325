"""Several nodes sharing one name space: the Redis adapter and the shared registry."""
