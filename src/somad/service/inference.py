"""One inference thread per worker process, fed by a bounded queue, with micro-batching.

The detector's state (backbone, SOM, search index, native kernels' scratch) is not safe to use from two threads
at once, so every model call runs on this one thread. Requests wait in a queue of at most ``max_queue``
requests (a request asking while it is full gets :class:`Overloaded`, answered with 503): memory stays bounded
however many clients there are. When several requests are waiting, the thread scores their images together in
one backbone batch (at most ``max_batch`` images), which raises throughput under load and changes no score
beyond float rounding.
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from PIL import Image

from somad.errors import SomadError
from somad.io.inputs import ImageItem
from somad.runtime import OnnxDetector

if TYPE_CHECKING:  # an export (somad.runtime) scores without torch
    from somad.methods.prediction import Prediction

logger = logging.getLogger(__name__)


class Overloaded(Exception):
    """The inference queue is full."""


@dataclass
class Job:
    images: list[Image.Image]
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    enqueued: float = field(default_factory=time.perf_counter)
    started: float = 0.0
    finished: float = 0.0

    @property
    def queue_ms(self) -> float:
        return 1000.0 * (self.started - self.enqueued)

    @property
    def inference_ms(self) -> float:
        return 1000.0 * (self.finished - self.started)


class InferenceWorker:
    """Runs ``model.predict_iter`` on one thread; :meth:`submit` returns a future of the predictions."""

    def __init__(self, model, *, max_queue: int, max_batch: int = 16) -> None:
        if max_queue < 1:
            raise SomadError(f"max_queue={max_queue} is invalid; it must be at least 1")
        self.model = model
        self.max_queue = int(max_queue)
        self.max_batch = max(1, int(max_batch))
        self._queue: collections.deque[Job] = collections.deque()
        self._cond = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="somad-inference", daemon=True)
        #: Held while a batch is scored. When torch's threads take every core, decoding takes this lock too
        #: (:meth:`cpu_bound`): a decode running beside a batch would only stall one of torch's threads, and the
        #: whole batch waits for its slowest thread (measured in benchmarks/load_test.py).
        self.cpu_lock = threading.Lock()
        self.exclusive = (os.cpu_count() or 1) <= _compute_threads(model) + 1

    def cpu_bound(self, fn, *args):
        """Run ``fn(*args)`` (decoding, on a pool thread) beside inference, or between batches when exclusive."""
        if not self.exclusive:
            return fn(*args)
        with self.cpu_lock:
            return fn(*args)

    def start(self) -> InferenceWorker:
        self._thread.start()
        return self

    @property
    def waiting(self) -> int:
        """Requests waiting for the inference thread (not counting the batch it is scoring)."""
        return len(self._queue)

    def full(self) -> bool:
        return len(self._queue) >= self.max_queue

    def submit(self, images: list[Image.Image]) -> Job:
        """Queue ``images`` (RGB) for scoring; raises :class:`Overloaded` when ``max_queue`` requests wait."""
        job = Job(list(images))
        with self._cond:
            if self._closing:
                raise Overloaded("the service is shutting down")
            if len(self._queue) >= self.max_queue:
                raise Overloaded(f"{len(self._queue)} requests are waiting for inference (--max-queue)")
            self._queue.append(job)
            self._cond.notify()
        return job

    def close(self, timeout: float | None = None) -> None:
        """Score what is queued, then stop the thread."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _take(self) -> list[Job] | None:
        with self._cond:
            while not self._queue and not self._closing:
                self._cond.wait()
            if not self._queue:
                return None
            jobs = [self._queue.popleft()]
            n = len(jobs[0].images)
            while self._queue and n + len(self._queue[0].images) <= self.max_batch:
                jobs.append(self._queue.popleft())
                n += len(jobs[-1].images)
            return jobs

    def _run(self) -> None:
        while (jobs := self._take()) is not None:
            jobs = [job for job in jobs if job.future.set_running_or_notify_cancel()]  # drop abandoned requests
            if not jobs:
                continue
            started = time.perf_counter()
            for job in jobs:
                job.started = started
            try:
                results = self._score([img for job in jobs for img in job.images])
            except BaseException as exc:  # noqa: BLE001 - one failing batch must not stop the thread
                if len(jobs) == 1:
                    self._finish(jobs[0], exc)
                    continue
                # Score each request alone: one request's image must not fail the others'.
                for job in jobs:
                    job.started = time.perf_counter()
                    try:
                        self._finish(job, self._score(job.images))
                    except BaseException as single:  # noqa: BLE001
                        self._finish(job, single)
                continue
            first = 0
            for job in jobs:
                self._finish(job, results[first : first + len(job.images)])
                first += len(job.images)

    def _score(self, images: list[Image.Image]) -> list[Prediction]:
        items = [ImageItem(f"upload_{i}", image=img) for i, img in enumerate(images)]
        with self.cpu_lock:
            preds = list(self.model.predict_iter(items, batch_size=min(len(items), self.max_batch)))
        if len(preds) != len(items):  # on_error="fail": cannot happen, but a short list would misplace results
            raise SomadError(f"scored {len(preds)} of {len(items)} images")
        return preds

    @staticmethod
    def _finish(job: Job, outcome) -> None:
        job.finished = time.perf_counter()
        try:
            if isinstance(outcome, BaseException):
                job.future.set_exception(outcome)
            else:
                job.future.set_result(outcome)
        except concurrent.futures.InvalidStateError:  # the request was cancelled (its client went away)
            pass


def _compute_threads(model) -> int:
    """The threads the model scores with: an export's runtime threads (all cores unless set), else torch's."""
    if isinstance(model, OnnxDetector):
        return model.threads or os.cpu_count() or 1
    import torch

    return torch.get_num_threads()


__all__ = ["InferenceWorker", "Job", "Overloaded"]
