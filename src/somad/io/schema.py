"""What each field of a model file and of an export may hold: types, ranges, shapes and dtypes, checked at load.

A content hash says that a file is whole, not that what it holds can be used: a display range of one number, a
threshold that is a string or bool-typed prototypes pass a hash that was recomputed after the edit. Every field a
reader uses is therefore declared here (or, for a method's own state and arrays, in that method's tables, built
from these rules) and checked before it is used; the first field that breaks its rule gives one line naming it
(:func:`problem`, :func:`describe`).

The rules follow ``somad.params``' (a ``check(value)`` that returns ``None`` or what is wrong): its
:class:`~somad.params.Interval`, :class:`~somad.params.Options` and :class:`~somad.params.Text`, and here
:class:`Nullable`, :class:`Kind`, :class:`Hex`, :class:`Increasing`, :class:`ListOf`, :class:`Table` and
:class:`Array`. This module imports no torch (the ONNX runtime checks exports with it).
"""

from __future__ import annotations

import math
import numbers
import re
from dataclasses import dataclass, field

from somad.params import Interval, Options, Text

#: Largest model input side (resize, crop or tile) that a model or an export may declare: larger inputs exhaust
#: memory before they help (``BaseDetector``'s parameter table uses it too).
MAX_IMAGE_SIZE = 4096
#: Images per batch, in the native path (``BaseDetector``'s ``batch_size``) and the ONNX runtime alike.
BATCH_SIZE = Interval(int, 1, 4096)
#: Any finite number (booleans, NaN and infinities never pass).
FINITE = Interval(float)
#: Array dtypes by kind, as ``str(dtype)`` names them (torch's without their ``torch.`` prefix).
FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")
INTEGER_DTYPES = ("uint8", "int8", "int16", "int32", "int64")


@dataclass(frozen=True)
class Nullable:
    """``None``, or a value that passes ``rule``."""

    rule: object

    def check(self, value) -> str | None:
        return None if value is None else self.rule.check(value)


@dataclass(frozen=True)
class Kind:
    """Any value of Python type ``kind`` (``str``: any string, empty included)."""

    kind: type
    what: str

    def check(self, value) -> str | None:
        ok = isinstance(value, self.kind) and not (isinstance(value, bool) and self.kind is not bool)
        return None if ok else f"it must be {self.what}, not {type(value).__name__}"


@dataclass(frozen=True)
class Hex:
    """A SHA-256 digest: ``digits`` lower-case hex digits."""

    digits: int = 64

    def check(self, value) -> str | None:
        ok = isinstance(value, str) and re.fullmatch(f"[0-9a-f]{{{self.digits}}}", value)
        return None if ok else f"it must be {self.digits} lower-case hex digits (a SHA-256 digest)"


@dataclass(frozen=True)
class Increasing:
    """A pair ``[low, high]`` of finite numbers with ``low < high`` (a colour scale's ends)."""

    def check(self, value) -> str | None:
        pair = isinstance(value, (list, tuple)) and len(value) == 2
        if not pair or any(isinstance(v, bool) or not isinstance(v, numbers.Real) for v in value):
            return "it must be a pair [low, high] of numbers"
        if not all(math.isfinite(float(v)) for v in value) or not float(value[0]) < float(value[1]):
            return "it must be a pair [low, high] of finite numbers with low < high"
        return None


@dataclass(frozen=True)
class ListOf:
    """A list whose every item passes ``rule``; ``length``: exactly that many, ``max_length``: at most."""

    rule: object
    length: int | None = None
    max_length: int | None = None

    def check(self, value) -> str | None:
        found = problem(self, value, "")
        return None if found is None else found[2]

    def items_problem(self, value, name: str):
        if not isinstance(value, (list, tuple)):
            return name, value, f"it must be a list, not {type(value).__name__}"
        if self.length is not None and len(value) != self.length:
            return name, value, f"it must be a list of {self.length} items"
        if self.max_length is not None and len(value) > self.max_length:
            return name, value, f"it must be a list of at most {self.max_length} items"
        for i, item in enumerate(value):
            found = problem(self.rule, item, f"{name}[{i}]")
            if found:
                return found
        return None


