"""Node Gaussians: closed-form checks against numpy, the empty/one-member rule, Mahalanobis."""

import numpy as np
import pytest
import torch

from somad.som.batching import padded_groups
from somad.som.node_stats import fit_node_gaussians, mahalanobis


def _whitened_to_cov(w):
    inv = np.linalg.inv(w.astype(np.float64))  # W = L^{-1}  ->  Sigma = L L^T
    return inv @ inv.T


def test_padded_groups_cover_every_row_once():
    g = torch.tensor([3, 0, 3, 3, 1, 0, 3, 3, 3], dtype=torch.long)
    seen = []
    for ids, rows, valid in padded_groups(g, 5, max_elements=8):
        assert rows.shape == valid.shape
        assert rows.shape[1] == int(valid.sum(1).max())  # padded to the largest group of the block
        for gid, r, v in zip(ids.tolist(), rows, valid):
            members = r[v].tolist()
            assert all(int(g[m]) == gid for m in members)
            assert (r[~v] == len(g)).all()
            seen.extend(members)
    assert sorted(seen) == list(range(len(g)))


def test_node_covariance_equals_numpy_cov_plus_eps():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 5)).astype(np.float32) * np.array([1, 2, 3, 0.5, 1], np.float32)
    assign = rng.integers(0, 4, size=300)
    protos = torch.zeros(4, 5)
    g = fit_node_gaussians(torch.from_numpy(x), torch.from_numpy(assign), protos, eps=0.01)
    for i in range(4):
        members = x[assign == i].astype(np.float64)
        np.testing.assert_allclose(g.means[i].numpy(), members.mean(0), rtol=1e-5, atol=1e-6)
        expected = np.cov(members, rowvar=False) + 0.01 * np.eye(5)
        np.testing.assert_allclose(_whitened_to_cov(g.whiteners[i].numpy()), expected, rtol=1e-4, atol=1e-5)
    assert g.counts.tolist() == [int((assign == i).sum()) for i in range(4)]


def test_mahalanobis_matches_direct_numpy():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(400, 6)).astype(np.float32)
    assign = rng.integers(0, 5, size=400)
    g = fit_node_gaussians(torch.from_numpy(x), torch.from_numpy(assign), torch.zeros(5, 6), eps=0.05)
    q = rng.normal(size=(50, 6)).astype(np.float32) * 2
    nodes = rng.integers(0, 5, size=(50, 3))
    got = mahalanobis(torch.from_numpy(q), torch.from_numpy(nodes), g).numpy()
    for n in range(50):
        for j in range(3):
            i = nodes[n, j]
            members = x[assign == i].astype(np.float64)
            cov = np.cov(members, rowvar=False) + 0.05 * np.eye(6)
            diff = q[n] - members.mean(0)
            expected = np.sqrt(diff @ np.linalg.solve(cov, diff))
            assert got[n, j] == pytest.approx(expected, rel=1e-4)


def test_empty_and_one_member_nodes_follow_the_rule():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(61, 3)).astype(np.float32)
    assign = np.zeros(61, dtype=np.int64)
    assign[:30] = 0
    assign[30:60] = 1
    assign[60] = 2  # node 2: one member; node 3: empty
    protos = torch.tensor(np.arange(12, dtype=np.float32).reshape(4, 3))
    g = fit_node_gaussians(torch.from_numpy(x), torch.from_numpy(assign), protos, eps=0.01)
    assert g.counts.tolist() == [30, 30, 1, 0]
    assert g.empty.tolist() == [False, False, False, True]
    for t in (g.means, g.whiteners, g.shifts):
        assert torch.isfinite(t).all()  # no NaN, ever
    # pooled within-node covariance over the nodes with >= 2 members
    scatter = sum(
        (x[assign == i] - x[assign == i].mean(0)).T.astype(np.float64) @ (x[assign == i] - x[assign == i].mean(0))
        for i in (0, 1)
    )
    pooled = scatter / (29 + 29) + 0.01 * np.eye(3)
    np.testing.assert_allclose(g.means[2].numpy(), x[60], rtol=1e-6)  # one member: mean = the member
    np.testing.assert_allclose(_whitened_to_cov(g.whiteners[2].numpy()), pooled, rtol=1e-4)
    np.testing.assert_allclose(g.means[3].numpy(), protos[3].numpy())  # empty: mean = prototype
    np.testing.assert_allclose(_whitened_to_cov(g.whiteners[3].numpy()), pooled, rtol=1e-4)


def test_all_nodes_tiny_falls_back_to_eps_identity():
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    g = fit_node_gaussians(x, torch.tensor([0, 1]), torch.zeros(3, 2), eps=0.5)
    np.testing.assert_allclose(_whitened_to_cov(g.whiteners[0].numpy()), 0.5 * np.eye(2), rtol=1e-5)


