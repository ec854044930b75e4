"""Coarse-to-fine nearest-node search: exact when every cluster is probed, high recall on a trained map,
exclusions respected, and a clear error for a bad choice."""

import numpy as np
import pytest
import torch

from somad.som.node_search import SEARCHES, IVFSearch, make_search, nearest_nodes
from somad.som.training import SelfOrganizingMap


@pytest.fixture(scope="module")
def trained_map():
    """A 32x32 SOM (1024 nodes) of data on a curved 2-D sheet embedded in 24 dimensions, plus noise."""
    rng = np.random.default_rng(0)
    uv = rng.random((20000, 2))
    basis = rng.normal(size=(6, 24))
    feats = np.concatenate([uv, np.sin(3 * uv), np.cos(2 * uv)], axis=1) @ basis
    x = torch.from_numpy((feats + 0.05 * rng.normal(size=feats.shape)).astype(np.float32))
    init = SelfOrganizingMap.position_mean_init(x[:1024].reshape(32, 32, 24), 32)
    som = SelfOrganizingMap(size=32, rough_epochs=8, fine_epochs=6, max_samples=None).fit(x, init)
    queries = x[torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(1))[:3000]]
    return som.weights_, queries


def test_probing_every_cluster_is_exact(trained_map):
    w, q = trained_map
    index = IVFSearch(w, 32, nprobe=10_000)
    assert index.nprobe == index.nlist
    d, i = index.search(q, 4)
    ref_d, ref_i = nearest_nodes(q, w, 4)
    assert_same_neighbours(q, w, d, i, ref_d, ref_i)


