"""Every check a request meets before the server allocates memory or computes: sizes, shapes, dtypes
and values from the network, against the hosted span and the server's :class:`Limits`.

Pure functions, no I/O: each raises :class:`RequestError` with a message that names what was wrong.
"""

from __future__ import annotations

from collections.abc import Container, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from bloombee_core.family import span_problem
from bloombee_core.model.tree import valid_keep, valid_parents
from bloombee_core.swarm.wire import TensorMeta

if TYPE_CHECKING:
    from bloombee_core.model import BlockSpan

MAX_POSITION = 1 << 20  # position ids must lie below this
MAX_STEP = 1 << 31
# the tensors each kind of request carries, besides the family's per-layer inputs (and an optional mask)
# a step may also carry a token tree ("tree": parent indices) and the rows to keep of the step before it
TREE_TENSORS = ("tree", "keep")
REQUIRED = {
    "forward": ("hidden", "position_ids"),
    "backward": ("hidden", "grad", "position_ids"),
    "step": ("hidden", "position_ids"),
}


@dataclass
class Limits:
    max_batch: int = 64
    max_length: int = 8192  # tokens a session may hold
    max_tokens: int = 16384  # batch * tokens in one request
    max_tensor_bytes: int = 256 << 20
    max_sessions: int = 256
    max_pending_steps: int = 8
    max_tree_tokens: int = 256  # tokens of one token-tree step (their ancestry is tokens x tokens)


class RequestError(Exception):
    """A request the server refuses; ``code`` is ``bad_request`` or ``busy``."""

    def __init__(self, message: str, code: str = "bad_request") -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class OpenRequest:
    session_id: str
    batch: int
    max_length: int
    trees: bool = False  # token trees will be verified in this session (speculative decoding)
    group: str | None = None  # micro-batches of one client's pipeline: never batched with each other