def test_singular_covariance_at_eps_zero_is_still_invertible():
    # 3 members in 8 dimensions: rank-2 scatter, singular without a ridge.
    rng = np.random.default_rng(3)
    x = torch.from_numpy(rng.normal(size=(3, 8)).astype(np.float32))
    g = fit_node_gaussians(x, torch.zeros(3, dtype=torch.long), torch.zeros(1, 8), eps=0.0)
    d = mahalanobis(
        torch.from_numpy(rng.normal(size=(5, 8)).astype(np.float32)), torch.zeros(5, 1, dtype=torch.long), g
    )
    assert torch.isfinite(g.whiteners).all() and torch.isfinite(d).all()


def test_row_blocks_cover_the_rows():
    from somad.som.node_stats import row_blocks

    for d in (1, 2, 3, 5, 37, 176, 550):
        b = row_blocks(d)
        assert b[0][0] == 0 and b[-1][1] == d and len(b) == min(4, d)
        assert all(hi == lo2 for (_, hi), (lo2, _) in zip(b[:-1], b[1:]))


def _whitening_case(d: int, seed: int = 4):
    """Many nodes of varied size; queries whose first two nodes are the same (a node repeated within a row)."""
    rng = np.random.default_rng(seed)
    x = torch.from_numpy(rng.normal(size=(3000, d)).astype(np.float32))
    assign = torch.from_numpy(rng.integers(0, 90, size=3000))
    g = fit_node_gaussians(x, assign, torch.zeros(90, d), eps=0.01)
    q = torch.from_numpy(rng.normal(size=(700, d)).astype(np.float32))
    nodes = torch.from_numpy(rng.integers(0, 90, size=(700, 5)))
    nodes[:, 1] = nodes[:, 0]
    return g, q, nodes


def _dense_reference(g, q, nodes):
    dense = g.whiteners
    assert torch.equal(torch.triu(dense, 1), torch.zeros_like(dense))
    return torch.einsum("nkij,nkj->nki", dense[nodes].double(), (q[:, None, :] - g.means[nodes]).double()).norm(dim=-1)


# Around the kernel's 16-row strips (8 floats per register): one short strip, exactly one, one row more,
# several with a short last one; ~39 vectors per node, so whitening blocks of every size 1..6 occur.
@pytest.mark.parametrize("d", [1, 5, 8, 16, 17, 24, 37, 48])
def test_native_kernel_equals_the_dense_whitening(native, d):
    g, q, nodes = _whitening_case(d)
    np.testing.assert_allclose(
        mahalanobis(q, nodes, g).numpy(), _dense_reference(g, q, nodes).numpy(), rtol=1e-4, atol=1e-4
    )


def test_torch_path_equals_the_dense_whitening():
    """37 dims: uneven row blocks; small steps: several node groups and element chunks."""
    from somad.som.node_stats import mahalanobis_torch

    g, q, nodes = _whitening_case(37)
    got = mahalanobis_torch(q, nodes, g, max_nodes=7, max_elements=500)
    np.testing.assert_allclose(got.numpy(), _dense_reference(g, q, nodes).numpy(), rtol=1e-4, atol=1e-4)


def test_packed_triangles_round_trip_and_give_the_row_blocks():
    from somad.som.node_stats import NodeGaussians

    rng = np.random.default_rng(4)
    x = torch.from_numpy(rng.normal(size=(2000, 37)).astype(np.float32))
    g = fit_node_gaussians(x, torch.from_numpy(rng.integers(0, 30, size=2000)), torch.zeros(30, 37), eps=0.01)
    dense = g.whiteners
    for (lo, hi), block in zip(g.bounds, g.blocks):
        assert torch.equal(block, dense[:, lo:hi, :hi])
    torch.testing.assert_close(g.shifts, torch.einsum("mij,mj->mi", dense, g.means))
    back = NodeGaussians.from_arrays(g.means, g.packed, g.counts)
    assert torch.equal(back.packed, g.packed) and torch.equal(back.whiteners, dense)
    with pytest.raises(ValueError, match="expected"):
        NodeGaussians.from_arrays(g.means, g.packed[:, :-1], g.counts)


