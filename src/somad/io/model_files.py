"""The model file format: one safetensors file holding plain arrays and a JSON config.

One responsibility: write and read model files safely. Nothing here unpickles: safetensors stores raw
little-endian arrays behind a JSON header, and the header's ``__metadata__`` carries

* ``format``: ``"somad"`` (anything else is not a somad model);
* ``format_version``: an integer; files from a newer version are rejected;
* ``config``: the JSON config from which :func:`somad.load` rebuilds the detector;
* ``sha256``: a hash of the config and every array (name, dtype, shape, bytes); a truncated or tampered
  file fails the check;
* ``signature`` (optional, ``save_model(sign_key=...)``): an HMAC-SHA-256 of the format, its version and that
  hash under a secret key (``somad.io.integrity``); ``load_model(verify_key=...)`` refuses a file without a
  matching one. The hash alone is integrity: whoever can write the file can recompute it. The signature is
  authenticity, as long as the key is kept away from the model folder.

What the config holds is checked field by field when the detector is rebuilt (``somad.io.schema``, the
methods' ``_state_fields`` and ``_array_fields``).

Writes are atomic: a temporary file in the target folder is written, flushed, fsynced and renamed over
the target, so an interrupted save leaves the previous file intact or no file at all.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import re
import shutil
import struct
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from somad.errors import ModelFileError, SomadError
from somad.io.integrity import as_key, check_signature, sign

if TYPE_CHECKING:  # torch is imported where arrays are hashed, written or read: the atomic writes need none of it
    import torch

logger = logging.getLogger(__name__)

FORMAT = "somad"
ANOTHER_RUN = "{path}: was written by another run meanwhile; pass --overwrite or choose another -o"
FORMAT_VERSION = 2  # 2 (somad 0.5): SOMAD whiteners packed in 16-row strips; version 1 files still load
#: The commands that sign model files (named in the fix of an unsigned or wrongly signed file).
SIGNERS = "somad fit/calibrate/update"


def content_hash(config_json: str, arrays: dict[str, torch.Tensor]) -> str:
    """SHA-256 over the config text and each array's name, dtype, shape and bytes, in name order."""
    import torch

    h = hashlib.sha256(config_json.encode())
    for name in sorted(arrays):
        t = arrays[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        t = t.reshape(-1)  # a 0-d tensor cannot be viewed as bytes; the flat view has the same bytes
        h.update(t.view(torch.uint8).numpy() if t.numel() else b"")  # the buffer itself: no copy of the bytes
    return h.hexdigest()


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux ``/proc``)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def temp_prefix(path: Path) -> str:
    """The prefix of the temporaries written beside ``path``: ``.<name>.<pid>.``, so that a later run can tell
    the leftovers of a killed one (:func:`remove_leftovers`)."""
    return f".{path.name}.{os.getpid()}."


def remove_leftovers(path: Path, suffix: str) -> list[Path]:
    """Remove the temporaries (``.<name>.<pid>.*<suffix>``) that runs killed before they could clean up left
    beside ``path``: those whose process no longer exists. Returns what was removed (logged)."""
    removed = []
    try:
        candidates = list(path.parent.glob(f".{glob.escape(path.name)}.*{suffix}"))
    except OSError:
        return removed
    for leftover in candidates:
        pid = leftover.name[len(path.name) + 2 :].split(".", 1)[0]
        if not pid.isdigit() or _alive(int(pid)):
            continue
        try:
            shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()
            removed.append(leftover)
        except OSError:
            continue
    if removed:
        logger.warning("removed %d leftover temporary file(s) of an interrupted run beside %s", len(removed), path)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def atomic_write(path: Path, write, *, overwrite: bool = True) -> None:
    """Call ``write(tmp_path)`` then fsync and rename the file onto ``path``; clean up on any failure.

    The file gets the permissions a plain ``open(path, "w")`` would give it (``0o666`` less the umask), or
    those of the file it replaces, not ``mkstemp``'s private ``0o600``. An ``OSError`` (no space, no
    permission, a parent that is a file) becomes a one-line :class:`SomadError` naming ``path``. Without
    ``overwrite`` the placement is exclusive (a hard link, which fails if ``path`` exists): of two runs
    writing one path, the second fails instead of silently replacing the first's file.
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_leftovers(path, ".tmp")
        mode = path.stat().st_mode & 0o7777 if path.is_file() else 0o666 & ~current_umask()
        fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path), suffix=".tmp", dir=path.parent)
        os.close(fd)
        write(Path(tmp))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        if overwrite:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise SomadError(ANOTHER_RUN.format(path=path)) from None
            Path(tmp).unlink()
    except BaseException as exc:  # includes KeyboardInterrupt: never leave the temp file behind
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            reason = exc.strerror or str(exc) or type(exc).__name__
            raise SomadError(
                f"{path}: cannot write ({reason}); check the path, its permissions and free space"
            ) from exc
        raise
    try:
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # make the rename itself durable
        finally:
            os.close(dir_fd)
    except OSError:
        pass


def atomic_write_text(path: Path, text: str) -> None:
    """Write a UTF-8 text file atomically (see :func:`atomic_write`)."""
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def save_model(
    path: str | os.PathLike,
    config: dict,
    arrays: dict[str, torch.Tensor | np.ndarray],
    *,
    overwrite: bool = True,
    sign_key: bytes | str | os.PathLike | None = None,
) -> Path:
    """Write ``arrays`` and ``config`` atomically to ``path`` (a ``.safetensors`` file); without ``overwrite``,
    an existing file is never replaced (see :func:`atomic_write`). ``sign_key`` (the key's bytes or its file)
    adds the header's ``signature``."""
    import torch

    key = as_key(sign_key)
    tensors = {
        k: (torch.from_numpy(np.ascontiguousarray(v)) if isinstance(v, np.ndarray) else v.detach().cpu().contiguous())
        for k, v in arrays.items()
    }
    config_json = json.dumps(config, sort_keys=True)
    metadata = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "config": config_json,
        "sha256": content_hash(config_json, tensors),
    }
    if key is not None:
        metadata["signature"] = sign(key, "model", FORMAT, metadata["format_version"], metadata["sha256"])
    path = Path(path)
    atomic_write(path, lambda tmp: _save_file(tensors, tmp, metadata), overwrite=overwrite)
    return path


