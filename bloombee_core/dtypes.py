"""Data types by name: the one table settings, the CLI, the wire, servers and clients share.

Names are what swarm.toml, command-line flags and wire headers carry; torch is imported only when a
name is turned into a ``torch.dtype``, so settings and the CLI stay light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal, get_args

if TYPE_CHECKING:
    import torch

DtypeName = Literal["float32", "bfloat16", "float16"]
MODEL_DTYPES: tuple[str, ...] = get_args(DtypeName)  # what a model's weights and hidden states may be
WIRE_DTYPES: tuple[str, ...] = (*MODEL_DTYPES, "int64")  # what a tensor on the wire may be (int64: ids)


def torch_dtype(name: str | torch.dtype, allowed: tuple[str, ...] = MODEL_DTYPES) -> torch.dtype:
    """``"bfloat16"`` -> ``torch.bfloat16``; a ``torch.dtype`` passes through if its name is allowed.

    :raises ValueError: the name is not one of ``allowed``.
    """
    import torch

    text = dtype_name(name) if isinstance(name, torch.dtype) else str(name).removeprefix("torch.")
    if text not in allowed:
        raise ValueError(f"dtype {name!r} is not one of {', '.join(allowed)}")
    return getattr(torch, text)


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``."""
    return str(dtype).removeprefix("torch.")
