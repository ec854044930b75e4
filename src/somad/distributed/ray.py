"""Ray: batch scoring over an actor pool, and SOMAD fits sharded over workers.

Scoring (:func:`ray_predictions`): a Ray Data pipeline of image paths, ``map_batches`` over a fixed pool of
actors that each load the model file once and return, per image, its score, input-gate status, size and
float32 map at the model input (or the read error). The driver turns these back into
:class:`~somad.methods.base.Prediction` objects and writes every output through the very code local ``predict``
uses (``somad.io.outputs.write_predictions``), so the files are the same. Actors restart when their process dies
and their batches are retried (``max_restarts``/``max_task_retries``); the driver keeps the first result of
each image and checks at the end that every image has exactly one, so none is lost or written twice.

Fitting (:func:`ray_fit`): the training images are cut into contiguous shards, one per actor; each actor extracts
its shard's patches and keeps them (in ``feature_dtype``). No process holds all training patches. The driver
initialises the SOM from the reduced per-position sums, picks the SOM's training subset by the same seeded draw
as a local fit, and runs each epoch as per-shard best-matching-unit sums and counts (``M x D`` and ``M`` floats
per shard) reduced and smoothed on the driver. Node statistics are per-shard :class:`NodeMoments` merged by
Chan's formula (``somad.som.node_stats``). The thresholds are set on the driver from the held-out images, as
in a local fit. Workers read the model file and the images by path: on a cluster, a shared file system (or the
same paths on every node).
"""

from __future__ import annotations

import logging
import os
import types
import warnings
from pathlib import Path

import numpy as np
import torch

from somad.errors import ImageLoadError, SomadError

logger = logging.getLogger(__name__)


def _tensor(a) -> torch.Tensor:
    """A writable tensor copy of an array from Ray's object store (those arrays are read-only views)."""
    return torch.from_numpy(np.array(a))


INSTALL = 'Ray is not installed; pip install "somad[ray]" to use --ray'


def require_ray():
    """The ``ray`` module, or a one-line :class:`SomadError` saying how to install it."""
    try:
        import ray
        import ray.data  # noqa: F401  (the [data] extra)
    except ImportError:
        raise SomadError(INSTALL) from None
    return ray


