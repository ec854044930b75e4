"""Progress bars for long steps (tqdm on stderr), off when ``SOMAD_NO_PROGRESS`` is set (``somad -q``, tests)."""

from __future__ import annotations

import os


def progress_bar(iterable=None, **kwargs):
    """A ``tqdm`` bar that disappears when done; disabled by the environment variable ``SOMAD_NO_PROGRESS``."""
    from tqdm import tqdm

    quiet = os.environ.get("SOMAD_NO_PROGRESS", "") not in ("", "0")
    return tqdm(iterable, disable=quiet, leave=False, **kwargs)
