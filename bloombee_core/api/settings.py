"""The ``[api]`` section of the settings: where the OpenAI-compatible API listens and what it allows."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class ApiSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    host: str = Field(
        "127.0.0.1", description="Address the HTTP API listens on (loopback: this machine only)."
    )
    port: int = Field(8000, ge=0, le=65535, description="TCP port of the HTTP API (0: any free port).")
    api_key: str | None = Field(
        None, description="Key clients must send as 'Authorization: Bearer KEY'; none: no key needed."
    )
    name: str | None = Field(None, description="Model id the API serves under; default: the model as given.")
    max_tokens: int = Field(512, ge=1, description="New tokens of a request that does not set max_tokens.")
    max_concurrent: int = Field(8, ge=1, description="Generations at once; more requests wait their turn.")
