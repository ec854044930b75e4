"""Hyper-parameters declared once: names and defaults from ``__init__`` signatures, rules and help from one table.

As in scikit-learn (``BaseEstimator._get_param_names``, ``_parameter_constraints``), a detector's parameters are
the keyword arguments of the ``__init__`` methods of its class and its bases; :class:`Params` gives
``get_params(deep=...)``/``set_params`` (so ``sklearn.base.clone`` works), and each class declares a
``_parameters`` table: ``{name: Param(rule, help)}``. The same table validates values from the Python API, the
command line and loaded model files (:func:`validate`), and builds the command-line flags (:func:`add_flags`),
with their defaults and choices. Adding a parameter takes two places: the signature and the table.
"""

from __future__ import annotations

import argparse
import inspect
import math
import numbers
from dataclasses import dataclass, field

from somad.errors import SomadError


# ----------------------------------------------------------------------------------------- rules
@dataclass(frozen=True)
class Interval:
    """A real (``kind=float``) or integer (``kind=int``) number in ``[low, high]`` (``None``: unbounded);
    ``open_low``/``open_high`` exclude the ends. Non-finite numbers and booleans never pass."""

    kind: type
    low: float | None = None
    high: float | None = None
    open_low: bool = False
    open_high: bool = False

    def check(self, value) -> str | None:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            return f"it must be {'an integer' if self.kind is int else 'a number'}, not {type(value).__name__}"
        if self.kind is int and not (isinstance(value, numbers.Integral) or float(value).is_integer()):
            return "it must be an integer"
        if not math.isfinite(float(value)):
            return "it must be a finite number"
        v = float(value)
        if self.low is not None and (v < self.low or (self.open_low and v == self.low)):
            return f"it must be {'>' if self.open_low else '>='} {self._fmt(self.low)}"
        if self.high is not None and (v > self.high or (self.open_high and v == self.high)):
            return f"it must be {'<' if self.open_high else '<='} {self._fmt(self.high)}"
        return None

    def parse(self, text: str):
        return int(text) if self.kind is int else float(text)

    def _fmt(self, v: float) -> str:
        return str(int(v)) if float(v).is_integer() else str(v)


@dataclass(frozen=True)
class Options:
    """One of a fixed set of strings."""

    values: tuple[str, ...]

    def check(self, value) -> str | None:
        return None if isinstance(value, str) and value in self.values else f"choose one of: {', '.join(self.values)}"

    def parse(self, text: str) -> str:
        return text


@dataclass(frozen=True)
class Text:
    """Any non-empty string (a name or a path)."""

    def check(self, value) -> str | None:
        return None if isinstance(value, str) and value else "it must be a non-empty string"

    def parse(self, text: str) -> str:
        return text


@dataclass(frozen=True)
class Either:
    """A value that one of ``rules`` accepts, e.g. ``"auto"`` or a whole number of folds."""

    rules: tuple

    def check(self, value) -> str | None:
        problems = [rule.check(value) for rule in self.rules]
        return None if None in problems else "; or ".join(problems)

    def parse(self, text: str):
        """The first reading of ``text`` that its rule accepts (else the last reading: its check says why)."""
        value = text
        for rule in self.rules:
            try:
                value = rule.parse(text)
            except ValueError:
                continue
            if rule.check(value) is None:
                return value
        return value


@dataclass(frozen=True)
class Param:
    """One row of a ``_parameters`` table.

    rule : Interval, Options, Text or Either
    help : str
        Command-line help (the default is appended).
    none : str or None
        What ``None`` means, when it is allowed (the flag then takes ``none`` too).
    flag : str or None
        The command-line flag, when it is not ``--`` + the name with dashes.
    cli : bool
        False for parameters with no model flag (set per command, e.g. ``device``).
    """

    rule: Interval | Options | Text | Either
    help: str
    none: str | None = None
    flag: str | None = None
    cli: bool = True
    metavar: str | None = field(default=None)

    def check(self, value) -> str | None:
        if value is None:
            return None if self.none is not None else "it must not be None"
        return self.rule.check(value)


