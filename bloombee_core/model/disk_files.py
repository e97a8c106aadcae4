"""Memory-mapped files of the disk tier — a KV-cache layer's (:class:`LayerFile`) and a block's frozen
weights (:class:`WeightsFile`) — the folder they live in, and the thread that reads them ahead.

A KV file is mapped shared (``MAP_SHARED``): :meth:`LayerFile.drop` takes its pages out of the process's
resident memory while the data stays in the file and the page cache, and the next read faults it in.
A weights file is mapped private (copy-on-write) and unlinked at once.
"""

from __future__ import annotations

import atexit
import itertools
import logging
import mmap
import os
import shutil
import tempfile
import threading
import weakref
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

logger = logging.getLogger("bloombee")

PAGE = mmap.PAGESIZE

__all__ = ["ALIGN", "PAGE", "LayerFile", "WeightsFile", "in_background", "offload_directory"]
ALIGN = 64  # byte alignment of each tensor inside a weights file


class LayerFile:
    """One layer's keys and values in a file mapped shared: dropped pages keep their data in the file."""

    def __init__(self, directory: Path, index: int, shape: tuple[int, ...], dtype: torch.dtype) -> None:
        self.shape, self.itemsize = shape, dtype.itemsize
        self.region = shape[0] * shape[1] * shape[2] * shape[3] * dtype.itemsize
        self.offsets = [0, -(-self.region // PAGE) * PAGE]
        size = self.offsets[1] + self.region
        self.path: Path | None = None
        try:
            directory.mkdir(parents=True, exist_ok=True)
            handle, name = tempfile.mkstemp(prefix=f"kv-layer{index}-", suffix=".bin", dir=directory)
            self.path = Path(name)
            with os.fdopen(handle, "r+b") as file:
                if hasattr(os, "posix_fallocate"):
                    # reserve the blocks now: a full disk must fail here, not as a SIGBUS mid-forward
                    os.posix_fallocate(file.fileno(), 0, size)
                else:
                    file.truncate(size)
                self.map = mmap.mmap(file.fileno(), size)  # MAP_SHARED, read-write
        except OSError as error:
            if self.path is not None:
                self.path.unlink(missing_ok=True)
            raise OSError(
                f"cannot create a {size}-byte KV-cache file for layer {index} in {directory}: {error}; "
                "point the offload directory at a writable disk with room for the session's cache"
            ) from error
        self._remove = weakref.finalize(self, _unlink, self.path)
        self.raw = torch.frombuffer(self.map, dtype=torch.uint8)
        self.views = [
            self.raw[offset : offset + self.region].view(dtype).view(shape) for offset in self.offsets
        ]

    def drop(self) -> None:
        """Take the mapped pages out of the process's resident memory (the data stays in the file)."""
        self.map.madvise(mmap.MADV_DONTNEED)

    def page_in(self, lengths: list[int]) -> None:
        """Fault in the first ``lengths[0]`` tokens of the keys and ``lengths[1]`` of the values."""
        rows = self.shape[0] * self.shape[1]
        token = self.shape[3] * self.itemsize
        row = self.shape[2] * token
        touched = []
        for offset, length in zip(self.offsets, lengths, strict=True):
            used = length * token
            if not used:
                continue
            starts = offset + torch.arange(rows, dtype=torch.int64) * row
            for start in starts.tolist():
                begin = start - start % PAGE
                self.map.madvise(mmap.MADV_WILLNEED, begin, start + used - begin)
            within = torch.cat([torch.arange(0, used, PAGE), torch.tensor([used - 1])])
            touched.append((starts[:, None] + within[None, :]).flatten())
        if touched:
            self.raw.index_select(0, torch.cat(touched)).sum()  # one byte a page faults it in

    def close(self) -> None:
        self.views = []
        self.raw = None
        try:
            self.map.close()
        except BufferError:  # a view handed out earlier is still alive; the mapping goes with it
            logger.debug("KV-cache file %s still mapped by a live tensor", self.path)
        self._remove()


_root_lock = threading.Lock()
_roots: dict[Path | None, Path] = {}
_names = itertools.count()


def offload_directory(base: Path | None = None) -> Path:
    """This process's folder for disk-tier files under ``base`` (default: the BloomBee cache), made on
    first use and removed when the process exits."""
    with _root_lock:
        if base not in _roots:
            from bloombee_core.model_files import cache_dir

            parent = Path(base) if base is not None else cache_dir() / "offload"
            try:
                parent.mkdir(parents=True, exist_ok=True)
                folder = Path(tempfile.mkdtemp(prefix=f"{os.getpid()}-", dir=parent))
            except OSError as error:
                raise OSError(f"cannot make an offload folder under {parent}: {error}") from error
            atexit.register(shutil.rmtree, folder, True)
            _roots[base] = folder
        return _roots[base]


class WeightsFile:
    """Tensors written to one file and read back through a private memory map.

    The file is unlinked as soon as it is mapped (the mapping keeps it alive), so nothing is left on
    disk however the process ends. :meth:`drop` returns the mapped pages to the kernel: they leave the
    process's resident memory, and the next read pages them in again from the file (or page cache).
    """

    def __init__(self, folder: Path, tensors: list[torch.Tensor]) -> None:
        offsets, size = [], 0
        for tensor in tensors:
            size = -(-size // ALIGN) * ALIGN
            offsets.append(size)
            size += tensor.numel() * tensor.element_size()
        path = folder / f"unit-{next(_names)}.bin"
        try:
            with open(path, "wb") as out:
                for tensor, offset in zip(tensors, offsets, strict=True):
                    out.seek(offset)
                    out.write(tensor.detach().contiguous().view(-1).view(torch.uint8).numpy().data)
                out.truncate(max(size, 1))
            with open(path, "rb") as source:
                self.map = mmap.mmap(source.fileno(), max(size, 1), access=mmap.ACCESS_COPY)
        except OSError as error:
            raise OSError(f"cannot write offloaded weights to {folder}: {error}") from error
        finally:
            path.unlink(missing_ok=True)
        self.size = size
        buffer = torch.frombuffer(self.map, dtype=torch.uint8) if size else torch.empty(0, dtype=torch.uint8)
        self.views = [
            buffer[offset : offset + t.numel() * t.element_size()].view(t.dtype).view(t.shape)
            for t, offset in zip(tensors, offsets, strict=True)
        ]

    def drop(self) -> None:
        if self.size:
            self.map.madvise(mmap.MADV_DONTNEED)

    def page_in(self) -> None:
        """Read the whole file into memory (ahead of use): one byte per page is enough to fault it in."""
        if self.size:
            self.map.madvise(mmap.MADV_WILLNEED)
            view = memoryview(self.map)
            try:
                sum(view[offset] for offset in range(0, self.size, PAGE))
            finally:
                view.release()


def _unlink(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError:
        logger.debug("could not remove KV-cache file %s", path, exc_info=True)


_executor: ThreadPoolExecutor | None = None
_executor_lock = threading.Lock()


def in_background(work: Callable[[], object]) -> None:
    """Run ``work()`` on this process's one read-ahead thread; an error there is logged, never raised."""
    global _executor
    with _executor_lock:
        if _executor is None:
            _executor = ThreadPoolExecutor(1, thread_name_prefix="bloombee-read-ahead")

    def guarded() -> None:
        try:
            work()
        except Exception:  # noqa: BLE001 - a failed read-ahead only costs the page faults it would save
            logger.debug("read-ahead failed", exc_info=True)

    _executor.submit(guarded)
