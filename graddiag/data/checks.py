"""Value checks for options: each says what it allows and returns the value in canonical form.

A check is called as ``check(name, value)``; it returns the value normalised (plain ``int``,
``float``, ``bool``, tuples for lists) or raises ``ValueError("<name> must be <allowed>, got
<value>")``. NumPy numbers count as numbers; ``True``/``False`` never count as numbers.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NoReturn, Protocol

import numpy as np


class Check(Protocol):
    """What an option allows (``allowed``, for messages and docs) and the check itself."""

    @property
    def allowed(self) -> str: ...

    def __call__(self, name: str, value: Any) -> Any: ...


def reject(name: str, allowed: str, value: Any) -> NoReturn:
    """Raise the one error format: option, what is allowed, what was given."""
    raise ValueError(f"{name} must be {allowed}, got {value!r}")


def _is_bool(value: Any) -> bool:
    return isinstance(value, (bool, np.bool_))


def _is_integer(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not _is_bool(value)


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not _is_bool(value) and not math.isnan(value)


@dataclass(frozen=True)
class Integer:
    """An integer (NumPy integers too, never a bool) ``>= minimum``; ``None`` if ``optional``."""

    minimum: int
    optional: bool = False

    @property
    def allowed(self) -> str:
        return f"an integer >= {self.minimum}" + (" or None" if self.optional else "")

    def __call__(self, name: str, value: Any) -> int | None:
        if value is None and self.optional:
            return None
        if not _is_integer(value) or value < self.minimum:
            reject(name, self.allowed, value)
        return int(value)


@dataclass(frozen=True)
class Number:
    """A real number (NumPy numbers too, never a bool or NaN) in an interval."""

    low: float
    high: float = math.inf
    low_open: bool = False

    @property
    def allowed(self) -> str:
        if self.high == math.inf:
            return f"a number {'>' if self.low_open else '>='} {float(self.low)}"
        bracket = "(" if self.low_open else "["
        return f"a number in {bracket}{float(self.low)}, {float(self.high)}]"

    def __call__(self, name: str, value: Any) -> float:
        if not _is_real(value):
            reject(name, self.allowed, value)
        above = value > self.low if self.low_open else value >= self.low
        if not (above and value <= self.high):
            reject(name, self.allowed, value)
        return float(value)


@dataclass(frozen=True)
class NormType:
    """The p of a p-norm: any number ``p > 0``, or ``inf`` (also spelt ``"inf"``)."""

    @property
    def allowed(self) -> str:
        return "a number p > 0 or 'inf'"

    def __call__(self, name: str, value: Any) -> float:
        if isinstance(value, str) and value.strip().lower() in {"inf", "infinity", ".inf"}:
            return math.inf
        if not _is_real(value) or not value > 0:
            reject(name, self.allowed, value)
        return float(value)


@dataclass(frozen=True)
class Choice:
    """One of a fixed set of strings."""

    values: tuple[str, ...]

    @property
    def allowed(self) -> str:
        return f"one of {list(self.values)}"

    def __call__(self, name: str, value: Any) -> str:
        if not isinstance(value, str) or value not in self.values:
            reject(name, self.allowed, value)
        return value


@dataclass(frozen=True)
class Flag:
    """``True`` or ``False`` (a NumPy bool too; not 0/1, not strings)."""

    @property
    def allowed(self) -> str:
        return "True or False"

    def __call__(self, name: str, value: Any) -> bool:
        if not _is_bool(value):
            reject(name, self.allowed, value)
        return bool(value)


@dataclass(frozen=True)
class Text:
    """Any string."""

    @property
    def allowed(self) -> str:
        return "a string"

    def __call__(self, name: str, value: Any) -> str:
        if not isinstance(value, str):
            reject(name, self.allowed, value)
        return value


@dataclass(frozen=True)
class Strings:
    """A list of strings (a single string counts as a list of one), kept as a tuple.

    Args:
        what: What the strings are, for messages (``"glob patterns"``).
        choices: If given, every string must be one of these.
        optional: ``None`` is allowed (and kept) when this says what it means.
    """

    what: str
    choices: tuple[str, ...] | None = None
    optional: str | None = None

    @property
    def allowed(self) -> str:
        text = (f"a list of {self.what} from {list(self.choices)} (or one of them)"
                if self.choices else f"a list of strings ({self.what}), or one string")
        return f"None ({self.optional}) or {text}" if self.optional else text

    def __call__(self, name: str, value: Any) -> tuple[str, ...] | None:
        if value is None and self.optional:
            return None
        if isinstance(value, str):
            value = (value,)
        if not isinstance(value, Sequence) or not all(isinstance(v, str) for v in value):
            reject(name, self.allowed, value)
        if self.choices is not None and any(v not in self.choices for v in value):
            reject(name, self.allowed, value)
        return tuple(value)
