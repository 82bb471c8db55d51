"""The one error type for bad user input, raised before any work starts, and the checks that
raise it (each config section's ``validate()`` is written with them)."""

from __future__ import annotations

import math


class ConfigError(ValueError):
    """A configuration value is not allowed.

    The message always names the key, the bad value and what is allowed, on one line, so that
    the command line can print it as is and exit with status 2.
    """

    def __init__(self, key: str, value: object, allowed: str) -> None:
        self.key = key
        self.value = value
        self.allowed = allowed
        super().__init__(f"{key}={value!r} is not allowed: {allowed}")


def one_of(key: str, value: object, allowed: tuple[str, ...]) -> None:
    """``value`` must be one of ``allowed``."""
    if value not in allowed:
        raise ConfigError(key, value, "one of " + ", ".join(allowed))


def positive(key: str, value: float | None, *, zero_ok: bool = False) -> None:
    """``value`` must be a finite number > 0 (>= 0 with ``zero_ok``)."""
    if value is None or not math.isfinite(value) or value < 0 or (value == 0 and not zero_ok):
        raise ConfigError(key, value, ">= 0" if zero_ok else "> 0")


def divisible(key: str, value: int, by_key: str, by: int) -> None:
    """``value`` must be a multiple of ``by`` (named ``by_key``)."""
    if value % by:
        raise ConfigError(key, value, f"a multiple of {by_key}={by}")


def in_range(key: str, value: float, low: float, high: float, *, low_open: bool = False,
             high_open: bool = True) -> None:
    """``value`` must lie in the interval from ``low`` to ``high`` (open or closed ends)."""
    above = value > low if low_open else value >= low
    below = value < high if high_open else value <= high
    if not (above and below):
        left, right = "(" if low_open else "[", ")" if high_open else "]"
        raise ConfigError(key, value, f"in {left}{low:g}, {high:g}{right}")


class RunError(Exception):
    """The run directory does not allow what was asked: another process holds it, it holds a
    run that must not be overwritten, its checkpoints cannot be loaded, or a resume would change
    a key that cannot change. The message is one line; the command exits with status 2 and
    nothing is deleted."""