def test_whiteners_are_packed_in_strips_and_old_row_packing_converts():
    from somad._native.layout import packed_size, strip_layout, strips_from_rows

    rows, cols, pos = strip_layout(18)  # two strips: rows 0-15 (columns 0-15), rows 16-17 (columns 0-17)
    assert packed_size(18) == 16 * 16 + 16 * 18 == int(pos.max()) + 1 + 14  # the last column's rows 18-31 are padding
    assert pos[(rows == 0) & (cols == 0)].item() == 0 and pos[(rows == 15) & (cols == 0)].item() == 15
    assert pos[(rows == 1) & (cols == 1)].item() == 17 and pos[(rows == 16) & (cols == 0)].item() == 256
    assert pos[(rows == 17) & (cols == 17)].item() == 256 + 17 * 16 + 1
    assert len(set(pos.tolist())) == 18 * 19 // 2
    g, _, _ = _whitening_case(19)
    dense = g.whiteners
    rows, cols, pos = strip_layout(19)
    assert torch.equal(g.packed[:, pos], dense[:, rows, cols])
    padding = torch.ones(packed_size(19), dtype=torch.bool)
    padding[pos] = False
    assert not g.packed[:, padding].any()  # above the diagonal and past the last row: zeros
    tr, tc = torch.tril_indices(19, 19)
    by_rows = dense[:, tr, tc]  # the row-by-row packing of model files of format version 1
    assert torch.equal(strips_from_rows(by_rows, chunk=7), g.packed)
    with pytest.raises(ValueError, match="not a packed triangle"):
        strips_from_rows(torch.zeros(2, 7))


def test_scoring_rejects_node_indices_and_widths_out_of_range():
    rng = np.random.default_rng(4)
    x = torch.from_numpy(rng.normal(size=(200, 5)).astype(np.float32))
    g = fit_node_gaussians(x, torch.from_numpy(rng.integers(0, 4, size=200)), torch.zeros(4, 5), eps=0.01)
    with pytest.raises(ValueError, match="node indices must be in"):
        mahalanobis(x[:3], torch.tensor([[0], [4], [1]]), g)
    with pytest.raises(ValueError, match="vectors have 6 features, the node Gaussians 5"):
        mahalanobis(torch.zeros(3, 6), torch.zeros(3, 1, dtype=torch.long), g)


