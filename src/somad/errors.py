"""Exception types raised by somad.

Every error a user can cause (a bad image, a wrong folder, a mismatched model file) is a
:class:`SomadError` whose message is one line naming the offending file and the fix. The CLI
prints that line and exits with status 2; anything else is a bug.
"""


class SomadError(Exception):
    """Base class for errors caused by input, configuration or files (not by bugs)."""


class ImageLoadError(SomadError):
    """An image file could not be decoded or converted."""


class PixelLimitError(ImageLoadError):
    """An image has more pixels than the caller accepts (the service's limit)."""


class DataError(SomadError):
    """A dataset folder is missing, empty or inconsistent."""


class ModelFileError(SomadError):
    """A model file is missing, truncated, tampered with, or not a somad model."""


class NotFittedError(SomadError, AttributeError):
    """A scoring method was called before ``fit``."""


class NumericalError(SomadError):
    """NaN or Inf appeared in features, statistics or scores."""
