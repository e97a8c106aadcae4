"""A server's memory budget: how its memory splits between what it already uses, the weights it keeps
resident, the streamed weights in flight, the KV caches of its sessions and a forward's working memory.

The memory is the process's resident set (RSS) on a CPU server and allocated device memory on a GPU
one. Pure arithmetic, measured inputs: :func:`plan_memory` turns a budget into the byte counts the
placer (weights) and the session reservations (KV cache) then keep to.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from bloombee_core.errors import ConfigError

if TYPE_CHECKING:
    import torch
    from transformers import PretrainedConfig

MIB = 1 << 20
SLACK = 32 * MIB  # allocator caching and fragmentation, thread stacks, buffers of the transport
KV_SHARE = 4  # without a configured cache size, a quarter of what is free goes to KV caches
WORKING_SHARE = 4  # a forward's working memory takes at most a quarter (requests get smaller instead)
MIN_TOKENS = 256
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8  # glibc mallopt options


@dataclass(frozen=True)
class MemoryPlan:
    budget: int
    base: int  # in use before the span loads (interpreter, libraries; nothing on a fresh GPU)
    working: int  # reserve for the largest forward the server accepts
    staging: int  # streamed weights in memory at once (the unit computing and the next one)
    weights: int  # weight bytes that may stay resident
    kv: int  # KV-cache bytes sessions may reserve
    max_tokens: int  # batch * tokens of one request, so that ``working`` holds

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}


def working_bytes(config: PretrainedConfig, tokens: int, itemsize: int) -> int:
    """A forward's transient memory for ``tokens`` tokens (batch x new tokens): hidden states, the
    attention projections and the MLP's intermediate activations, a few of each alive at once."""
    hidden = config.hidden_size
    inner = getattr(config, "intermediate_size", None) or getattr(config, "ffn_hidden_size", None)
    inner = (inner or 4 * hidden) * (getattr(config, "num_experts_per_tok", None) or 1)
    return tokens * itemsize * (12 * hidden + 6 * inner) + SLACK


def kv_bytes_per_token(
    family: Any, config: PretrainedConfig, start: int, end: int, dtype: torch.dtype
) -> int:
    """KV-cache bytes one token of one sequence takes in blocks ``start:end`` (sliding windows ignored)."""
    layers = [i for i in range(start, end) if family.owns_kv(config, i)]
    return sum(2 * math.prod(family.kv_shape(config, i)) * dtype.itemsize for i in layers)


def plan_memory(
    budget: int,
    base: int,
    total_weights: int,
    largest_unit: int,
    config: PretrainedConfig,
    itemsize: int,
    max_tokens: int,
    cache_bytes: int | None,
    default_cache: int,
) -> MemoryPlan:
    """Split ``budget`` bytes: first what is in use, the working reserve and the staging of two streamed
    units, then KV caches (``cache_bytes`` if set, else a quarter of what is left, at most
    ``default_cache``), then resident weights; weights that do not fit stream from lower tiers.

    ``max_tokens`` shrinks (by halves, down to 256) while the working reserve would take more than a
    quarter of the budget left after ``base``.

    :raises ConfigError: keyed ``server.memory_budget``, when not even the smallest plan fits.
    """
    tokens = max_tokens
    while tokens > MIN_TOKENS and working_bytes(config, tokens, itemsize) > (budget - base) // WORKING_SHARE:
        tokens //= 2
    working = working_bytes(config, tokens, itemsize)
    free = budget - base - working
    if free - 2 * largest_unit <= 0:
        raise ConfigError(
            "server.memory_budget",
            f"{_mib(budget)} is too small: this process already uses {_mib(base)}, a forward needs "
            f"{_mib(working)} and two streamed blocks {_mib(2 * largest_unit)}; give at least "
            f"{_mib(base + working + 2 * largest_unit + 16 * MIB)}",
        )
    if cache_bytes is not None:
        kv = cache_bytes
    elif free - total_weights >= min(default_cache, free // KV_SHARE):
        kv = min(default_cache, free - total_weights)  # everything resident, the rest for caches
    else:
        kv = min(default_cache, free // KV_SHARE)
    if total_weights + kv <= free:
        staging, weights = 0, total_weights
    else:
        staging = 2 * largest_unit
        weights = free - staging - kv
        if weights < 0:
            raise ConfigError(
                "server.memory_budget",
                f"{_mib(budget)} leaves {_mib(free - staging)} after this process ({_mib(base)}), a forward "
                f"and two streamed blocks, less than the KV cache's {_mib(kv)} (server.cache_bytes)",
            )
    return MemoryPlan(budget, base, working, staging, weights, kv, tokens)


def return_freed_memory() -> None:
    """Make glibc's allocator give freed memory back to the OS at once, so that the resident set follows
    what is allocated (a budget is only as good as that): large blocks get their own mappings, freed
    heap tops are trimmed, and threads share few arenas. A no-op outside glibc."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        mallopt = libc.mallopt if libc is not None else None
    except (OSError, AttributeError):
        return
    if mallopt is None:
        return
    for option, value in ((M_MMAP_THRESHOLD, 256 << 10), (M_TRIM_THRESHOLD, 1 << 20), (M_ARENA_MAX, 2)):
        mallopt(option, value)


def current_rss() -> int:
    """This process's resident set size in bytes (0 where /proc is missing)."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * _page()
    except OSError:
        return 0


def peak_rss() -> int:
    """The highest resident set size this process has had, in bytes (``VmHWM``: since its last exec;
    ``ru_maxrss`` would count the parent it was forked from), 0 where /proc is missing."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def peak_memory(device: torch.device) -> int:
    """The most memory the budget has counted so far: peak RSS, or peak allocated device memory."""
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return peak_rss()


def _page() -> int:
    import mmap

    return mmap.PAGESIZE


def _mib(n: int) -> str:
    return f"{n / MIB:.0f} MiB"
