"""An OpenAI-compatible HTTP API and a chat page in front of the swarm (``bloombee api``, the ``api``
job kind). :func:`run_api` serves it until interrupted; :mod:`~bloombee_core.api.app` has the routes,
:mod:`~bloombee_core.api.engine` what one request runs."""

from __future__ import annotations

from bloombee_core.api.settings import ApiSettings

__all__ = ["ApiSettings"]
