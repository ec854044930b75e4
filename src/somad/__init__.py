"""somad: unsupervised visual anomaly detection and localization with Self-Organizing Maps.

>>> from somad import SOMAD, load
>>> model = SOMAD(som_size=56, k=4).fit("data/bottle")          # an MVTec category or a folder of good images
>>> scores, maps = model.predict_maps(["a.png", "b.png"])             # (N,), (N, 256, 256); higher = more anomalous
>>> model.save("bottle.safetensors"); model = load("bottle.safetensors")
"""

from somad._version import __version__
from somad.methods import METHODS, SOMAD, PaDiM, PatchCore, load

__all__ = ["SOMAD", "PaDiM", "PatchCore", "METHODS", "load", "__version__"]
