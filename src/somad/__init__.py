"""somad: unsupervised visual anomaly detection and localization with Self-Organizing Maps.

>>> from somad import SOMAD, load
>>> model = SOMAD(som_size=56, k=4).fit("data/bottle")          # an MVTec category or a folder of good images
>>> scores, maps = model.predict_maps(["a.png", "b.png"])             # (N,), (N, 256, 256); higher = more anomalous
>>> model.save("bottle.safetensors"); model = load("bottle.safetensors")
"""

from somad._version import __version__

__all__ = ["SOMAD", "PaDiM", "PatchCore", "METHODS", "load", "__version__"]


def __getattr__(name):
    # The detectors (and torch) are imported on first use, so that ``somad.runtime`` runs without torch.
    if name in ("SOMAD", "PaDiM", "PatchCore", "METHODS", "load"):
        from somad import methods

        return getattr(methods, name)
    raise AttributeError(f"module 'somad' has no attribute {name!r}")
