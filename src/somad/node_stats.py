"""Per-node Gaussian statistics and Mahalanobis distances.

One responsibility: given vectors and the node each belongs to, fit one Gaussian per node and measure
Mahalanobis distances from vectors to chosen nodes.

The rule for every node ``i`` with ``n_i`` members (the training patches whose nearest node is ``i``):

* ``n_i >= 2``: mean = member mean, covariance = ``cov(G_i)`` (unbiased) ``+ eps * I`` (as the paper's code).
* ``n_i == 1``: mean = the member; covariance = the pooled within-node covariance ``+ eps * I``. One sample
  has no spread, so it borrows the map's average spread instead of the degenerate ``eps * I`` alone.
* ``n_i == 0``: the node is *empty*: it is excluded from the nearest-node search at scoring time. Its stored
  mean is its SOM prototype and its covariance the pooled one ``+ eps * I``, so no array holds NaN.

The pooled within-node covariance is ``sum_i S_i / sum_i (n_i - 1)`` over nodes with ``n_i >= 2`` (``S_i``
the scatter matrix); zero when there are none. Each covariance is stored as the inverse of its Cholesky
factor, ``W_i = L_i^{-1}``, so that ``d_i(x)^2 = ||W_i x - W_i mu_i||^2``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from .batching import padded_groups
from .errors import NumericalError

logger = logging.getLogger(__name__)


@dataclass
class NodeGaussians:
    """Gaussian per node, in whitened form.

    Attributes
    ----------
    means : tensor (M, D) float32
    whiteners : tensor (M, D, D) float32, lower triangular ``L_i^{-1}`` with ``Sigma_i = L_i L_i^T``
    shifts : tensor (M, D) float32, ``W_i mu_i``
    counts : tensor (M,) int64, members per node
    """

    means: torch.Tensor
    whiteners: torch.Tensor
    shifts: torch.Tensor
    counts: torch.Tensor

    @property
    def empty(self) -> torch.Tensor:
        """Bool (M,): nodes without members, excluded from scoring."""
        return self.counts == 0

    def to(self, device) -> "NodeGaussians":
        return NodeGaussians(*(t.to(device) for t in (self.means, self.whiteners, self.shifts, self.counts)))


def fit_node_gaussians(x: torch.Tensor, assignment: torch.Tensor, prototypes: torch.Tensor, eps: float,
                       *, max_elements: int = 1 << 24) -> NodeGaussians:
    """Fit the per-node Gaussians (see the module docstring for the rule).

    Parameters
    ----------
    x : tensor (N, D), any float dtype
    assignment : int64 tensor (N,), node of each vector
    prototypes : tensor (M, D), SOM weights (means of empty nodes)
    eps : float, >= 0
    """
    m, d = prototypes.shape
    device = prototypes.device
    assignment = assignment.to(device)
    counts = torch.bincount(assignment, minlength=m)
    sums = torch.zeros(m, d, dtype=torch.float64, device=device)
    for start in range(0, x.shape[0], 65536):
        sums.index_add_(0, assignment[start:start + 65536], x[start:start + 65536].to(device, torch.float64))
    means = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None], prototypes.double())

    whiteners = torch.zeros(m, d, d, dtype=torch.float32, device=device)
    pooled = torch.zeros(d, d, dtype=torch.float64, device=device)
    dof = 0
    eye = torch.eye(d, dtype=torch.float64, device=device)
    blocks = padded_groups(assignment, m, max_elements=max(1, max_elements // d), max_groups=max(1, max_elements // (d * d)))
    for ids, rows, valid in blocks:
        many = counts[ids] >= 2
        if not bool(many.any()):
            continue
        ids, rows, valid = ids[many], rows[many], valid[many]
        # Padding entries point one past the end: clamp them to a real row, then zero them with the mask.
        members = x[rows.clamp_max(x.shape[0] - 1).to(x.device)].to(device, torch.float64)
        centred = (members - means[ids][:, None, :]) * valid[..., None]
        scatter = centred.transpose(1, 2) @ centred  # (G, D, D) sum of outer products of centred members
        pooled += scatter.sum(0)
        dof += int((counts[ids] - 1).sum())
        cov = scatter / (counts[ids] - 1).double()[:, None, None] + eps * eye
        whiteners[ids] = _inverse_cholesky(cov).float()

    pooled = pooled / dof if dof else pooled
    few = counts < 2
    if bool(few.any()):
        whiteners[few] = _inverse_cholesky((pooled + eps * eye)[None]).float()
        logger.info("%d empty and %d one-member SOM nodes use the pooled covariance",
                    int((counts == 0).sum()), int((counts == 1).sum()))
    means = means.float()
    shifts = torch.einsum("mij,mj->mi", whiteners, means)
    if not (torch.isfinite(whiteners).all() and torch.isfinite(means).all()):
        raise NumericalError("non-finite node statistics (NaN/Inf in the training features?); check the input images")
    return NodeGaussians(means, whiteners, shifts, counts)


def _inverse_cholesky(cov: torch.Tensor) -> torch.Tensor:
    """``L^{-1}`` for a batch of SPD matrices ``(G, D, D)`` (float64).

    A matrix that is not numerically positive definite (eps = 0 with fewer members than dimensions) gets a
    growing ridge ``1e-10 * 10^t * mean(diag)`` until its Cholesky factorisation succeeds.
    """
    d = cov.shape[-1]
    eye = torch.eye(d, dtype=cov.dtype, device=cov.device)
    chol, info = torch.linalg.cholesky_ex(cov)
    scale = cov.diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(1e-12)
    ridge = 1e-10
    while bool((info > 0).any()):
        bad = info > 0
        chol[bad], info[bad] = torch.linalg.cholesky_ex(cov[bad] + (ridge * scale[bad])[:, None, None] * eye)
        ridge *= 10.0
    return torch.linalg.solve_triangular(chol, eye.expand_as(chol), upper=False)


def mahalanobis(x: torch.Tensor, nodes: torch.Tensor, gaussians: NodeGaussians, *,
                max_elements: int = 1 << 24) -> torch.Tensor:
    """Mahalanobis distances from vectors to chosen nodes.

    Parameters
    ----------
    x : tensor (N, D)
    nodes : int64 tensor (N, k), node indices per vector
    gaussians : NodeGaussians

    Returns
    -------
    tensor (N, k) float32, ``sqrt((x - mu)^T Sigma^{-1} (x - mu))``
    """
    n, k = nodes.shape
    d = x.shape[1]
    device = gaussians.means.device
    flat = nodes.reshape(-1).to(device)
    x_pad = torch.cat([x.to(device, torch.float32), torch.zeros(1, d, device=device)])
    out = torch.empty(n * k, dtype=torch.float32, device=device)
    # Pair j = (vector j // k, node flat[j]); grouping pairs by node lets each node whiten its vectors in one bmm.
    pair_vector = torch.cat([torch.arange(n * k, device=device) // k, torch.tensor([n], device=device)])
    for ids, rows, valid in padded_groups(flat, gaussians.means.shape[0], max_elements=max(1, max_elements // d)):
        z = x_pad[pair_vector[rows]] @ gaussians.whiteners[ids].transpose(1, 2) - gaussians.shifts[ids][:, None, :]
        out[rows[valid]] = (z * z).sum(-1)[valid]
    return out.view(n, k).clamp_min_(0.0).sqrt_()
