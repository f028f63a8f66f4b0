"""Exception types that mean bad input (a path, a value, a file) rather than a bug: reported in one line."""

from __future__ import annotations

from attacks.base import InvariantError
from evaluators.datasets.base import DataError
from evaluators.errors import HarnessError
from evaluators.metrics.cider import JavaNotFoundError

USER_ERRORS: tuple[type[BaseException], ...] = (HarnessError, DataError, FileNotFoundError, InvariantError,
                                                 JavaNotFoundError)


def user_error(exc: BaseException) -> BaseException | None:
    """The user-facing error behind ``exc``, if any: Hydra's instantiate wraps errors raised while building
    a ``_target_``, so the cause chain is searched too."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, USER_ERRORS):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None
