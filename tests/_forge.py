"""Rewrite a model file as an attacker with write access would: edit its header, config or arrays, then recompute
the unkeyed content hash, so that the file passes the hash check and only the schema (or a signature) stands in
the way."""

from __future__ import annotations

import json

import torch
from safetensors.torch import save_file

from somad.io.model_files import content_hash, load_model


def read(path) -> tuple[dict, dict, dict]:
    """The header's metadata, the config and the arrays of a model file (verified)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        metadata = dict(f.metadata())
    config, arrays = load_model(path)
    return metadata, config, arrays


def write(path, metadata: dict, config, arrays: dict, *, rehash: bool = True, config_text: str | None = None):
    """Write ``config`` and ``arrays`` under ``metadata`` (its other fields kept: format, version, signature); with
    ``rehash`` the content hash is recomputed, as an attacker would. ``config_text`` replaces the config's JSON."""
    text = json.dumps(config, sort_keys=True) if config_text is None else config_text
    tensors = {k: (v if isinstance(v, torch.Tensor) else torch.as_tensor(v)).contiguous() for k, v in arrays.items()}
    metadata = {**metadata, "config": text}
    if rehash:
        metadata["sha256"] = content_hash(text, tensors)
    save_file(tensors, str(path), metadata=metadata)
    return path


def rewrite(src, dst, *, edit_config=None, edit_arrays=None, edit_metadata=None):
    """``src`` with its config, arrays or header edited in place by the callables given, rehashed, at ``dst``."""
    metadata, config, arrays = read(src)
    for edit, target in ((edit_config, config), (edit_arrays, arrays), (edit_metadata, metadata)):
        if edit is not None:
            edit(target)
    return write(dst, metadata, config, arrays)
