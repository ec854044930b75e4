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
