"""Ray: batch scoring over an actor pool, and SOMAD fits sharded over workers.

Scoring (:func:`ray_predictions`): a Ray Data pipeline of image paths, ``map_batches`` over a fixed pool of
actors that each load the model file once and return, per image, its score, input-gate status, size and
float32 map at the model input (or the read error). The driver turns these back into
:class:`~somad.methods.base.Prediction` objects and writes every output through the very code local ``predict``
uses (``somad.io.outputs.write_predictions``), so the files are the same. Actors restart when their process dies
and their batches are retried (``max_restarts``/``max_task_retries``); the driver keeps the first result of
each image and checks at the end that every image has exactly one, so none is lost or written twice.

Fitting (:func:`ray_fit`): the model's own ``fit`` runs on the driver with a hook, ``SOMAD.fit_shards``
(:class:`RayShards`), that holds the training patches in actors. The training images are cut into contiguous
shards, one per actor; each actor extracts its shard's patches and keeps them (in ``feature_dtype``). No process
holds all training patches. The SOM is the model's (its subset draw, epoch rule and map errors, as in a local fit);
it reads each epoch's best-matching-unit sums and counts (``M x D`` and ``M`` floats per shard) from the actors,
and the model merges their node statistics (Chan's formula) into its Gaussians. This module computes nothing of
the fit itself: it only moves work and results between the driver and the actors, which call public methods of
the model. The thresholds are set on the driver from the held-out images, as in a local fit. Workers read the
model file and the images by path: on a cluster, a shared file system (or the same paths on every node).
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
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

    def __init__(
        self,
        model_path: str,
        device: str | None,
        search: str | None,
        batch_size: int,
        content_sha256: str | None = None,
        crash_marker=None,
    ):
        from somad.methods import load

        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1") or 1)))
        # The driver verified the file (its hash, with --verify-key its signature): the actor reads that content
        # or refuses, without the key.
        self.model = load(model_path, device=device, search=search, expect_sha256=content_sha256)
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
    masks, geometry) is the local model's, so ``write_predictions`` works on it unchanged. ``content_sha256``: the
    content hash the caller verified ``model_path`` with; each actor refuses a file with other content."""

    def __init__(
        self,
        model,
        model_path,
        *,
        address=None,
        workers=None,
        device=None,
        search=None,
        content_sha256=None,
        crash_marker=None,
    ):
        self._model = model
        self._model_path = str(Path(model_path).resolve())
        self._content_sha256 = content_sha256
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
            content_sha256=self._content_sha256,
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
    content_sha256=None,
    crash_marker=None,
):
    """Yield one :class:`Prediction` per readable image, in input order, scored by a pool of ``workers`` Ray actors
    that each load ``model_path`` (the file ``model`` was loaded from; with ``content_sha256``, only if its content
    is still that). Unreadable images raise
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
            content_sha256=content_sha256,
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
    """One actor of a distributed fit: a :meth:`SOMAD.shard_worker` that extracts and keeps its shard's training
    patches and answers for them (their SOM epochs and errors, their node statistics) through the model's methods."""

    def __init__(self, params: dict, gate=None, frame=None):
        from somad.methods import METHODS

        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1") or 1)))
        self.model = METHODS["somad"].shard_worker(params, gate, frame)
        self.x = self.som = None

    def extract(self, entries: list[tuple[str, str]]) -> dict:
        """Features of ``(name, path)`` images: keeps the patch rows, returns the per-position sums."""
        from somad.methods.base import ImageItem

        m = self.model
        items = [ImageItem(name, path=Path(path)) for name, path in entries]
        position_sum, n = None, 0
        try:
            self.x, position_sum, n = m.training_patches(items)
        except SomadError:
            if len(m.skipped_) != len(items):  # a shard with no readable image is not an error by itself
                raise
            self.x = torch.empty(0, len(m.channel_indices_), dtype=getattr(torch, m.feature_dtype))
        self.som = m.som_shard(self.x)
        return {
            "rows": int(self.x.shape[0]),
            "inputs": n,
            "position_sum": None if position_sum is None else position_sum.cpu().numpy(),
            "skipped": list(m.skipped_),
        }

    def subset(self, keep) -> int:
        return self.som.subset(None if keep is None else torch.as_tensor(keep))

    def epoch(self, weights, size: int, search: str) -> tuple:
        sums, counts = self.som.epoch(_tensor(weights), size, search)
        return sums.cpu().numpy(), counts.cpu().numpy()

    def errors(self, weights, size: int, search: str) -> tuple:
        return self.som.errors(_tensor(weights), size, search)

    def moments(self, weights):
        """This shard's node statistics (``None`` without patches), assigned as ``fit`` assigns."""
        self.som = None  # the SOM is trained: free its rows
        return self.model.assign_moments(self.x, weights=_tensor(weights)) if self.x.shape[0] else None


