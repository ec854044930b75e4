"""Huge-page-backed arrays: ordinary tensors to every caller, 2 MB-aligned where the OS offers the mapping."""

import gc
import sys

import numpy as np
import pytest
import torch

from somad._native import hugepages


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


def test_model_files_read_large_arrays_into_aligned_memory_with_the_same_bytes(tmp_path):
    from safetensors.torch import load_file

    from somad.io.model_files import load_model, save_model

    big = torch.randn(600, 1000).to(torch.float16)  # 1.2 MB: ordinary
    bigger = torch.randn(700, 1000)  # 2.8 MB: read into its own mapping
    small = torch.arange(10)
    path = save_model(tmp_path / "m.safetensors", {"x": 1}, {"big": big, "bigger": bigger, "small": small})
    config, arrays = load_model(path)
    reference = load_file(str(path))
    assert config == {"x": 1} and set(arrays) == set(reference)
    for name, t in arrays.items():
        assert t.dtype == reference[name].dtype and torch.equal(t, reference[name])
    if sys.platform.startswith("linux"):
        assert arrays["bigger"].data_ptr() % hugepages.HUGE_PAGE == 0