@dataclass(frozen=True)
class SpanChecks:
    """What a request is checked against: the hosted span's blocks and shapes, and the limits."""

    start: int
    end: int
    cuts: frozenset[int]
    hidden_size: int
    per_layer_sizes: Mapping[
        str, int
    ]  # per-layer inputs the family needs from the client: name -> feature size
    num_blocks: int  # blocks of the whole model
    limits: Limits

    def blocks(self, header: Mapping[str, Any]) -> tuple[int, int]:
        """The block range ``header`` asks for; it must be one this server can run."""
        start, end = header.get("start"), header.get("end")
        if not all(isinstance(x, int) and not isinstance(x, bool) for x in (start, end)):
            raise RequestError(f"'start' and 'end' must be integers, got {start!r} and {end!r}")
        problem = span_problem(start, end, (self.start, self.end), self.cuts, "this server")
        if problem:
            raise RequestError(problem)
        return start, end

    def metas(
        self,
        metas: list[TensorMeta],
        kind: str,
        view: BlockSpan,
        batch: int | None = None,
        max_mask: int = 0,
    ) -> dict[str, TensorMeta]:
        """Check the tensor descriptions of a ``kind`` request for blocks ``view`` before any payload is read."""
        by_name = {m.name: m for m in metas}
        required = (*REQUIRED[kind], *self.per_layer_sizes)
        allowed = set(required) | {"attention_mask"} | (set(TREE_TENSORS) if kind == "step" else {"prompts"})
        if set(by_name) - allowed or len(by_name) != len(metas):
            raise RequestError(f"unexpected tensors {sorted(by_name)}; expected {sorted(allowed)}")
        for name in required:
            if name not in by_name:
                raise RequestError(f"missing tensor {name!r}")
        hidden = by_name["hidden"]
        if len(hidden.shape) != 3 or hidden.shape[2] != self.hidden_size:
            raise RequestError(
                f"hidden must be [batch, tokens, {self.hidden_size}], got {list(hidden.shape)}"
            )
        b, t = hidden.shape[:2]
        if not hidden.dtype.is_floating_point:
            raise RequestError(f"hidden must be floating point, got {hidden.dtype}")
        if batch is not None and b != batch:
            raise RequestError(f"this session was opened for batch size {batch}, got hidden of batch {b}")
        if not 1 <= b <= self.limits.max_batch or t < 1 or b * t > self.limits.max_tokens:
            raise RequestError(
                f"hidden of shape {list(hidden.shape)} is outside the limits (batch 1..{self.limits.max_batch}, "
                f"tokens >= 1, batch*tokens <= {self.limits.max_tokens})"
            )
        for name in ("grad", "output"):
            if name in by_name and by_name[name].shape != hidden.shape:
                raise RequestError(f"{name} must have the shape of hidden {list(hidden.shape)}")
        prompts = by_name.get("prompts")
        if prompts is not None:
            blocks = view.end - view.start
            shape = prompts.shape
            if (
                not prompts.dtype.is_floating_point
                or len(shape) != 4
                or shape[0] not in (1, b)
                or shape[1] != blocks
                or not 1 <= shape[2] <= t
                or shape[3] != self.hidden_size
            ):
                raise RequestError(
                    f"prompts must be floating point [{b} or 1, {blocks}, prefix <= {t}, {self.hidden_size}], "
                    f"got {prompts.dtype} {list(shape)}"
                )
        pos = by_name["position_ids"]
        if pos.dtype != torch.int64 or pos.shape != (b, t):
            raise RequestError(f"position_ids must be int64 [{b}, {t}], got {pos.dtype} {list(pos.shape)}")
        mask = by_name.get("attention_mask")
        if mask is not None:
            limit = max_mask or self.limits.max_length
            if (
                mask.dtype != torch.int64
                or len(mask.shape) != 2
                or mask.shape[0] != b
                or not t <= mask.shape[1] <= limit
            ):
                raise RequestError(
                    f"attention_mask must be int64 [{b}, past+{t}] with at most {limit} columns, "
                    f"got {mask.dtype} {list(mask.shape)}"
                )
        tree, keep = by_name.get("tree"), by_name.get("keep")
        if tree is not None and (
            tree.dtype != torch.int64 or tree.shape != (b, t) or t > self.limits.max_tree_tokens
        ):
            raise RequestError(
                f"tree must be int64 [{b}, {t}] parent indices with at most {self.limits.max_tree_tokens} tokens, "
                f"got {tree.dtype} {list(tree.shape)}"
            )
        if keep is not None and (
            keep.dtype != torch.int64
            or len(keep.shape) != 2
            or keep.shape[0] != b
            or keep.shape[1] > self.limits.max_tree_tokens
        ):
            raise RequestError(
                f"keep must be int64 [{b}, kept] with at most {self.limits.max_tree_tokens} rows kept, "
                f"got {keep.dtype} {list(keep.shape)}"
            )
        for name, size in self.per_layer_sizes.items():
            # this span's layers first, then (to be pushed on) those of later spans, never past the model
            given, first, most = by_name[name], view.end - view.start, self.num_blocks - view.start
            if (
                not given.dtype.is_floating_point
                or len(given.shape) != 4
                or given.shape[:2] != (b, t)
                or given.shape[3] != size
                or not first <= given.shape[2] <= most
            ):
                raise RequestError(
                    f"per-layer input {name!r} must be floating point [{b}, {t}, {first}..{most} layers, {size}] "
                    f"for blocks {view.start}:{view.end}, got {given.dtype} {list(given.shape)}"
                )
        return by_name


def check_values(tensors: Mapping[str, torch.Tensor]) -> None:
    """Checks on what was read: a mask of 0s and 1s, position ids in range."""
    mask = tensors.get("attention_mask")
    if mask is not None and not bool(((mask == 0) | (mask == 1)).all()):
        raise RequestError("attention_mask may only hold 0 (padding) and 1 (token)")
    pos = tensors["position_ids"]
    if pos.numel() and (int(pos.min()) < 0 or int(pos.max()) >= MAX_POSITION):
        raise RequestError(f"position_ids must lie in [0, 2**20), got {int(pos.min())}..{int(pos.max())}")
    tree = tensors.get("tree")
    if tree is not None and not valid_parents(tree):
        raise RequestError(
            "tree must give each token a parent before it (an earlier index) or -1 (the prefix)"
        )