def _save_file(tensors: dict, tmp: Path, metadata: dict) -> None:
    """safetensors' ``save_file``, with its I/O failures (a full disk, a vanished folder), which it raises as
    ``SafetensorError``, turned into the ``OSError`` that :func:`atomic_write` reports in one line."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    try:
        save_file(tensors, str(tmp), metadata=metadata)
    except SafetensorError as exc:
        text = _reason(exc)
        if "I/O error" not in text:
            raise
        raise OSError(text.split("I/O error: ", 1)[-1]) from exc


def _read_large_arrays(path: Path, arrays: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Replace the arrays of 2 MB and more by copies in memory that may use huge pages (:mod:`somad._native.hugepages`:
    scoring reads them repeatedly), read from the file with ``readinto``.

    safetensors' own tensors are views of its memory map of the file: reading them page by page would count
    the file's pages in this process's memory next to the copy. Read directly, the copy is the only one held.
    The offsets come from the file's header (8-byte little-endian length, then JSON), which ``safe_open`` has
    already parsed and checked.
    """
    import torch

    from somad._native import hugepages

    large = {k for k, t in arrays.items() if t.numel() * t.element_size() >= hugepages.HUGE_PAGE}
    if not large:
        return arrays
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
        for name in large:
            source = arrays[name]
            start, end = header[name]["data_offsets"]
            copy = hugepages.empty(tuple(source.shape), source.dtype)
            view = memoryview(copy.view(torch.uint8).reshape(-1).numpy())
            if end - start != len(view):
                raise ValueError(f"array {name}: {end - start} bytes in the header, {len(view)} expected")
            f.seek(8 + length + start)
            done = 0
            while done < len(view):  # readinto may return less than asked
                got = f.readinto(view[done:])
                if not got:
                    raise ValueError(f"array {name}: the file ends early")
                done += got
            arrays[name] = copy
    return arrays


