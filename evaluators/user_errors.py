"""Exception types that mean bad input (a path, a value, a file) rather than a bug: reported in one line."""

from __future__ import annotations

from attacks.base import InvariantError
from evaluators.datasets.base import DataError
from evaluators.metrics.cider import JavaNotFoundError

USER_ERRORS: tuple[type[BaseException], ...] = (DataError, FileNotFoundError, InvariantError, JavaNotFoundError)
