"""Large, read-mostly CPU arrays on transparent huge pages (Linux).

One responsibility: allocate a tensor whose memory the kernel may back with 2 MB pages. Scoring reads most of
SOMAD's packed whiteners (about 60 MB) for every image, in a different order each time; with 4 KB pages that
is a TLB miss every 4 KB, and the hardware prefetcher stops at every page boundary. On this project's 2-core
CPU, huge pages make the Mahalanobis step about 10% faster. Where they are not offered (another OS,
``transparent_hugepage`` set to ``never``), the memory is ordinary: only the speed differs.
"""

from __future__ import annotations

import logging
import math
import mmap
import sys

import numpy as np
import torch

logger = logging.getLogger(__name__)

HUGE_PAGE = 2 << 20


def empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised CPU tensor; from 2 MB on, on Linux, in a private anonymous mapping advised for huge
    pages (``madvise(MADV_HUGEPAGE)``, honoured when ``transparent_hugepage`` is ``always`` or ``madvise``)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    nbytes = math.prod(shape) * itemsize
    if nbytes < HUGE_PAGE or not sys.platform.startswith("linux") or not hasattr(mmap, "MADV_HUGEPAGE"):
        return torch.empty(shape, dtype=dtype)
    try:
        # Private, not mmap's default shared mapping: shared anonymous memory is shmem, which THP leaves alone.
        region = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        region.madvise(mmap.MADV_HUGEPAGE)
    except (OSError, ValueError) as exc:
        logger.debug("no huge-page mapping (%s); using ordinary memory", exc)
        return torch.empty(shape, dtype=dtype)
    raw = np.frombuffer(region, np.uint8)  # keeps the mapping alive as long as the tensor
    start = (-raw.ctypes.data) % HUGE_PAGE  # huge pages need 2 MB-aligned addresses
    return torch.from_numpy(raw[start : start + nbytes]).view(dtype).view(shape)


def zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
    """A zero-filled tensor: :func:`empty` on CPU, an ordinary ``torch.zeros`` on any other device."""
    if torch.device(device).type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    return empty(shape, dtype).zero_()
