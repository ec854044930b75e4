"""The small SOMAD configuration that unit tests fit in about a second: random backbone weights, 64 px inputs, a
4x4 map and a few epochs. A module passes its own departures: ``TINY = tiny(val_fraction=0.0)``."""

BASE = dict(
    weights="none",
    image_size=64,
    som_size=4,
    k=2,
    rough_epochs=2,
    fine_epochs=1,
    device="cpu",
    batch_size=4,
)


def tiny(**overrides) -> dict:
    """:data:`BASE` with ``overrides``."""
    return {**BASE, **overrides}


#: SOMAD's own parameters in :data:`BASE`; the rest is every method's (:func:`tiny_common`).
SOM_PARAMS = ("som_size", "k", "rough_epochs", "fine_epochs")


def tiny_common(**overrides) -> dict:
    """:data:`BASE` without SOMAD's own parameters, with ``overrides``: the tiny PaDiM or PatchCore."""
    return {**{k: v for k, v in BASE.items() if k not in SOM_PARAMS}, **overrides}


def texture(seed: int, size=(80, 100)):
    """A smooth colour pattern plus sensor noise, ``(H, W, 3)`` uint8 (not square: maps are resized back): the
    good part of the unit tests that fit on in-memory frames."""
    import numpy as np

    h, w = size
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([100 + 60 * np.sin(x / 7.0), 120 + 50 * np.cos(y / 5.0), 90 + 0.5 * (x + y)], -1)
    return np.clip(base + rng.normal(0, 10, (h, w, 3)), 0, 255).astype(np.uint8)


def stripes(n, seed, height=80, width=72, defect=False):
    """uint8 (n, H, W, 3): smooth stripes plus noise; with ``defect``, a bright square in the middle."""
    import numpy as np

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = 120 + 40 * np.sin(xx / 5.0)[..., None] + 10 * np.cos(yy / 7.0)[..., None]
    out = np.clip(base[None] + rng.normal(0, 8, (n, height, width, 3)), 0, 255).astype(np.uint8)
    if defect:
        out[:, 30:46, 28:44] = 250
    return out
