"""Build the static code tables ``zstd-exponent`` ships for small messages (run once, offline).

    python -m bench.compress_tables [--tokens 1024]

The tables are symbol counts of the exponent byte plane (see plugins/bloombee_compress/exponent.py)
of SmolLM2-135M hidden states: every block's output on a random prompt and on text this repository
holds (docs/swarm.md, docs/plugins.md — not the files bench/compression.py measures on). A message's
exponent distribution depends mostly on its block's depth, so the blocks are cut into 4 contiguous
groups and each group gets one table; the encoder picks the table that codes a message shortest.
Every count is at least 1, so any symbol can be coded. Written to
plugins/bloombee_compress/tables/smollm2-{e8,f16}-v1.npy as [4, 256] uint32.

The tables are part of the wire format: a peer decodes a table id with its own copy of that table, so
never rebuild a ``-v1`` file in place (peers with the old copy would refuse, or wrongly decode, the new
payloads); add a new file and new ids in exponent.py's TABLES instead.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from bloombee_compress.exponent import TABLE_FILES, TABLES, split_planes

from bench.compression import hidden_states

TRAIN_TEXT = ("docs/swarm.md", "docs/plugins.md")
OUT = Path(__file__).resolve().parent.parent / "plugins" / "bloombee_compress" / "tables"
DTYPES = {"e8": torch.bfloat16, "f16": torch.float16}


def block_histograms(states: torch.Tensor, dtype: torch.dtype) -> np.ndarray:
    """[blocks, 256] exponent-plane symbol counts."""
    rows = []
    for block in states:
        data = block.to(dtype).contiguous().view(torch.uint8).reshape(-1).numpy()
        top, _ = split_planes(data, dtype.itemsize)
        rows.append(np.bincount(top, minlength=256))
    return np.stack(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=1024)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    states = torch.cat(
        [
            hidden_states("smollm2", args.tokens, "random"),
            hidden_states("smollm2", args.tokens, "text", TRAIN_TEXT),
        ],
        dim=1,
    )
    OUT.mkdir(parents=True, exist_ok=True)
    for layout, dtype in DTYPES.items():
        rows = sorted(t.row for t in TABLES.values() if t.layout == layout)
        histograms = block_histograms(states, dtype)
        groups = np.array_split(np.arange(len(histograms)), len(rows))
        counts = np.stack([histograms[group].sum(0) + 1 for group in groups]).astype(np.uint32)
        path = OUT / TABLE_FILES[layout]
        np.save(path, counts, allow_pickle=False)
        print(f"{path.name}: {len(rows)} tables over blocks {[f'{g[0]}-{g[-1]}' for g in groups]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
