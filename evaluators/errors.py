"""Errors that mean "the user must fix something": reported as one line, exit status 2."""

from __future__ import annotations


class HarnessError(RuntimeError):
    """Bad configuration or input; the message says what to fix."""


class ConfigError(HarnessError):
    """A config value is out of range or names something that is not available."""
