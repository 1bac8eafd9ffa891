"""Valid ranges of config values, declared next to each key's default.

``Range`` describes the numbers a key accepts (``lo <= v <= hi``, either end open or
absent); a number checked against any range must also be finite.  For a list-valued key
the range applies to each element (``each``), optionally with a length.  Strings, booleans
and None are left to the type and choice checks (``ANY`` says so explicitly).  Imports
nothing of the project, so model families (``models/``) can declare their keys' ranges too.
"""
from __future__ import annotations

import dataclasses
import math


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclasses.dataclass(frozen=True)
class Range:
    """Numbers in [lo, hi] (``lo_open`` / ``hi_open``: the end excluded; None: unbounded)."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    items: bool = False            # a list: the range applies to each element
    length: int | None = None      # a list: exactly this many elements
    min_length: int = 0            # a list: at least this many

    def __str__(self) -> str:
        if self.lo is None and self.hi is None:
            bounds = "a finite number"
        elif self.hi is None:
            bounds = f"{'>' if self.lo_open else '>='} {self.lo:g}"
        elif self.lo is None:
            bounds = f"{'<' if self.hi_open else '<='} {self.hi:g}"
        else:
            bounds = f"in {'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}{')' if self.hi_open else ']'}"
        if not self.items:
            return bounds
        size = (f"{self.length} " if self.length is not None
                else f"at least {self.min_length} " if self.min_length else "")
        return f"a list of {size}numbers, each {bounds}"

    def _number_ok(self, v) -> bool:
        if not _is_number(v) or not math.isfinite(v):
            return False
        if self.lo is not None and (v < self.lo or (self.lo_open and v == self.lo)):
            return False
        if self.hi is not None and (v > self.hi or (self.hi_open and v == self.hi)):
            return False
        return True

    def accepts(self, value) -> bool:
        """Whether ``value`` is inside the range (None, strings and booleans always are)."""
        if value is None or isinstance(value, (str, bool)):
            return True
        if self.items:
            if not isinstance(value, (list, tuple)):
                return False
            if (self.length is not None and len(value) != self.length) or len(value) < self.min_length:
                return False
            return all(self._number_ok(v) for v in value)
        if isinstance(value, (list, tuple)):
            return all(self._number_ok(v) for v in value)  # a list key declared with a scalar range
        return self._number_ok(value) if _is_number(value) else True


ANY = Range()  # any finite number; strings, booleans and None: only type / choice checks


def at_least(lo: float) -> Range:
    return Range(lo=lo)


def above(lo: float) -> Range:
    return Range(lo=lo, lo_open=True)


def between(lo: float, hi: float, lo_open: bool = False, hi_open: bool = False) -> Range:
    return Range(lo=lo, hi=hi, lo_open=lo_open, hi_open=hi_open)


def each(r: Range, length: int | None = None, min_length: int = 0) -> Range:
    """The range ``r`` for every element of a list (of ``length`` / at least ``min_length`` elements)."""
    return dataclasses.replace(r, items=True, length=length, min_length=min_length)