def open_request(header: Mapping[str, Any], limits: Limits, open_ids: Container[str]) -> OpenRequest:
    """The session an ``open`` header asks for (its blocks and cache room are checked apart)."""
    sid, batch, max_length = header.get("session_id"), header.get("batch_size"), header.get("max_length")
    if not isinstance(sid, str) or not 8 <= len(sid) <= 64:
        raise RequestError(f"session_id must be a string of 8..64 characters, got {sid!r:.80}")
    if sid in open_ids:
        raise RequestError(f"session {sid} is already open on this server")
    if not isinstance(batch, int) or not 1 <= batch <= limits.max_batch:
        raise RequestError(f"batch_size must be an integer in 1..{limits.max_batch}, got {batch!r}")
    if not isinstance(max_length, int) or not 1 <= max_length <= limits.max_length:
        raise RequestError(f"max_length must be an integer in 1..{limits.max_length}, got {max_length!r}")
    trees = header.get("trees", False)
    if not isinstance(trees, bool):
        raise RequestError(f"'trees' must be true or false, got {trees!r:.40}")
    group = header.get("group")
    if group is not None and (not isinstance(group, str) or not 1 <= len(group) <= 64):
        raise RequestError(f"'group' must be a string of 1..64 characters, got {group!r:.80}")
    return OpenRequest(sid, batch, max_length, trees, group)


def check_session_count(open_sessions: int, limits: Limits) -> None:
    if open_sessions >= limits.max_sessions:
        raise RequestError(f"busy: {open_sessions} sessions are open, the limit", "busy")


def check_cache_room(request: OpenRequest, need: int, used: int, budget: int) -> None:
    """A session reserves its worst-case KV cache when it opens: no room is ``busy``, not a crash later."""
    if used + need > budget:
        raise RequestError(
            f"busy: a session of batch {request.batch} x {request.max_length} tokens needs {need} bytes of KV cache, "
            f"{budget - used} of {budget} are free; try another server or later",
            "busy",
        )


def check_step_fits(past: int, tensors: Mapping[str, torch.Tensor], max_length: int) -> None:
    """A step's new tokens must fit the session's cache, and its mask cover past and new tokens."""
    mask, length = tensors.get("attention_mask"), tensors["hidden"].shape[1]
    if past + length > max_length:
        raise RequestError(
            f"the session would hold {past + length} tokens; it was opened for max_length {max_length}"
        )
    if mask is not None and mask.shape[1] != past + length:
        raise RequestError(
            f"attention_mask must cover past + new tokens = {past + length} columns, got {mask.shape[1]}"
        )


def check_tree_step(tensors: Mapping[str, torch.Tensor], trees: bool, last_tokens: int) -> None:
    """A token tree, or rows to keep, only in a session opened for trees; ``keep`` picks, for each
    sequence, rows of the previous step (``last_tokens`` tokens)."""
    if not trees and any(name in tensors for name in TREE_TENSORS):
        raise RequestError("this session was not opened for token trees (open it with trees = true)")
    keep = tensors.get("keep")
    if keep is not None and (keep.shape[1] > last_tokens or not valid_keep(keep, last_tokens)):
        raise RequestError(
            f"keep must pick, per sequence, rows of the previous step's {last_tokens} tokens, "
            f"got shape {list(keep.shape)}"
        )


def check_pending(step: int, next_step: int, pending: int, limits: Limits) -> None:
    """A step from the future waits for the ones before it, but only so many may wait."""
    if pending >= limits.max_pending_steps:
        raise RequestError(f"step {step} arrived while waiting for step {next_step}")


def push_target(value: object) -> tuple[str, str] | None:
    """Where a session's outputs go: ``None`` or (peer, that server's session id)."""
    if value is None:
        return None
    if (
        not isinstance(value, dict)
        or not isinstance(value.get("peer"), str)
        or not isinstance(value.get("session_id"), str)
    ):
        raise RequestError(
            f"'push' must be null or a map with string 'peer' and 'session_id', got {value!r:.120}"
        )
    return value["peer"], value["session_id"]


def upstream_peer(value: object) -> str | None:
    """The peer allowed to push into a session: ``None`` (nobody) or a peer id."""
    if value is not None and (not isinstance(value, str) or not 0 < len(value) <= 128):
        raise RequestError(f"'upstream' must be null or a peer id, got {value!r:.80}")
    return value


def step_number(header: Mapping[str, Any]) -> int:
    step = header.get("step")
    if not isinstance(step, int) or isinstance(step, bool) or not 0 <= step < MAX_STEP:
        raise RequestError(f"'step' must be a non-negative integer, got {step!r:.40}")
    return step
