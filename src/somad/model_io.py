"""The model file format: one safetensors file holding plain arrays and a JSON config.

One responsibility: write and read model files safely. Nothing here unpickles: safetensors stores raw
little-endian arrays behind a JSON header, and the header's ``__metadata__`` carries

* ``format``: ``"somad"`` (anything else is not a somad model);
* ``format_version``: an integer; files from a newer version are rejected;
* ``config``: the JSON config from which :func:`somad.load` rebuilds the detector;
* ``sha256``: a hash of the config and every array (name, dtype, shape, bytes); a truncated or tampered
  file fails the check.

Writes are atomic: a temporary file in the target folder is written, flushed, fsynced and renamed over
the target, so an interrupted save leaves the previous file intact or no file at all.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from .errors import ModelFileError

FORMAT = "somad"
FORMAT_VERSION = 1


def content_hash(config_json: str, arrays: dict[str, torch.Tensor]) -> str:
    """SHA-256 over the config text and each array's name, dtype, shape and bytes, in name order."""
    h = hashlib.sha256(config_json.encode())
    for name in sorted(arrays):
        t = arrays[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def atomic_write(path: Path, write) -> None:
    """Call ``write(tmp_path)`` then fsync and rename the file onto ``path``; clean up on any failure."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # includes KeyboardInterrupt: never leave the temp file behind
        Path(tmp).unlink(missing_ok=True)
        raise
    try:
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # make the rename itself durable
        finally:
            os.close(dir_fd)
    except OSError:
        pass


def save_model(path: str | os.PathLike, config: dict, arrays: dict[str, torch.Tensor | np.ndarray]) -> Path:
    """Write ``arrays`` and ``config`` atomically to ``path`` (a ``.safetensors`` file)."""
    from safetensors.torch import save_file

    tensors = {k: (torch.from_numpy(np.ascontiguousarray(v)) if isinstance(v, np.ndarray) else v.detach().cpu().contiguous())
               for k, v in arrays.items()}
    config_json = json.dumps(config, sort_keys=True)
    metadata = {"format": FORMAT, "format_version": str(FORMAT_VERSION), "config": config_json,
                "sha256": content_hash(config_json, tensors)}
    path = Path(path)
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
    return path


def load_model(path: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """Read and verify a model file; every failure is a one-line :class:`ModelFileError`."""
    from safetensors import safe_open

    path = Path(path)
    if not path.exists():
        raise ModelFileError(f"{path}: model file not found; train one with `somad fit`")
    if path.is_dir():
        raise ModelFileError(f"{path}: is a directory; pass the model file written by `somad fit -o`")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            arrays = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:
        raise ModelFileError(f"{path}: not a readable somad model file ({_reason(exc)}); re-run `somad fit`") from None
    if metadata.get("format") != FORMAT:
        raise ModelFileError(f"{path}: not a somad model (no somad header); pass a file written by `somad fit`")
    try:
        version = int(metadata.get("format_version", ""))
    except ValueError:
        raise ModelFileError(f"{path}: invalid format version {metadata.get('format_version')!r}; re-run `somad fit`") from None
    if version > FORMAT_VERSION:
        raise ModelFileError(f"{path}: model format version {version} is newer than this somad supports "
                             f"({FORMAT_VERSION}); upgrade somad")
    config_json = metadata.get("config", "")
    if content_hash(config_json, arrays) != metadata.get("sha256"):
        raise ModelFileError(f"{path}: content hash mismatch (file corrupted or modified); re-run `somad fit`")
    try:
        config = json.loads(config_json)
    except json.JSONDecodeError:
        raise ModelFileError(f"{path}: config is not valid JSON; re-run `somad fit`") from None
    return config, arrays


def _reason(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:120]
