"""Built-in transport plugin: hivemind (DHT + libp2p)."""

from bloombee_core.hookspecs import hookimpl
from bloombee_hivemind.transport import HivemindTransport

__all__ = ["HivemindTransport"]


@hookimpl
def bloombee_register_transports() -> list[type]:
    return [HivemindTransport]
