"""Kept for imports of older code: the error hierarchy and its handler live in ``evaluators.errors``."""

from __future__ import annotations

from evaluators.errors import HarnessError, user_error

USER_ERRORS: tuple[type[BaseException], ...] = (HarnessError, FileNotFoundError)

__all__ = ["USER_ERRORS", "user_error"]
