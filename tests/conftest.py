import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("SOMAD_NO_PROGRESS", "1")
# SOMAD_TEST_THREADS runs the suite at another thread count (the figures must hold at 1, 2 and 4); default: at
# most 2, as on CI's machine.
torch.set_num_threads(int(os.environ.get("SOMAD_TEST_THREADS") or min(2, torch.get_num_threads())))

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data beside the checkout; tests that need it skip cleanly when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is not present")
    return SHARED_DATA


@pytest.fixture(params=["simd", "portable"])
def native(request):
    """The native kernels with their AVX2 bodies (where the CPU has them), then with their portable C bodies;
    skipped where somad._native._kernels is not built (CI checks that it is)."""
    from somad._native import kernels

    if not kernels.AVAILABLE:
        pytest.skip("somad._native._kernels is not built")
    if request.param == "simd" and not kernels.set_simd(True):
        pytest.skip("this CPU lacks AVX2/FMA/F16C")
    kernels.set_simd(request.param == "simd")
    yield request.param
    kernels.set_simd(True)
