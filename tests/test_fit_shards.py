"""SOMAD.fit_shards: a fit whose training patches are held in shards, as ``somad.distributed.ray``'s actors hold
them, here two shards in this process, driven through the public methods the actors call. The SOM and the node
Gaussians are the model's own code either way: the result is the local fit's."""

from contextlib import contextmanager

import numpy as np
import pytest
import torch
from _tiny import texture, tiny

from somad import SOMAD

TINY = tiny(val_fraction=0.0, search="exact")


class _Patches:
    """What ``SOMAD._fit_items`` reads from a sharded fit, over two workers in this process."""

    def __init__(self, workers, items):
        self.workers = workers
        held = [w.training_patches(part) for w, part in zip(workers, items)]
        self.x = [x for x, _, _ in held]
        self.som = [w.som_shard(x) for w, x in zip(workers, self.x)]
        self.rows = [int(x.shape[0]) for x in self.x]
        self.position_mean = sum(p for _, p, _ in held) / sum(n for _, _, n in held)

    def subset(self, keep):
        for shard, k in zip(self.som, keep):
            shard.subset(k)

    def epoch(self, weights, size, search):
        return [shard.epoch(weights, size, search) for shard in self.som]

    def errors(self, weights, size, search):
        return [shard.errors(weights, size, search) for shard in self.som]

    def moments(self, weights):
        return [w.assign_moments(x, weights=weights) for w, x in zip(self.workers, self.x)]


class TwoShards:
    """A ``fit_shards`` hook: the training images cut in two contiguous halves, one worker model each."""

    def __init__(self):
        self.calls = []

    @contextmanager
    def __call__(self, model, train):
        self.calls.append((model, len(train)))
        half = len(train) // 2
        workers = [SOMAD.shard_worker(model.get_params(), model.gate_) for _ in range(2)]
        patches = _Patches(workers, [train[:half], train[half:]])
        for w in workers:
            model.skipped_.extend(w.skipped_)
        yield patches


@pytest.fixture(scope="module")
def images():
    return np.stack([texture(seed, (64, 64)) for seed in range(7)])


@pytest.mark.parametrize("params", [{}, {"som_samples": 1000, "scatter_dtype": "float32", "shrinkage": 0.3}])
def test_a_fit_on_two_shards_is_the_local_fit(images, params):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same feature arithmetic in both fits
    try:
        local = SOMAD(**TINY, **params).fit(images)
        sharded = SOMAD(**TINY, **params)
        sharded.fit_shards = TwoShards()
        sharded.fit(images)
    finally:
        torch.set_num_threads(threads)
    assert [n for _, n in sharded.fit_shards.calls] == [7]
    assert sharded.n_patches_ == local.n_patches_ == 7 * 256 and sharded.n_train_images_ == 7
    assert torch.allclose(sharded.som_.weights_, local.som_.weights_, rtol=1e-5, atol=1e-5)
    assert sharded.som_.n_samples_ == local.som_.n_samples_ == min(params.get("som_samples", 7 * 256), 7 * 256)
    assert sharded.som_.quantization_error_ == pytest.approx(local.som_.quantization_error_, rel=1e-5)
    assert torch.equal(sharded.gaussians_.counts, local.gaussians_.counts)
    assert torch.allclose(sharded.gaussians_.means, local.gaussians_.means, atol=1e-5)
    w, v = sharded.gaussians_.whiteners.float(), local.gaussians_.whiteners.float()
    assert float((w - v).abs().max()) <= 2e-3 * float(v.abs().max())  # float16 factors: an ulp at most
    assert (sharded.gaussians_.moments is None) == (local.gaussians_.moments is None) == ("scatter_dtype" not in params)
    assert np.allclose(sharded.predict_maps(images[:2])[0], local.predict_maps(images[:2])[0], rtol=1e-4)


def test_the_fold_models_of_a_cross_fit_are_fitted_on_the_shards_too(images):
    model = SOMAD(**tiny())
    model.fit_shards = hook = TwoShards()
    model.fit(images)
    assert model.threshold_info_["rule"] == "cross_fit"
    assert [n for _, n in hook.calls] == [7, 5, 5, 6, 6, 6]  # the final model on all 7, then 5 folds (2, 2, 1, 1, 1)
    assert hook.calls[0][0] is model and len({id(m) for m, _ in hook.calls}) == 6