def assert_same_neighbours(q, w, d, i, ref_d, ref_i):
    """The same k nearest nodes as the exhaustive search, up to near-ties, which summation order may swap:
    at every rank the returned node is as near as the exhaustive one."""
    assert float((i == ref_i).double().mean()) >= 0.999
    true = ((q[:, None, :] - w[i]) ** 2).sum(-1)
    torch.testing.assert_close(true, ref_d, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(d, ref_d, rtol=1e-4, atol=1e-3)


# Lists of at most 8 and longer; clusters ranked in full (24 dims) and on 6 principal axes.
@pytest.mark.parametrize(
    "nprobe, k, coarse_dims", [(1, 1, None), (3, 4, 6), (8, 4, None), (8, 4, 6), (8, 9, 6), (20, 5, None)]
)
def test_native_and_torch_probing_agree(trained_map, native, nprobe, k, coarse_dims):
    w, q = trained_map
    index = IVFSearch(w, 32, nprobe=nprobe, coarse_dims=coarse_dims)
    assert index.coarse_dims == coarse_dims
    coarse = index.coarse(q)
    d, i = index.search(q, k)
    ref_d, ref_i = index._probe_torch(q, coarse, k)
    assert_same_neighbours(q, w, d, i, ref_d, ref_i)


@pytest.mark.parametrize("d", [3, 13, 40])  # fewer than, not a multiple of, and a multiple of the 8 SIMD lanes
def test_native_probing_of_every_cluster_is_exact_for_any_width(native, d):
    rng = np.random.default_rng(d)
    w = torch.from_numpy(rng.normal(size=(1024, d)).astype(np.float32))
    q = torch.from_numpy(rng.normal(size=(500, d)).astype(np.float32))
    exclude = torch.from_numpy(rng.random(1024) < 0.2)
    for coarse_dims in (None, 2):  # probing every cluster is exact however they are ranked
        d_all, i_all = IVFSearch(w, 32, exclude=exclude, nprobe=10_000, coarse_dims=coarse_dims).search(q, 3)
        assert_same_neighbours(q, w, d_all, i_all, *nearest_nodes(q, w, 3, exclude=exclude))


@pytest.mark.parametrize("coarse_dims", [None, 6])  # the map lies on a 6-d subspace: 6 axes rank the clusters as well
def test_default_probes_find_the_true_nearest_nodes(trained_map, coarse_dims):
    w, q = trained_map
    index = IVFSearch(w, 32, coarse_dims=coarse_dims)
    assert 40 <= index.nlist <= 64  # about one cluster per 4x4 block of the grid
    assert index.members_.shape[0] == index.nlist
    d, i = index.search(q, 4, chunk_size=700)
    ref_d, ref_i = nearest_nodes(q, w, 4)
    top1 = float((i[:, 0] == ref_i[:, 0]).double().mean())
    assert top1 >= 0.97, top1
    assert (d[:, 1:] >= d[:, :-1]).all()  # ascending
    # Every returned distance is the true distance to the returned node.
    true = ((q[:, None, :] - w[i]) ** 2).sum(-1)
    assert torch.allclose(d, true, rtol=1e-3, atol=1e-2)
    # An approximate neighbour is never closer than the exact one.
    assert (d[:, 0] >= ref_d[:, 0] - 1e-2).all()


def test_excluded_nodes_are_never_returned(trained_map):
    w, q = trained_map
    exclude = torch.zeros(w.shape[0], dtype=torch.bool)
    exclude[::3] = True
    _, i = IVFSearch(w, 32, exclude=exclude).search(q, 5)
    assert not exclude[i].any()
    d_all, i_all = IVFSearch(w, 32, exclude=exclude, nprobe=10_000).search(q, 5)
    assert_same_neighbours(q, w, d_all, i_all, *nearest_nodes(q, w, 5, exclude=exclude))


def test_k_larger_than_the_probed_clusters_falls_back_to_exact(trained_map):
    w, q = trained_map
    index = IVFSearch(w, 32, nprobe=1)
    k = index.min_size_ + 1
    assert torch.equal(index.search(q[:50], k)[1], nearest_nodes(q[:50], w, k)[1])


def test_make_search_choices():
    w = torch.randn(100, 3)
    x = torch.randn(20, 3)
    # A small map is searched exhaustively even when "ivf" is asked.
    assert torch.equal(make_search(w, 10, "ivf")(x, 2)[1], nearest_nodes(x, w, 2)[1])
    with pytest.raises(ValueError, match="choose one of: ivf, exact"):
        make_search(w, 10, "approx")


def test_native_probing_with_very_unequal_clusters(native):
    """700 of 1024 nodes crowd one spot, so one cluster is far larger than the rest (rows are padded to it):
    native and torch probing agree, and probing every cluster is exact."""
    rng = np.random.default_rng(11)
    w = np.concatenate([rng.normal(size=(700, 12)) * 0.01, rng.normal(size=(324, 12)) * 3]).astype(np.float32)
    w = torch.from_numpy(w[rng.permutation(1024)])
    q = torch.from_numpy(rng.normal(size=(800, 12)).astype(np.float32))
    index = IVFSearch(w, 32, nprobe=4)
    assert index.members_.shape[1] > 4 * 1024 / index.nlist  # the widest cluster, well above the mean
    coarse = index.coarse(q)
    assert_same_neighbours(q, w, *index.search(q, 3), *index._probe_torch(q, coarse, 3))
    every = IVFSearch(w, 32, nprobe=10_000)
    assert_same_neighbours(q, w, *every.search(q, 3), *nearest_nodes(q, w, 3))


def test_search_fills_one_preallocated_result_across_chunks(trained_map, native):
    """Chunks write into rows of one result (no per-chunk arrays to concatenate); a wrong ``out`` is refused."""
    from somad._native import kernels

    w, q = trained_map
    index = IVFSearch(w, 32)
    d_all, i_all = index.search(q, 4)
    d_chunked, i_chunked = index.search(q, 4, chunk_size=333)
    assert torch.equal(i_all, i_chunked) and torch.equal(d_all, d_chunked)
    centres, centre_sq, panels, lane_start, lane_ids, lane_sq, _ = index._panels
    args = (q.numpy(), centres, centre_sq, index.nprobe, panels, lane_start, lane_ids, lane_sq, 4)
    with pytest.raises(ValueError, match=r"out\[1\] has shape \(3000, 3\), expected \(3000, 4\)"):
        kernels.probe_nearest(*args, pad=1024, out=(np.empty((3000, 4), np.float32), np.empty((3000, 3), np.int64)))


def test_warm_start_reuses_the_previous_clusters_and_axes(trained_map):
    """The SOM's epochs build each index from the previous one: two k-means steps refresh its clusters, the
    principal axes are kept, and the search is as good as a fresh index's."""
    w, q = trained_map
    cold = IVFSearch(w, 32, coarse_dims=6)
    moved = w + 0.02 * torch.randn(w.shape, generator=torch.Generator().manual_seed(3))
    warm = IVFSearch(moved, 32, coarse_dims=6, warm_start=cold)
    assert warm._axes is cold._axes  # no new SVD
    assert int((warm.labels_ != cold.labels_).sum()) < 100  # refreshed, not rebuilt
    ref_i = nearest_nodes(q, moved, 1)[1]
    assert float((warm.search(q, 1)[1] == ref_i).double().mean()) >= 0.97
    # An index over other nodes (another exclusion) cannot start this one: it is ignored.
    exclude = torch.zeros(1024, dtype=torch.bool)
    exclude[:10] = True
    other = IVFSearch(moved, 32, coarse_dims=6, exclude=exclude, warm_start=cold)
    assert other._axes is not cold._axes and other.labels_.shape == (1014,)


def test_queries_projected_once_serve_later_warm_started_indices(trained_map):
    """The SOM projects its samples once; every epoch's index (warm-started, the same axes) takes them. A
    projection on other axes is ignored rather than misused."""
    w, q = trained_map
    first = IVFSearch(w, 32, coarse_dims=6)
    projected = first.project(q)
    moved = w + 0.02 * torch.randn(w.shape, generator=torch.Generator().manual_seed(5))
    later = IVFSearch(moved, 32, coarse_dims=6, warm_start=first)
    _, given = later.search(q, 2, projected=projected, chunk_size=700)
    _, computed = later.search(q, 2)
    assert float((given == computed).all(1).double().mean()) >= 0.99  # equal up to the rounding of the projection
    fresh = IVFSearch(moved, 32, coarse_dims=6)  # its own axes: the projection does not apply
    assert torch.equal(fresh.search(q, 2, projected=projected)[1], fresh.search(q, 2)[1])
    assert IVFSearch(w, 32, coarse_dims=None).project(q) is None


@pytest.mark.parametrize("name", list(SEARCHES))
def test_every_search_has_the_one_interface(trained_map, name):
    """Built by name from the registry, every index answers search(x, k, projected=...) and project(x)."""
    w, q = trained_map
    index = make_search(w, 32, name, nprobe=4)
    assert isinstance(index, SEARCHES[name])
    projected = index.project(q)
    sq, idx = index.search(q, 3, projected=projected)
    ref_sq, ref_idx = nearest_nodes(q, w, 3)
    assert sq.shape == idx.shape == (q.shape[0], 3)
    hit = (idx[:, 0] == ref_idx[:, 0]).float().mean()
    assert hit == 1.0 if name == "exact" else hit > 0.9
