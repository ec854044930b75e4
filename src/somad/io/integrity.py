"""Integrity and authenticity of the files somad writes: SHA-256 file hashes and an optional HMAC-SHA-256 signature.

* **Integrity.** A model file carries the SHA-256 of its content (config and arrays, ``model_files.content_hash``);
  an export records the SHA-256 of its graph and of its own description (``export_format``). A hash detects a
  damaged, truncated or edited file, but it is no proof of origin: whoever can write the model folder can change
  the threshold and recompute the hash, and the file is taken as genuine.
* **Authenticity (optional).** With a secret key, ``--sign-key FILE`` (``fit``, ``calibrate``, ``update``,
  ``export``) adds an HMAC-SHA-256 of that content hash under the key, and ``--verify-key FILE`` (``predict``,
  ``serve``, ``info``, ``evaluate``, ``calibrate``, ``update``, ``export``; ``OnnxDetector(verify_key=...)``)
  refuses a file that is unsigned or whose signature does not match: an edit cannot be re-signed without the key.
  The key must therefore be kept where the model folder's writers cannot read it (a secret store, a file readable
  by the inspection account only), never beside the model.

The signed message names what is signed (``somad-model``, ``somad-export``) so that one kind's signature never
passes for the other's. This module imports no torch (the ONNX runtime uses it).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
from pathlib import Path

from somad.errors import ModelFileError, SomadError

logger = logging.getLogger(__name__)

#: The signature's scheme, written before its hex digest: ``hmac-sha256:<64 hex digits>``.
SCHEME = "hmac-sha256"
#: Keys shorter than this many bytes are refused (128 bits).
MIN_KEY_BYTES = 16
_MAX_KEY_BYTES = 1 << 16
KEY_HINT = "make one with `head -c 32 /dev/urandom > KEY` and keep it away from the model folder"


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of the file's bytes (what ``sha256sum`` prints)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def read_key(path: str | os.PathLike) -> bytes:
    """The signing key held in the file ``path``: its bytes, a trailing newline (of a key written by ``echo`` or
    ``openssl rand -hex``) removed; one-line :class:`SomadError` for a missing, unreadable or short key."""
    path = Path(path)
    try:
        if not path.is_file():
            raise SomadError(f"{path}: key file not found (or not a regular file); {KEY_HINT}")
        with open(path, "rb") as f:
            key = f.read(_MAX_KEY_BYTES + 1)
    except OSError as exc:
        raise SomadError(f"{path}: cannot read the key file ({exc.strerror or exc}); check its permissions") from None
    if len(key) > _MAX_KEY_BYTES:
        raise SomadError(f"{path}: is not a key file (over {_MAX_KEY_BYTES} bytes); {KEY_HINT}")
    key = key.rstrip(b"\r\n")
    if len(key) < MIN_KEY_BYTES:
        raise SomadError(f"{path}: the key holds {len(key)} bytes, fewer than {MIN_KEY_BYTES}; {KEY_HINT}")
    return key


def as_key(key: bytes | str | os.PathLike | None) -> bytes | None:
    """A key given to the API: the key's ``bytes`` themselves, or the path of its file (:func:`read_key`)."""
    if key is None or isinstance(key, bytes):
        if key is not None and len(key) < MIN_KEY_BYTES:
            raise SomadError(f"the key holds {len(key)} bytes, fewer than {MIN_KEY_BYTES}; {KEY_HINT}")
        return key
    if isinstance(key, (str, os.PathLike)):
        return read_key(key)
    raise SomadError(f"a key is bytes or the path of a key file, not {type(key).__name__}")


def sign(key: bytes, kind: str, *parts: str) -> str:
    """``hmac-sha256:<hex>`` of ``somad-<kind>|part|part...`` under ``key``."""
    message = "|".join((f"somad-{kind}", *parts)).encode()
    return f"{SCHEME}:{hmac.new(key, message, hashlib.sha256).hexdigest()}"


def check_signature(key: bytes, signature, kind: str, *parts: str, where: str, signer: str) -> None:
    """Refuse, in one :class:`ModelFileError` line naming ``where``, a missing or wrong ``signature``.

    ``signer`` names the commands that sign this kind of file (for the fix)."""
    if not signature:
        raise ModelFileError(
            f"{where}: is not signed, and a verify key was given; sign it with `{signer} --sign-key KEY`, "
            "or verify without --verify-key"
        )
    expected = sign(key, kind, *parts).encode()
    if not isinstance(signature, str) or not hmac.compare_digest(signature.encode(errors="replace"), expected):
        raise ModelFileError(
            f"{where}: the signature does not match the verify key (modified after signing, or signed with another "
            f"key); use the file as it was signed, or sign it again with `{signer} --sign-key KEY`"
        )


def warn_key_beside(key_path: str | os.PathLike | None, target: str | os.PathLike) -> None:
    """Log a warning when the key file sits in the folder of the file or export folder it signs or verifies:
    whoever can write that folder could then read the key, and the signature would prove nothing."""
    if key_path is None or isinstance(key_path, bytes):
        return
    try:
        key_dir = Path(key_path).resolve().parent
        target = Path(target).resolve()
        folders = {target.parent, target} if target.is_dir() else {target.parent}
    except OSError:
        return
    if key_dir in folders:
        logger.warning(
            "the key file %s is in the folder of %s: whoever can write the model can read the key there; "
            "keep it elsewhere",
            key_path,
            target,
        )


__all__ = ["MIN_KEY_BYTES", "SCHEME", "as_key", "check_signature", "file_sha256", "read_key", "sign"]