@dataclass(frozen=True)
class Table:
    """A JSON object: each key of ``fields`` passes its rule, the ``required`` keys are present; other keys are
    ignored (nothing reads them), or refused when ``strict``."""

    fields: dict = field(default_factory=dict)
    required: tuple[str, ...] = ()
    strict: bool = False

    def check(self, value) -> str | None:
        found = problem(self, value, "")
        return None if found is None else found[2]

    def items_problem(self, value, name: str):
        if not isinstance(value, dict):
            return name, value, f"it must be a table (a JSON object), not {type(value).__name__}"
        prefix = f"{name}." if name else ""
        for key in self.required:
            if key not in value:
                return f"{prefix}{key}", _ABSENT, "it is missing"
        for key, item in value.items():
            rule = self.fields.get(key)
            if rule is None:
                if self.strict:
                    return f"{prefix}{key}", _ABSENT, f"no such field here; expected: {', '.join(self.fields)}"
                continue
            found = problem(rule, item, f"{prefix}{key}")
            if found:
                return found
        return None


@dataclass(frozen=True)
class Array:
    """An array (numpy or torch) of one of ``dtypes`` with ``ndim`` dimensions, none of them empty."""

    dtypes: tuple[str, ...]
    ndim: int

    def check(self, value) -> str | None:
        dtype = dtype_name(value)
        if dtype not in self.dtypes:
            return f"its dtype must be one of {', '.join(self.dtypes)}"
        shape = tuple(getattr(value, "shape", ()))
        if len(shape) != self.ndim or 0 in shape:
            return f"it must have {self.ndim} non-empty dimension{'s' if self.ndim > 1 else ''}"
        return None


class _Absent:
    def __repr__(self) -> str:
        return "absent"


_ABSENT = _Absent()


def dtype_name(array) -> str:
    """``float32``, ``bool``, ... for a numpy or torch array (``""`` for anything else)."""
    return str(getattr(array, "dtype", "")).removeprefix("torch.")


def problem(rule, value, name: str):
    """The first field of ``value`` (named ``name``) that breaks ``rule``: ``(field name, value, what is wrong)``,
    or ``None``. Tables and lists name the nested field (``state.threshold_info.quantile``, ``updates[0]``)."""
    inner = getattr(rule, "items_problem", None)
    if isinstance(rule, Nullable):
        return None if value is None else problem(rule.rule, value, name)
    if inner is not None:
        return inner(value, name)
    try:
        message = rule.check(value)
    except (TypeError, ValueError, OverflowError) as exc:  # a value too odd for the rule's arithmetic
        message = f"it cannot be read ({type(exc).__name__})"
    return None if message is None else (name, value, message)


def describe(found) -> str:
    """``name is <value>: what is wrong`` in one short line (arrays shown by dtype and shape)."""
    name, value, message = found
    if value is _ABSENT:
        return f"{name}: {message}"
    if hasattr(value, "shape") and hasattr(value, "dtype"):
        shown = f"a {dtype_name(value)} array of shape {tuple(value.shape)}"
    else:
        shown = repr(value)
        shown = shown if len(shown) <= 60 else shown[:57] + "..."
    return f"{name} is {shown}: {message}"


# ----------------------------------------------------------------------------------------- shared tables
#: A threshold: a finite number, or None where none was set.
THRESHOLD = Nullable(FINITE)
#: A quantile of the thresholds (0 excluded, 1 included).
QUANTILE = Nullable(Interval(float, 0.0, 1.0, open_low=True))
#: ``threshold_info`` (``BaseDetector._apply_thresholds``, ``cli.common.override_thresholds``); model files and
#: exports both carry it.
THRESHOLD_INFO = Table(
    {
        "source": Text(),
        "n_images": Nullable(Interval(int, 0)),
        "quantile": QUANTILE,
        "pixel_quantile": QUANTILE,
        "expected_false_alarm_rate": Nullable(Interval(float, 0.0, 1.0)),
        "false_alarm_rate_interval": Nullable(ListOf(Interval(float, 0.0, 1.0), length=2)),
        "rule": Nullable(Text()),
        "folds": Nullable(Interval(int, 1)),
        "good_score_median": THRESHOLD,
        "good_scores": Nullable(ListOf(FINITE)),
    }
)
#: ``display_range``: the fixed colour scale of the heatmaps.
DISPLAY_RANGE = Nullable(Increasing())

__all__ = [
    "BATCH_SIZE",
    "DISPLAY_RANGE",
    "FINITE",
    "FLOAT_DTYPES",
    "INTEGER_DTYPES",
    "MAX_IMAGE_SIZE",
    "THRESHOLD",
    "THRESHOLD_INFO",
    "Array",
    "Hex",
    "Increasing",
    "Interval",
    "Kind",
    "ListOf",
    "Nullable",
    "Options",
    "Table",
    "Text",
    "describe",
    "problem",
]
