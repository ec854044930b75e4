"""Batch SOM: schedule, initialisation, neighbourhood preservation, nearest-node search."""

import numpy as np
import pytest
import torch

from somad.errors import SomadError
from somad.som.node_search import nearest_nodes
from somad.som.training import LocalReducer, SelfOrganizingMap, radius_schedule, split_rows, subsample_rows


def test_radius_schedule_follows_the_paper():
    r = radius_schedule(56, 20, 15)
    assert len(r) == 35
    assert r[0] == pytest.approx(56 / 3) and r[19] == pytest.approx(56 / 18)
    assert r[20] == pytest.approx(56 / 12) and r[-1] == pytest.approx(1.0)
    assert np.all(np.diff(r[:20]) < 0) and np.all(np.diff(r[20:]) < 0)


def test_position_mean_init_is_identity_on_a_matching_grid():
    means = torch.randn(7, 7, 3)
    init = SelfOrganizingMap.position_mean_init(means, 7)
    assert torch.equal(init, means.reshape(49, 3))


def test_position_mean_init_resamples_corners_exactly():
    means = torch.randn(9, 9, 2)
    init = SelfOrganizingMap.position_mean_init(means, 5).view(5, 5, 2)
    for (a, b), (c, d) in [((0, 0), (0, 0)), ((0, 4), (0, 8)), ((4, 0), (8, 0)), ((4, 4), (8, 8)), ((2, 2), (4, 4))]:
        assert torch.allclose(init[a, b], means[c, d], atol=1e-6)


def test_nearest_nodes_matches_brute_force_and_excludes():
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.normal(size=(500, 4)).astype(np.float32))
    w = torch.from_numpy(rng.normal(size=(30, 4)).astype(np.float32))
    exclude = torch.zeros(30, dtype=torch.bool)
    exclude[[0, 5, 7]] = True
    d, idx = nearest_nodes(x, w, 3, exclude=exclude, chunk_size=64)
    full = ((x[:, None, :] - w[None]) ** 2).sum(-1)
    full[:, exclude] = float("inf")
    ref_d, ref_i = torch.topk(full, 3, largest=False)
    assert torch.equal(idx, ref_i)
    assert torch.allclose(d, ref_d, rtol=1e-4, atol=1e-4)
    assert not exclude[idx].any()


def test_som_on_2d_data_preserves_neighbourhoods():
    """A 10x10 map of the uniform unit square is ordered: topographic error below 5%, and grid neighbours
    lie close together in data space while distant nodes lie far apart."""
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.random((4000, 2)).astype(np.float32))
    init = torch.full((100, 2), 0.5) + 0.01 * torch.randn(100, 2, generator=torch.Generator().manual_seed(0))
    som = SelfOrganizingMap(size=10, rough_epochs=20, fine_epochs=15, max_samples=None).fit(x, init)
    assert som.topographic_error_ < 0.05
    assert som.quantization_error_ < 0.08  # a 10x10 lattice of the unit square: mean distance ~0.04
    grid = som.weights_.view(10, 10, 2)
    neighbour = (grid[1:, :] - grid[:-1, :]).norm(dim=-1).mean()
    far = (grid[:, None].reshape(-1, 2)[:, None] - grid.reshape(-1, 2)[None]).norm(dim=-1)
    rows, cols = torch.meshgrid(torch.arange(10), torch.arange(10), indexing="ij")
    gd = torch.maximum(
        (rows.reshape(-1, 1) - rows.reshape(1, -1)).abs(), (cols.reshape(-1, 1) - cols.reshape(1, -1)).abs()
    )
    assert neighbour < 0.15
    assert far[gd >= 5].mean() > 3 * neighbour


def test_som_is_deterministic_and_rejects_tiny_grids():
    x = torch.randn(300, 3, generator=torch.Generator().manual_seed(1))
    init = torch.zeros(16, 3)
    a = SelfOrganizingMap(size=4, rough_epochs=3, fine_epochs=2, max_samples=200, seed=3).fit(x, init).weights_
    b = SelfOrganizingMap(size=4, rough_epochs=3, fine_epochs=2, max_samples=200, seed=3).fit(x, init).weights_
    assert torch.equal(a, b)
    with pytest.raises(SomadError, match="at least 2"):
        SelfOrganizingMap(size=1).fit(x, torch.zeros(1, 3))


@pytest.mark.parametrize("search", ["exact", "ivf"])
def test_a_map_trained_from_two_shards_is_the_local_map_bit_for_bit(search):
    """The oracle that keeps a local and a distributed fit one: a reducer over two shards of the samples (here in
    this process; a Ray fit's actors each hold one) trains exactly the map that the samples held together train.
    The subset draw, the epoch rule and the errors are the map's; only the per-shard sums and counts travel."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(6000, 12, generator=g).half()
    init = 0.1 * torch.randn(1024, 12, generator=g)  # 32 x 32 nodes: "ivf" builds its inverted-file index

    def som():
        return SelfOrganizingMap(size=32, rough_epochs=3, fine_epochs=2, max_samples=4000, seed=2, search=search)

    local = som().fit(x, init)
    assert not torch.equal(local.weights_, init)
    for cut in (1, 2500):
        sharded = som().fit(LocalReducer([x[:cut], x[cut:]]), init)
        assert torch.equal(sharded.weights_, local.weights_)
        assert sharded.n_samples_ == local.n_samples_ == 4000
        assert sharded.topographic_error_ == local.topographic_error_
        # the same BMUs; their distances may round differently where BLAS splits a chunk of rows elsewhere
        assert sharded.quantization_error_ == pytest.approx(local.quantization_error_, rel=1e-6)


def test_the_subset_draw_splits_over_contiguous_shards():
    keep = subsample_rows(1000, 300, seed=4)
    assert keep.shape == (300,) and torch.equal(keep, keep.sort().values) and keep.unique().numel() == 300
    parts = split_rows(keep, [250, 0, 750])
    assert torch.equal(torch.cat([parts[0], parts[1] + 250, parts[2] + 250]), keep)
    assert int(parts[0].max()) < 250 and parts[1].numel() == 0 and int(parts[2].max()) < 750
    assert subsample_rows(300, 300, seed=4) is None and split_rows(None, [3, 4]) == [None, None]