class _ShardedPatches:
    """The training patches held by the actors of a distributed fit, as ``SOMAD`` fits on them (see
    ``SOMAD._fit_items``): the SOM's reducer over one shard per actor, and each shard's node statistics. Every call
    fans out to all actors; ``moved`` counts the bytes through the object store."""

    def __init__(self, ray, pool, rows: list[int], position_mean: torch.Tensor):
        self.ray, self.pool, self.rows, self.position_mean = ray, pool, rows, position_mean
        self.moved = 0

    def _broadcast(self, weights: torch.Tensor):
        self.moved += weights.numel() * weights.element_size() * len(self.pool)
        return self.ray.put(weights.cpu().numpy())

    def subset(self, keep) -> None:
        self.ray.get([a.subset.remote(None if k is None else k.numpy()) for a, k in zip(self.pool, keep)])

    def epoch(self, weights, size: int, search: str) -> list:
        ref = self._broadcast(weights)
        parts = self.ray.get([a.epoch.remote(ref, size, search) for a in self.pool])
        self.moved += sum(s.nbytes + c.nbytes for s, c in parts)
        return [(_tensor(s), _tensor(c)) for s, c in parts]

    def errors(self, weights, size: int, search: str) -> list:
        ref = self._broadcast(weights)
        return self.ray.get([a.errors.remote(ref, size, search) for a in self.pool])

    def moments(self, weights):
        """Each shard's node statistics as it arrives (the driver merges them: two held at a time)."""
        ref = self._broadcast(weights)
        pending = [a.moments.remote(ref) for a in self.pool]
        while pending:
            done, pending = self.ray.wait(pending, num_returns=1)
            part = self.ray.get(done[0])
            if part is not None:
                self.moved += sum(t.numel() * t.element_size() for t in (part.counts, part.means, part.scatter))
                yield part


class RayShards:
    """``SOMAD.fit_shards`` for a fit sharded over ``workers`` Ray actors (``ray_fit``): the training images cut
    into contiguous shards, one actor each, which extract and keep their patches. Sets ``ray_fit_info_`` on the
    model it fits (workers, bytes moved, patches per shard)."""

    def __init__(self, ray, workers=None):
        self.ray, self.workers = ray, workers

    @contextmanager
    def __call__(self, model, train):
        ray = self.ray
        if any(it.path is None for it in train):
            raise SomadError("fitting on Ray needs image files or folders (workers read them by path), not arrays")
        workers = max(1, min(int(self.workers or default_workers(ray)), len(train)))
        edges = [round(i * len(train) / workers) for i in range(workers + 1)]
        shards = [train[lo:hi] for lo, hi in zip(edges[:-1], edges[1:])]
        actor = ray.remote(num_cpus=1, max_restarts=0)(_FitShard)
        pool = [
            actor.remote(model.get_params(), getattr(model, "gate_", None), getattr(model, "input_frame_", None))
            for _ in shards
        ]
        try:
            info = ray.get(
                [a.extract.remote([(it.name, str(Path(it.path).resolve())) for it in s]) for a, s in zip(pool, shards)]
            )
            for part in info:
                model.skipped_.extend(part["skipped"])
            rows = [part["rows"] for part in info]
            if not sum(rows):
                raise SomadError(f"no readable training images: all {len(train)} were skipped")
            position_sum = sum(_tensor(p["position_sum"]) for p in info if p["position_sum"] is not None)
            patches = _ShardedPatches(ray, pool, rows, position_sum / sum(p["inputs"] for p in info))
            yield patches
            model.ray_fit_info_ = {"workers": len(pool), "bytes_moved": int(patches.moved), "shard_rows": rows}
            logger.info("fitted on %d Ray workers, %.1f MB through the object store", len(pool), patches.moved / 1e6)
        finally:
            for a in pool:
                ray.kill(a)


def ray_fit(model, images, *, address=None, workers=None):
    """``model.fit(images)`` with the feature extraction, SOM epochs and node statistics sharded over ``workers``
    Ray actors (see the module docstring), through ``SOMAD.fit_shards``. SOMAD only."""
    from somad.methods.somad import SOMAD

    if not isinstance(model, SOMAD):
        raise SomadError(f"--ray fits SOMAD models only (not {model.method}); fit {model.method} without --ray")
    model.fit_shards = RayShards(connect(address), workers)
    try:
        return model.fit(images)
    finally:
        del model.fit_shards
