"""The server: hosts one span of a model's blocks in the swarm."""
