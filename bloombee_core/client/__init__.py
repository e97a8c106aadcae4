"""The client: the public distributed model, and its side of the swarm (routing, calls, sessions)."""

from bloombee_core.client.model import AutoDistributedModelForCausalLM, DistributedModelForCausalLM

__all__ = ["AutoDistributedModelForCausalLM", "DistributedModelForCausalLM"]
