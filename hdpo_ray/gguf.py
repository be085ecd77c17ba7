"""GGUF files as a model source: converted once into a cached Hugging Face directory.

transformers reads a GGUF file (`from_pretrained(folder, gguf_file=name)`, with the `gguf` package)
and dequantizes it into an ordinary float model, but refuses to `save_pretrained` that object ("quantized
with gguf"). So the model is rebuilt from its config without the quantization entry, the dequantized
weights are loaded into it, and it is saved with the GGUF's tokenizer (and chat template) as a normal
directory. Everything downstream -- reference pool, training workers, export, eval -- reads that directory.

The directory is keyed by the file's content hash, so a changed file is converted again and an
unchanged one never is. Each Ray node converts on its first use (same file, same directory); the
conversion is written beside its final name and renamed into place, so concurrent first uses on one
node cannot see a half-written directory.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path

from hdpo_ray.config import is_uri
from hdpo_ray.errors import UserError

SOURCE_FILE = "gguf_source.json"
"""Written into every converted directory: the GGUF's name and content hash (its model fingerprint)."""


class GGUFError(UserError, ValueError):
    """A GGUF file that cannot be used as a model; one line for the user."""


def is_gguf(name_or_path: str) -> bool:
    return name_or_path.lower().endswith(".gguf")


def cache_root() -> Path:
    """HDPO_RAY_MODEL_CACHE, else ~/.cache/hdpo_ray/models: where converted directories live on each node."""
    return Path(os.path.expanduser(os.environ.get("HDPO_RAY_MODEL_CACHE", "~/.cache/hdpo_ray/models")))


def file_digest(path: Path) -> str:
    """blake2b-128 of the file's bytes."""
    from hdpo_ray.storage import update_with_file

    digest = hashlib.blake2b(digest_size=16)
    update_with_file(digest, path)
    return digest.hexdigest()


def gguf_to_hf_dir(source: str) -> Path:
    """The cached Hugging Face directory for a GGUF file (local path or fsspec URI), converting it if needed."""
    local = _local_copy(source)
    stat = local.stat()
    return _converted(str(local), stat.st_size, stat.st_mtime_ns)


@lru_cache(maxsize=8)
def _converted(path: str, size: int, mtime_ns: int) -> Path:
    """Memoised per process on (path, size, mtime): a worker resolving the same file again does not rehash it."""
    local = Path(path)
    digest = file_digest(local)
    target = cache_root() / f"{local.stem}-{digest}"
    if (target / SOURCE_FILE).is_file():
        return target
    _require_gguf_reader()
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        convert(local, partial)
        (partial / SOURCE_FILE).write_text(json.dumps({"file": local.name, "blake2b": digest}))
        try:
            os.rename(partial, target)
        except OSError:  # another process on this node finished first: its directory is the same conversion
            if not (target / SOURCE_FILE).is_file():
                raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return target


def convert(gguf_file: Path, directory: Path) -> None:
    """Dequantize `gguf_file` into an fp32 model directory (safetensors, config, tokenizer, generation config).

    fp32 keeps the dequantized values exactly (Q4/Q8 blocks scale integers by fp16 factors: bf16 would round).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_file.parent), gguf_file.name
    try:
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    except (ValueError, KeyError, NotImplementedError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise GGUFError(
            f"{gguf_file}: transformers cannot read this GGUF file ({first}); convert it to a Hugging Face "
            "directory another way and give that"
        ) from None
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights below are plain floats; this entry is what blocks saving
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)


def _require_gguf_reader() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise GGUFError(
            "reading GGUF files needs the gguf package: pip install gguf (the clone's extra: pip install -e '.[gguf]')"
        )


def _local_copy(source: str) -> Path:
    """A local path as is; a URI (s3://, gs://, hf://, https://) downloaded into the cache, again only when the
    remote file's size differs from the copy's (a changed file of the same size: remove the copy)."""
    if not is_uri(source):
        path = Path(os.path.expanduser(source))
        if not path.is_file():
            raise GGUFError(f"GGUF file {source} does not exist")
        return path
    import fsspec

    target = (
        cache_root()
        / "downloads"
        / hashlib.blake2b(source.encode(), digest_size=8).hexdigest()
        / source.rsplit("/", 1)[-1]
    )
    if not target.is_file() or _remote_size(source) not in (None, target.stat().st_size):
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f".{target.name}.partial-{os.getpid()}")
        try:
            with fsspec.open(source, "rb") as remote, open(partial, "wb") as local:
                shutil.copyfileobj(remote, local, 1 << 22)
        except (OSError, ValueError, ImportError) as err:
            partial.unlink(missing_ok=True)
            raise GGUFError(
                f"GGUF file {source} could not be read ({type(err).__name__}: "
                f"{str(err).splitlines()[0] if str(err) else ''})"
            ) from None
        os.replace(partial, target)
    return target


def _remote_size(source: str) -> int | None:
    import fsspec

    try:
        fs, path = fsspec.core.url_to_fs(source)
        return fs.size(path)
    except (OSError, ValueError, ImportError):
        return None  # unreachable now: the open below says why, or the copy stands


def recorded_digest(directory: Path) -> str | None:
    """The GGUF content hash a converted directory was made from, or None for any other directory."""
    source = directory / SOURCE_FILE
    return json.loads(source.read_text())["blake2b"] if source.is_file() else None