def connect(address: str | None = None):
    """Connect to Ray once per process: ``None`` or ``"local"`` starts (or joins, with ``RAY_ADDRESS``) a local
    instance, ``"auto"`` joins the running cluster, anything else is a cluster address (``ray://host:10001``)."""
    ray = require_ray()
    if not ray.is_initialized():
        target = None if address in (None, "", "local") else address
        try:
            ray.init(address=target, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            reason = " ".join(str(exc).split())[:120]
            raise SomadError(f"cannot connect to Ray at {address or 'a local instance'} ({reason})") from None
    return ray


def default_workers(ray, cpus_per_worker: float = 1.0) -> int:
    return max(1, int(ray.cluster_resources().get("CPU", 1) // cpus_per_worker))


# ----------------------------------------------------------------------------------------- scoring
class _Scorer:
    """One actor of the scoring pool: loads the model once, scores batches of image paths."""

    def __init__(self, model_path: str, device: str | None, search: str | None, batch_size: int, crash_marker=None):
        from somad.methods import load

        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1") or 1)))
        self.model = load(model_path, device=device, search=search)
        self.model.batch_size = batch_size
        self.crash_marker = crash_marker  # tests: the first call in the cluster kills its actor's process

    def __call__(self, batch: dict) -> dict:
        from somad.methods.base import ImageItem

        if self.crash_marker is not None and not os.path.exists(self.crash_marker):
            Path(self.crash_marker).touch()
            os._exit(1)  # as a killed worker: no exception, the process is gone
        index = [int(i) for i in batch["index"]]
        items = [ImageItem(str(i), path=Path(str(p))) for i, p in zip(index, batch["path"])]
        skipped: list[str] = []
        results = {}
        for p in self.model.predict_iter(items, on_error="skip", skipped=skipped):
            m = p.map.detach().cpu().numpy().astype(np.float32, copy=False)
            results[int(p.item.name)] = (p.score, p.status, "", p.original_size, m)
        missing = [i for i in index if i not in results]  # unreadable, in input order, as skipped lists them
        for i, message in zip(missing, skipped):
            results[i] = (float("nan"), "", message, (0, 0), np.zeros((0, 0), np.float32))
        rows = [results[i] for i in index]
        return {
            "index": np.asarray(index, dtype=np.int64),
            "score": np.asarray([r[0] for r in rows], dtype=np.float64),
            "status": np.asarray([r[1] for r in rows], dtype=object),
            "error": np.asarray([r[2] for r in rows], dtype=object),
            "height": np.asarray([r[3][0] for r in rows], dtype=np.int64),
            "width": np.asarray([r[3][1] for r in rows], dtype=np.int64),
            "map_shape": np.asarray([list(r[4].shape) for r in rows], dtype=np.int64).reshape(len(rows), 2),
            "map": np.asarray([r[4].tobytes() for r in rows], dtype=object),
        }


class RayScoredModel:
    """A fitted model whose ``predict_iter`` scores on a Ray actor pool; everything else (thresholds, verdicts,
    masks, geometry) is the local model's, so ``write_predictions`` works on it unchanged."""

    def __init__(self, model, model_path, *, address=None, workers=None, device=None, search=None, crash_marker=None):
        self._model = model
        self._model_path = str(Path(model_path).resolve())
        self._address = address
        self._workers = workers
        self._device = device
        self._search = search
        self._crash_marker = crash_marker
        self.ray_stats_: dict = {}

    def __getattr__(self, name):  # only called for names this proxy lacks
        return getattr(self._model, name)

    def predict_iter(self, images, *, on_error: str = "fail", batch_size=None, skipped=None):
        yield from ray_predictions(
            self._model,
            self._model_path,
            images,
            address=self._address,
            workers=self._workers,
            device=self._device,
            search=self._search,
            batch_size=batch_size or self._model.batch_size,
            on_error=on_error,
            skipped=skipped,
            stats=self.ray_stats_,
            crash_marker=self._crash_marker,
        )


def ray_predictions(
    model,
    model_path,
    images,
    *,
    address=None,
    workers=None,
    device=None,
    search=None,
    batch_size: int = 16,
    on_error: str = "fail",
    skipped=None,
    stats=None,
    crash_marker=None,
):
    """Yield one :class:`Prediction` per readable image, in input order, scored by a pool of ``workers`` Ray actors
    that each load ``model_path`` (the file ``model`` was loaded from). Unreadable images raise
    :class:`ImageLoadError` (``on_error="fail"``) or are appended to ``skipped`` (``"skip"``), as
    ``predict_iter`` does. The images must be files (their paths travel, not their pixels)."""
    from somad.methods.base import Prediction, as_items

    ray = connect(address)
    items = as_items(images)
    if any(it.path is None for it in items):
        raise SomadError("scoring on Ray needs image files or folders (workers read them by path), not arrays")
    skipped = [] if skipped is None else skipped
    workers = max(1, min(int(workers or default_workers(ray)), len(items)))
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # outputs in input order, as local predict writes them
    rows = [{"index": i, "path": str(Path(it.path).resolve())} for i, it in enumerate(items)]
    ds = ray.data.from_items(rows, override_num_blocks=max(1, min(len(items), workers * 4)))
    ds = ds.map_batches(
        _Scorer,
        fn_constructor_kwargs=dict(
            model_path=str(model_path),
            device=device,
            search=search,
            batch_size=batch_size,
            crash_marker=crash_marker,
        ),
        batch_size=batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=workers),
        num_cpus=1,
    )  # a dead actor is restarted and its batches retried: Ray Data's max_restarts=-1, max_task_retries=-1
    seen: set[int] = set()
    duplicates = 0
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for j, i in enumerate(batch["index"].tolist()):
            if i in seen:  # a retried batch whose first attempt also delivered: keep the first
                duplicates += 1
                continue
            seen.add(i)
            item = items[i]
            error = str(batch["error"][j])
            if error:
                if on_error == "fail":
                    raise ImageLoadError(error)
                logger.warning("skipped %s", error)
                skipped.append(error)
                continue
            shape = tuple(int(v) for v in batch["map_shape"][j])
            anomaly_map = torch.from_numpy(np.frombuffer(batch["map"][j], dtype=np.float32).reshape(shape).copy())
            yield Prediction(
                item,
                float(batch["score"][j]),
                anomaly_map,
                (int(batch["height"][j]), int(batch["width"][j])),
                item.load(),  # decoded again here for the overlays: pixels never travel
                str(batch["status"][j]),
            )
    missing = sorted(set(range(len(items))) - seen)
    if missing:
        raise SomadError(f"Ray returned no result for {len(missing)} image(s), the first {items[missing[0]].name}")
    if stats is not None:
        stats.update(workers=workers, duplicates=duplicates, images=len(items))


# ----------------------------------------------------------------------------------------- fitting
class _FitShard:
    """One actor of a distributed fit: extracts and keeps its shard's training patches."""

    def __init__(self, params: dict, channel_indices, device: str, gate: dict | None = None):
        from somad.features.extractor import resolve_device
        from somad.methods import METHODS
        from somad.verdicts import FrameGate

        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1") or 1)))
        model = METHODS["somad"](**params)
        model.device_ = resolve_device(device)
        model.channel_indices_ = np.asarray(channel_indices)
        model.extractor_ = model._make_extractor()
        model.skipped_ = []
        model.gate_ = FrameGate.from_dict(gate)  # the input gate the fit learned from all training images
        self.model = model
        self.x = self.sub = self.search = self.projected = None

    def extract(self, entries: list[tuple[str, str]]) -> dict:
        """Features of ``(name, path)`` images: keeps the patch rows, returns the per-position sums."""
        from somad.methods.base import ImageItem

        m = self.model
        items = [ImageItem(name, path=Path(path)) for name, path in entries]
        parts, position_sum, n = [], None, 0
        try:
            for feats in m._feature_batches(items):
                if position_sum is None:
                    position_sum = torch.zeros(feats.shape[2:] + feats.shape[1:2], dtype=torch.float64)
                parts.append(m._patch_rows(feats))
                position_sum += feats.permute(0, 2, 3, 1).double().sum(0)
                n += feats.shape[0]
        except SomadError:
            if len(m.skipped_) != len(items):  # a shard with no readable image is not an error by itself
                raise
        d = len(m.channel_indices_)
        self.x = torch.cat(parts) if parts else torch.empty(0, d, dtype=getattr(torch, m.feature_dtype))
        return {
            "rows": int(self.x.shape[0]),
            "inputs": n,
            "position_sum": None if position_sum is None else position_sum.numpy(),
            "skipped": list(m.skipped_),
        }

    def set_subset(self, local_index) -> int:
        """The SOM's training rows of this shard (float32, as ``SelfOrganizingMap`` keeps them)."""
        local = torch.as_tensor(local_index, dtype=torch.long)
        self.sub = (self.x if local.numel() == self.x.shape[0] else self.x[local]).float()
        self.search = self.projected = None
        return int(self.sub.shape[0])

    def epoch(self, weights, size: int, search: str) -> tuple:
        """Best-matching-unit sums ``(M, D)`` float64 and counts ``(M,)`` of this shard's SOM rows."""
        from somad.som.node_search import make_search

        w = _tensor(weights)
        m, d = w.shape
        sums, counts = np.zeros((m, d)), np.zeros(m)
        self.search = make_search(w, size, search, nprobe=4, warm_start=self.search)
        if self.sub.shape[0] == 0:
            return sums, counts
        self.projected = self.search.project(self.sub, reuse=self.projected)
        _, bmu = self.search.search(self.sub, 1, projected=self.projected)
        s = torch.zeros(m, d, dtype=torch.float64).index_add_(0, bmu[:, 0], self.sub.double())
        c = torch.zeros(m, dtype=torch.float64).index_add_(0, bmu[:, 0], torch.ones(len(bmu), dtype=torch.float64))
        return s.numpy(), c.numpy()

    def errors(self, weights, size: int, search: str) -> tuple:
        """Sum of distances to the BMU, count of topographic errors, rows (for the map's errors)."""
        from somad.som.node_search import make_search

        if self.sub.shape[0] == 0:
            return 0.0, 0, 0
        sq, idx = make_search(_tensor(weights), size, search)(self.sub, 2)
        r1, c1, r2, c2 = idx[:, 0] // size, idx[:, 0] % size, idx[:, 1] // size, idx[:, 1] % size
        apart = torch.maximum((r1 - r2).abs(), (c1 - c2).abs()) > 1
        return float(sq[:, 0].double().sqrt().sum()), int(apart.sum()), int(self.sub.shape[0])

    def moments(self, weights, size: int, search: str) -> tuple:
        """This shard's node statistics (``NodeMoments``: counts, means, packed scatter), fit's assignment."""
        from somad.som.node_search import make_search
        from somad.som.node_stats import NodeMoments

        self.sub = self.search = self.projected = None  # the SOM is trained: free its rows
        w = _tensor(weights)
        if self.x.shape[0] == 0:
            mom = NodeMoments.zeros(w.shape[0], w.shape[1])
        else:
            _, assignment = make_search(w, size, search)(self.x, 1)
            mom = NodeMoments.of(self.x, assignment[:, 0], w.shape[0])
        return mom.counts.numpy(), mom.means.numpy(), mom.scatter.numpy()


def ray_fit(model, images, *, address=None, workers=None):
    """``model.fit(images)`` with the feature extraction, SOM epochs and node statistics sharded over
    ``workers`` Ray actors (see the module docstring). SOMAD only."""
    from somad.methods.somad import SOMAD

    if not isinstance(model, SOMAD):
        raise SomadError(f"--ray fits SOMAD models only (not {model.method}); fit {model.method} without --ray")
    ray = connect(address)
    model._fit_items = types.MethodType(lambda self, train: _fit_sharded(self, train, ray, workers), model)
    try:
        return model.fit(images)
    finally:
        del model._fit_items


def _fit_sharded(model, train, ray, workers) -> None:
    from somad.som.node_stats import NodeMoments, gaussians_from_moments
    from somad.som.training import SelfOrganizingMap, radius_schedule

    if any(it.path is None for it in train):
        raise SomadError("fitting on Ray needs image files or folders (workers read them by path), not arrays")
    workers = max(1, min(int(workers or default_workers(ray)), len(train)))
    edges = [round(i * len(train) / workers) for i in range(workers + 1)]
    shards = [train[lo:hi] for lo, hi in zip(edges[:-1], edges[1:])]
    params = model.get_params()
    actor = ray.remote(num_cpus=1, max_restarts=0)(_FitShard)
    gate = model.gate_.as_dict() if getattr(model, "gate_", None) else None
    pool = [actor.remote(params, model.channel_indices_.tolist(), params["device"], gate) for _ in shards]
    try:
        info = ray.get(
            [a.extract.remote([(it.name, str(Path(it.path).resolve())) for it in s]) for a, s in zip(pool, shards)]
        )
        for part in info:
            model.skipped_.extend(part["skipped"])
        n_rows = [part["rows"] for part in info]
        total, n_inputs = sum(n_rows), sum(part["inputs"] for part in info)
        if not total:
            raise SomadError(f"no readable training images: all {len(train)} were skipped")
        position_sum = sum(_tensor(p["position_sum"]) for p in info if p["position_sum"] is not None)
        size = int(model.som_size)
        som = SelfOrganizingMap(
            size=size,
            rough_epochs=model.rough_epochs,
            fine_epochs=model.fine_epochs,
            max_samples=model.som_samples,
            seed=model.seed,
            search=model.search,
        )
        weights = SelfOrganizingMap.position_mean_init(position_sum / n_inputs, size).float().clone()
        # The SOM's subset: the same seeded draw over the global row order (shards are contiguous) as a local fit.
        if som.max_samples is None or total <= som.max_samples:
            local = [np.arange(n) for n in n_rows]
        else:
            gen = torch.Generator().manual_seed(som.seed)
            keep = torch.randperm(total, generator=gen)[: som.max_samples].sort().values.numpy()
            starts = np.cumsum([0, *n_rows])
            local = [keep[(keep >= lo) & (keep < hi)] - lo for lo, hi in zip(starts[:-1], starts[1:])]
        ray.get([a.set_subset.remote(idx) for a, idx in zip(pool, local)])
        m = size * size
        offsets = torch.arange(size, dtype=torch.float32)
        sq_grid = (offsets[:, None] - offsets[None, :]) ** 2
        radii = radius_schedule(size, som.rough_epochs, som.fine_epochs)
        moved = 0
        for epoch, r in enumerate(radii):
            ref = ray.put(weights.numpy())
            parts = ray.get([a.epoch.remote(ref, size, som.search) for a in pool])
            sums = torch.from_numpy(sum(p[0] for p in parts))
            counts = torch.from_numpy(sum(p[1] for p in parts))
            moved += weights.numel() * 4 * len(pool) + sum(p[0].nbytes + p[1].nbytes for p in parts)
            h1 = torch.exp(-sq_grid / (2.0 * float(r) ** 2)).double()
            num = som._smooth(sums.view(size, size, -1), h1).reshape(m, -1)
            den = som._smooth(counts.view(size, size, 1), h1).reshape(m, 1)
            updated = den[:, 0] > 1e-12
            weights[updated] = (num[updated] / den[updated]).float()
            logger.debug("distributed SOM epoch %d/%d radius %.2f", epoch + 1, len(radii), r)
        som.weights_ = weights
        ref = ray.put(weights.numpy())
        errs = ray.get([a.errors.remote(ref, size, som.search) for a in pool])
        n_sub = sum(e[2] for e in errs)
        som.quantization_error_ = sum(e[0] for e in errs) / max(n_sub, 1)
        som.topographic_error_ = sum(e[1] for e in errs) / max(n_sub, 1)
        som.n_samples_ = n_sub
        # Node statistics: each shard's moments, merged on the driver as they arrive (two held at a time).
        merged = NodeMoments.zeros(m, weights.shape[1])
        pending = [a.moments.remote(ref, size, som.search) for a in pool]
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            counts, means, scatter = ray.get(done[0])
            moved += counts.nbytes + means.nbytes + scatter.nbytes
            with warnings.catch_warnings():  # read-only views of the object store: read, never written
                warnings.simplefilter("ignore", UserWarning)
                shard = NodeMoments(*(torch.from_numpy(a) for a in (counts, means, scatter)))
            merged.merge(shard, inplace=True)
    finally:
        for a in pool:
            ray.kill(a)
    g = gaussians_from_moments(
        merged,
        weights,
        float(model.eps),
        dtype=torch.float16 if model.factor_dtype == "float16" else torch.float32,
        shrinkage=float(model.shrinkage),
    )
    if model.scatter_dtype is None:
        g.moments = None
    model.som_, model.gaussians_ = som, g.to(model.device_)
    model.n_patches_ = total
    model.updates_ = []
    model._searcher = None
    model.ray_fit_info_ = {"workers": len(pool), "bytes_moved": int(moved), "shard_rows": n_rows}
    logger.info(
        "SOM %dx%d trained on %d workers: quantization error %.4f, topographic error %.4f",
        size,
        size,
        len(pool),
        som.quantization_error_,
        som.topographic_error_,
    )
