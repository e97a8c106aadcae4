"""The requests the API accepts (the OpenAI fields it supports), and the response bodies it writes."""

from __future__ import annotations

import secrets
import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from bloombee_core.api.engine import TOP_LOGPROBS, Generation, Outcome, Piece, invalid

MAX_STOPS = 16


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")  # fields of newer clients that change nothing here

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None

    def check(self) -> None:
        """Refuse what this server would otherwise silently ignore."""
        if self.n != 1:
            raise invalid("only n=1 is supported", "n")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise invalid(f"{name} is not supported", name)
        if self.logit_bias:
            raise invalid("logit_bias is not supported", "logit_bias")
        stops = self.stops()
        if len(stops) > MAX_STOPS or not all(stops):
            raise invalid(f"stop takes up to {MAX_STOPS} non-empty strings", "stop")

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))

    def generation(self, prompt_ids: list[int], max_tokens: int, logprobs: int | None) -> Generation:
        return Generation(
            prompt_ids, max_tokens, self.temperature, self.top_p, self.seed, self.stops(), logprobs
        )


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None

    def as_template_input(self) -> dict[str, str]:
        content = self.content
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        role = "system" if self.role == "developer" else self.role
        return {"role": role, "content": content or ""}


class ChatRequest(_Request):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=TOP_LOGPROBS)
    tools: list[Any] | None = None
    response_format: dict[str, Any] | None = None

    def check(self) -> None:
        super().check()
        if self.tools:
            raise invalid("tools are not supported", "tools")
        if self.response_format and self.response_format.get("type") not in (None, "text"):
            raise invalid("only the text response_format is supported", "response_format")

    def wanted_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def new_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(_Request):
    prompt: str | list[str] | list[int]
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default for completions
    logprobs: int | None = Field(None, ge=0, le=TOP_LOGPROBS)
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    def check(self) -> None:
        super().check()
        if self.echo:
            raise invalid("echo is not supported", "echo")
        if self.best_of not in (None, 1):
            raise invalid("best_of is not supported", "best_of")
        if self.suffix:
            raise invalid("suffix is not supported", "suffix")
        if isinstance(self.prompt, list) and self.prompt and isinstance(self.prompt[0], str):
            if len(self.prompt) != 1:
                raise invalid("one prompt per request: send several requests at once instead", "prompt")

    def new_tokens(self) -> int | None:
        return self.max_tokens


def parse(model: type[_Request], body: Any) -> Any:
    """A validated request, or a 400 naming the first field at fault."""
    if not isinstance(body, dict):
        raise invalid("the request body must be a JSON object")
    try:
        request = model.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or None
        raise invalid(f"{where}: {first['msg']}" if where else first["msg"], where) from None
    request.check()
    return request


def new_id(kind: str) -> str:
    return f"{kind}-{secrets.token_hex(12)}"


def usage(outcome: Outcome) -> dict[str, int]:
    total = outcome.prompt_tokens + outcome.completion_tokens
    return {
        "prompt_tokens": outcome.prompt_tokens,
        "completion_tokens": outcome.completion_tokens,
        "total_tokens": total,
    }


def extension(outcome: Outcome) -> dict[str, Any]:
    """BloomBee's fields beside OpenAI's (clients ignore them): the route and how it was decoded."""
    return {"route": outcome.route, "decoding": outcome.decoding}


def chat_logprobs(pieces: list[Piece]) -> dict[str, Any]:
    def entry(token: str, logprob: float) -> dict[str, Any]:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode())}

    content = [
        {**entry(e["token"], e["logprob"]), "top_logprobs": [entry(t, lp) for t, lp in e["top"]]}
        for piece in pieces
        for e in piece.logprobs
    ]
    return {"content": content, "refusal": None}


def completion_logprobs(pieces: list[Piece], offset: int = 0) -> dict[str, Any]:
    entries = [e for piece in pieces for e in piece.logprobs]
    offsets, at = [], offset
    for e in entries:
        offsets.append(at)
        at += len(e["token"])
    return {
        "tokens": [e["token"] for e in entries],
        "token_logprobs": [e["logprob"] for e in entries],
        "top_logprobs": [dict(e["top"]) for e in entries],
        "text_offset": offsets,
    }


def envelope(kind: str, rid: str, model: str, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {
        "id": rid,
        "object": kind,
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        **extra,
    }