# ----------------------------------------------------------------------------------------- estimators
class Params:
    """scikit-learn's parameter protocol, from the ``__init__`` signatures of a class and its bases."""

    _parameters: dict[str, Param] = {}

    @classmethod
    def _get_param_names(cls) -> list[str]:
        names: set[str] = set()
        for klass in cls.__mro__:
            init = klass.__dict__.get("__init__")
            if init is None or klass is object:
                continue
            for p in inspect.signature(init).parameters.values():
                if p.name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
                    names.add(p.name)
        return sorted(names)

    @classmethod
    def _defaults(cls) -> dict:
        out: dict = {}
        for klass in reversed(cls.__mro__):
            init = klass.__dict__.get("__init__")
            if init is None or klass is object:
                continue
            out.update(
                {
                    p.name: p.default
                    for p in inspect.signature(init).parameters.values()
                    if p.default is not inspect.Parameter.empty
                }
            )
        return out

    @classmethod
    def _table(cls) -> dict[str, Param]:
        """Every row that applies to this class: its own table and its bases'."""
        table: dict[str, Param] = {}
        for klass in reversed(cls.__mro__):
            table.update(klass.__dict__.get("_parameters", {}))
        return table

    def get_params(self, deep: bool = True) -> dict:
        """The parameters, as passed to ``__init__`` (``deep`` is accepted for scikit-learn; nothing nests)."""
        return {name: getattr(self, name) for name in self._get_param_names()}

    def set_params(self, **params) -> Params:
        valid = self._get_param_names()
        for name, value in params.items():
            if name not in valid:
                raise SomadError(f"{name!r} is not a parameter of {type(self).__name__}; valid: {', '.join(valid)}")
            setattr(self, name, value)
        return self


def validate(cls: type, params: dict, where: str = "") -> None:
    """Check ``params`` against the ``_parameters`` table of ``cls``: one-line :class:`SomadError` on the first
    bad value (``where`` names the model file, for loaded configs)."""
    table = cls._table()
    for name, value in params.items():
        row = table.get(name)
        problem = row.check(value) if row is not None else None
        if problem:
            prefix = f"{where}: " if where else ""
            raise SomadError(f"{prefix}{name}={value!r} is invalid: {problem}")


# ----------------------------------------------------------------------------------------- command line
class _PerMethod:
    def __repr__(self) -> str:
        return "PER_METHOD"


#: The default of a flag whose classes have different defaults: the chosen class's own default applies.
PER_METHOD = _PerMethod()


def flag_name(name: str, row: Param) -> str:
    return row.flag or "--" + name.replace("_", "-")


def add_flags(group: argparse._ArgumentGroup, classes: dict[str, type]) -> None:
    """One flag per parameter of any of ``classes`` (``{label: class}``), with its default, choices and help;
    a parameter several classes share gets one flag (its help names them)."""
    users: dict[str, list[str]] = {}
    rows: dict[str, tuple[Param, object]] = {}
    for label, cls in classes.items():
        defaults = cls._defaults()
        for name, row in cls._table().items():
            if not row.cli or name not in defaults:
                continue
            users.setdefault(name, []).append(label)
            rows.setdefault(name, (row, defaults[name]))
    shared = set.intersection(*(set(cls._get_param_names()) for cls in classes.values()))
    for name, (row, default) in rows.items():
        who = "" if name in shared else ", ".join(users[name]) + ": "
        shown = "none" if default is None else default
        per_class = {label: cls._defaults()[name] for label, cls in classes.items() if name in cls._defaults()}
        if len(set(map(repr, per_class.values()))) > 1:  # each class keeps its own default
            default = PER_METHOD
            shown = ", ".join(f"{label} {value}" for label, value in per_class.items())
        none = f"; 'none' = {row.none}" if row.none else ""
        kwargs = dict(dest=name, default=default, type=_parser(row), help=f"{who}{row.help}{none} (default {shown})")
        if isinstance(row.rule, Options):
            kwargs["choices"] = list(row.rule.values)
        if row.metavar:
            kwargs["metavar"] = row.metavar
        group.add_argument(flag_name(name, row), **kwargs)


def _parser(row: Param):
    def parse(text: str):
        if row.none is not None and text.lower() == "none":
            return None
        try:  # the value's rules are checked by the detector, with the same one-line errors as in the API
            return row.rule.parse(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a valid value") from None

    parse.__name__ = "value"
    return parse
