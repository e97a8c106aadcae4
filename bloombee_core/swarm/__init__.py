"""What clients and servers share: the wire protocol, DHT records, routing, the event-loop thread."""
