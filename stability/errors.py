"""The one error type for bad user input, raised before any work starts."""

from __future__ import annotations


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
