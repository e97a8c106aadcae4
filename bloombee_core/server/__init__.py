"""The server: hosts one span of a model's blocks in the swarm.

* :mod:`~bloombee_core.server.process` — the process entry: load the span, build and run the server.
* :mod:`~bloombee_core.server.lifecycle` — :class:`Server`: start, stop, DHT records, what requests share.
* :mod:`~bloombee_core.server.dispatch` — the stream handler: routes each request, turns errors into replies.
* :mod:`~bloombee_core.server.checks` — every check on what comes from the network, and the limits.
* :mod:`~bloombee_core.server.sessions` — inference sessions: the step loop and the push to the next server.
* :mod:`~bloombee_core.server.compute` — forward, backward and inference steps on the span; the compute thread.
* :mod:`~bloombee_core.server.throughput` — the throughput probe run at start.
"""