def load_model(
    path: str | os.PathLike,
    verify_key: bytes | str | os.PathLike | None = None,
    *,
    expect_sha256: str | None = None,
) -> tuple[dict, dict[str, torch.Tensor]]:
    """Read and verify a model file; every failure is a one-line :class:`ModelFileError`. With ``verify_key`` (the
    key's bytes or its file) a file that is unsigned or not signed with that key is refused. With
    ``expect_sha256`` (a content hash, as ``read_metadata(path)["sha256"]`` gives it) a file whose content is not
    that one is refused: a process that re-reads a model another one verified (a Ray worker) reads the same
    content or nothing, without holding the key."""
    from safetensors import safe_open

    path = Path(path)
    key = as_key(verify_key)
    if not path.exists() and path.is_symlink():
        raise ModelFileError(f"{path}: broken symbolic link (to {os.readlink(path)}); point it at a model file")
    if not path.exists():
        raise ModelFileError(f"{path}: model file not found; train one with `somad fit`")
    if path.is_dir():
        raise ModelFileError(f"{path}: is a directory; pass the model file written by `somad fit -o`")
    if not path.is_file():  # a pipe or a device would block or stream forever: never opened
        raise ModelFileError(
            f"{path}: not a regular file (a pipe or a device?); pass the model file written by `somad fit -o`"
        )
    _check_readable(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            arrays = {k: f.get_tensor(k) for k in f.keys()}
        arrays = _read_large_arrays(path, arrays)
    except MemoryError:
        raise ModelFileError(
            f"{path}: not enough memory to load the model file ({path.stat().st_size / 2**20:.0f} MB); free memory"
        ) from None
    except Exception as exc:
        reason = _reason(exc)
        if "ends early" in reason or "incomplete metadata" in reason or "MetadataIncompleteBuffer" in reason:
            reason = "truncated: its arrays end early"
        raise ModelFileError(
            f"{path}: not a readable somad model file ({reason}); pass the file written by `somad fit`, or re-run it"
        ) from None
    if metadata.get("format") != FORMAT:
        raise ModelFileError(f"{path}: not a somad model (no somad header); pass a file written by `somad fit`")
    version_text = metadata.get("format_version", "")
    version = int(version_text) if re.fullmatch("[0-9]{1,6}", version_text) else 0
    if version < 1:
        raise ModelFileError(
            f"{path}: invalid format version {version_text!r} (1 to {FORMAT_VERSION}); re-run `somad fit`"
        )
    if version > FORMAT_VERSION:
        raise ModelFileError(
            f"{path}: model format version {version} is newer than this somad supports "
            f"({FORMAT_VERSION}); upgrade somad"
        )
    config_json = metadata.get("config", "")
    try:
        digest = content_hash(config_json, arrays)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise ModelFileError(f"{path}: unreadable arrays ({_reason(exc)}); re-run `somad fit`") from None
    if digest != metadata.get("sha256"):
        raise ModelFileError(f"{path}: content hash mismatch (file corrupted or modified); re-run `somad fit`")
    if expect_sha256 is not None and digest != expect_sha256:
        raise ModelFileError(
            f"{path}: its content changed since the run verified it (content hash {digest[:12]}... instead of "
            f"{expect_sha256[:12]}...); leave the model file in place while a run uses it"
        )
    if key is not None:
        signature = metadata.get("signature")
        check_signature(key, signature, "model", FORMAT, version_text, digest, where=str(path), signer=SIGNERS)
    try:
        config = json.loads(config_json)
    except (json.JSONDecodeError, RecursionError):  # RecursionError: absurdly deep nesting
        raise ModelFileError(f"{path}: config is not valid JSON; re-run `somad fit`") from None
    return migrate(config, arrays)


def _check_readable(path: Path) -> None:
    """One-line errors for a model file that cannot be opened or is not a whole safetensors file, before
    safetensors reports them in its own words (which named neither the problem nor the fix)."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            size = os.fstat(f.fileno()).st_size
    except PermissionError:
        raise ModelFileError(
            f"{path}: cannot read the model file: permission denied; make it readable (chmod) or run as its owner"
        ) from None
    except OSError as exc:
        raise ModelFileError(
            f"{path}: cannot read the model file ({exc.strerror or exc}); check the path and the disk"
        ) from None
    not_a_model = "pass the .safetensors file written by `somad fit`, or re-run `somad fit`"
    if len(head) < 8:
        raise ModelFileError(
            f"{path}: not a readable somad model file ({size} bytes: truncated or empty); {not_a_model}"
        )
    (length,) = struct.unpack("<Q", head)
    if length > size - 8:
        kind = "truncated (its header is cut short)" if length < 100_000_000 else "not a safetensors file"
        raise ModelFileError(f"{path}: not a readable somad model file ({kind}); {not_a_model}")


# ----------------------------------------------------------------------------------------- migrations
def _set_absent(values: dict):
    def apply(config: dict, arrays: dict) -> None:
        params = config.get("params")
        if config.get("method") == "somad" and isinstance(params, dict):
            for name, value in values.items():
                params.setdefault(name, value)

    return apply


def _square_aspect(config: dict, arrays: dict) -> None:
    params = config.get("params")
    if isinstance(params, dict):
        params.setdefault("aspect", "square")


def _rename_search(config: dict, arrays: dict) -> None:
    params = config.get("params")
    if isinstance(params, dict) and params.get("search") == "fast":
        params["search"] = "ivf"


def _row_packed_whiteners(config: dict, arrays: dict) -> None:
    if "node_whiteners_tril" in arrays and "node_whitener_strips" not in arrays:
        from somad._native.layout import strips_from_rows

        arrays["node_whitener_strips"] = strips_from_rows(arrays.pop("node_whiteners_tril"))


#: Every change of the file's contents since somad 0.1, oldest first: (what changed, how a file written before
#: it is brought up to date). Each step is idempotent and applied to every file on reading; files are never
#: rewritten in place.
MIGRATIONS = (
    (
        "0.2: SOMAD's search, feature_dtype and factor_dtype options; 0.1 files were fitted exhaustively in float32",
        _set_absent({"search": "exact", "feature_dtype": "float32", "factor_dtype": "float32"}),
    ),
    (
        "0.5 (format 2): SOMAD whiteners packed in 16-row strips; format 1 packed the triangles row by row",
        _row_packed_whiteners,
    ),
    (
        "0.6: SOMAD's local_aggregation and shrinkage; earlier files were fitted without either",
        _set_absent({"local_aggregation": 1, "shrinkage": 0.0}),
    ),
    ("0.6: the coarse-to-fine search is named by its standard name, 'ivf' (was 'fast')", _rename_search),
    ("0.11: the model input's aspect (BaseDetector.aspect); earlier files resized every image square", _square_aspect),
)


def migrate(config: dict, arrays: dict[str, torch.Tensor]) -> tuple[dict, dict[str, torch.Tensor]]:
    """Bring a verified file's config and arrays up to this version (:data:`MIGRATIONS`)."""
    if isinstance(config, dict):
        for _, step in MIGRATIONS:
            step(config, arrays)
    return config, arrays


def _reason(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:120]