def test_member_chunking_does_not_change_the_statistics():
    """A node with more members than one pass may hold (max_elements) is accumulated over several passes."""
    rng = np.random.default_rng(5)
    x = torch.from_numpy(rng.normal(size=(2000, 9)).astype(np.float16))
    assign = torch.from_numpy(np.where(rng.random(2000) < 0.8, 0, rng.integers(1, 6, size=2000)))
    whole = fit_node_gaussians(x, assign, torch.zeros(6, 9), eps=0.01)
    parts = fit_node_gaussians(x, assign, torch.zeros(6, 9), eps=0.01, max_elements=9 * 50)
    assert int(whole.counts[0]) > 1500
    torch.testing.assert_close(whole.packed, parts.packed, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(whole.means, parts.means)


def _float16_case():
    rng = np.random.default_rng(6)
    x = torch.from_numpy(rng.normal(size=(3000, 21)).astype(np.float32))
    assign = torch.from_numpy(rng.integers(0, 40, size=3000))
    g32 = fit_node_gaussians(x, assign, torch.zeros(40, 21), eps=0.01)
    g16 = fit_node_gaussians(x, assign, torch.zeros(40, 21), eps=0.01, dtype=torch.float16)
    assert g16.packed.dtype == torch.float16 and all(b.dtype == torch.float16 for b in g16.blocks)
    q = torch.from_numpy(rng.normal(size=(500, 21)).astype(np.float32))
    nodes = torch.from_numpy(rng.integers(0, 40, size=(500, 3)))
    return g16, q, nodes, _dense_reference(g32, q, nodes).float()


def test_float16_factors_score_like_float32_native(native):
    g16, q, nodes, ref = _float16_case()
    d16 = mahalanobis(q, nodes, g16)  # the kernel reads the float16 triangles in place
    assert d16.dtype == torch.float32
    torch.testing.assert_close(d16, ref, rtol=3e-3, atol=1e-3)


def test_float16_factors_score_like_float32_torch_and_round_trip():
    from somad.som.node_stats import NodeGaussians, mahalanobis_torch

    g16, q, nodes, ref = _float16_case()
    d16 = mahalanobis_torch(q, nodes, g16, max_nodes=5)  # the float16 triangles are widened a few nodes at a time
    assert d16.dtype == torch.float32
    torch.testing.assert_close(d16, ref, rtol=3e-3, atol=1e-3)
    back = NodeGaussians.from_arrays(g16.means, g16.packed, g16.counts)
    assert torch.equal(back.packed, g16.packed)


def test_float16_factor_overflow_keeps_the_factors_in_float32(caplog):
    """Spread ~1e-6 (eps ~0): factor entries ~1e6 > float16's max. The fit keeps float32 factors, says so,
    and scores as a float32 fit does; a single overflowing group switches the whole array."""
    rng = np.random.default_rng(7)
    wide = torch.from_numpy(rng.normal(size=(40, 2)).astype(np.float32))
    narrow = torch.tensor([[0.0, 0.0], [1e-6, 0.0], [0.0, 1e-6]])
    x = torch.cat([wide, narrow])
    assign = torch.cat([torch.zeros(40, dtype=torch.long), torch.ones(3, dtype=torch.long)])
    with caplog.at_level("WARNING", logger="somad.som.node_stats"):  # max_elements=4: one node per group
        g = fit_node_gaussians(x, assign, torch.zeros(2, 2), eps=1e-12, dtype=torch.float16, max_elements=4)
    assert g.packed.dtype == torch.float32 and "overflow float16" in caplog.text
    ref = fit_node_gaussians(x, assign, torch.zeros(2, 2), eps=1e-12)
    torch.testing.assert_close(g.packed, ref.packed, rtol=1e-3, atol=0)  # node 0 went through float16 first
    q, nodes = x[:5], torch.tensor([[0, 1]] * 5)
    assert torch.isfinite(mahalanobis(q, nodes, g)).all()
    torch.testing.assert_close(mahalanobis(q, nodes, g), mahalanobis(q, nodes, ref), rtol=1e-3, atol=1e-3)


def test_native_kernel_entry_points_check_what_the_c_code_trusts(native):
    from somad._native import kernels

    x, means, packed = np.zeros((4, 3), np.float32), np.zeros((2, 3), np.float32), np.zeros((2, 48), np.float32)
    nodes = np.array([[0, 1], [1, 1], [0, 0], [1, 0]])
    assert kernels.whitened_sq_norms(x, nodes, means, packed).shape == (4, 2)
    for bad, match in [
        ((x.astype(np.float64), nodes, means, packed), "x must be a C-contiguous float32"),
        ((x, nodes[:3], means, packed), r"nodes has shape \(3, 2\), expected \(4, any\)"),
        ((x, nodes.astype(np.int32), means, packed), "nodes must be a C-contiguous int64"),
        ((x, nodes + 1, means, packed), r"node indices must be in \[0, 2\)"),
        ((x, nodes - 1, means, packed), r"node indices must be in \[0, 2\)"),
        ((x, nodes, means[:1], packed), r"packed has shape \(2, 48\), expected \(1, 48\)"),
        ((x, nodes, means, packed[:, :6].copy()), r"packed has shape \(2, 6\), expected \(2, 48\)"),
        ((x, nodes, means, packed.astype(np.float64)), "packed must be float32 or float16"),
        ((x[:, :2], nodes, means[:, :2], packed), "x must be a C-contiguous float32 array, got a non-contiguous"),
    ]:
        with pytest.raises(ValueError, match=match):
            kernels.whitened_sq_norms(*bad)


def test_shrinkage_toward_the_pooled_within_node_covariance():
    """shrinkage a: cov_i = (1 - a) cov(G_i) + a P + eps I, with P the pooled within-node covariance."""
    from somad.som.node_stats import _pooled_covariance, fit_node_gaussians

    gen = torch.Generator().manual_seed(3)
    d, m = 6, 5
    x = torch.randn(400, d, generator=gen) * torch.linspace(0.5, 3, d) + 7
    assignment = torch.randint(0, m, (400,), generator=gen)
    assignment[assignment == 4] = 3  # node 4 empty
    members = [x[assignment == i].double() for i in range(m)]
    scatter = [(g - g.mean(0)).T @ (g - g.mean(0)) for g in members if len(g)]
    pooled = sum(scatter) / sum(len(g) - 1 for g in members if len(g))
    counts = torch.bincount(assignment, minlength=m)
    means = torch.stack([g.mean(0) if len(g) else torch.zeros(d, dtype=torch.float64) for g in members])
    assert torch.allclose(_pooled_covariance(x, counts, means), pooled, rtol=1e-5, atol=1e-5)
    a, eps = 0.3, 0.01
    g = fit_node_gaussians(x, assignment, torch.zeros(m, d), eps, shrinkage=a)
    probe = torch.randn(4, d, generator=gen) + 7
    for i in range(4):
        cov = (1 - a) * torch.cov(members[i].T) + a * pooled + eps * torch.eye(d, dtype=torch.float64)
        diff = probe.double() - members[i].mean(0)
        expected = (diff @ torch.linalg.solve(cov, diff.T)).diagonal().sqrt()
        got = mahalanobis(probe, torch.full((4, 1), i), g)[:, 0]
        assert torch.allclose(got.double(), expected, rtol=1e-4), i
