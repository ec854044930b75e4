"""Huge-page-backed arrays: ordinary tensors to every caller, 2 MB-aligned where the OS offers the mapping."""

import gc
import sys

import numpy as np
import pytest
import torch

from somad import hugepages


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.int64])
def test_large_arrays_are_aligned_writable_and_outlive_their_mapping_objects(dtype):
    t = hugepages.empty((300, 5000), dtype)  # 3-12 MB
    assert t.shape == (300, 5000) and t.dtype == dtype and t.is_contiguous()
    if sys.platform.startswith("linux"):
        assert t.data_ptr() % hugepages.HUGE_PAGE == 0
    t.copy_(torch.arange(t.numel()).view(300, 5000).to(dtype))
    gc.collect()  # the tensor alone keeps the mapping alive
    expected = torch.arange(t.numel()).view(300, 5000).to(dtype)
    assert torch.equal(t, expected) and torch.equal(t[:7].clone(), expected[:7])
    np.testing.assert_array_equal(t.numpy(), expected.numpy())


def test_small_arrays_are_ordinary_tensors():
    t = hugepages.empty((3, 4), torch.float32)
    assert t.shape == (3, 4) and t.dtype == torch.float32
