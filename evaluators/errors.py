"""The one error hierarchy of the harness and the one top-level handler of ``run.py`` and every script.

An error that means "the user must fix something" (a config value, a path, a damaged file, a busy run folder) is a
``HarnessError``; the handler prints it as one line ``error: ...`` on stderr and exits with status 2. Anything else
is a bug and keeps its traceback.
"""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable
from typing import Any, TypeVar

EXIT_USER_ERROR = 2


class HarnessError(RuntimeError):
    """Bad configuration or input; the message says what to fix."""


class ConfigError(HarnessError):
    """A config value has the wrong type, is out of range or names something that is not available."""


class DataError(HarnessError):
    """A data folder or annotation file is missing or malformed; the message says what to fix."""


class IntegrityError(HarnessError):
    """A file's content is not what it should be: a checkpoint that fails its published sha256, or weights and
    data that changed since a run folder was started."""


class RunFolderError(HarnessError):
    """A run folder is busy (another process holds its lock), or holds another run, or cannot be written."""


class DamagedFileError(HarnessError):
    """A file the harness wrote earlier (run_config.json, a manifest, samples.jsonl, summary.json) is unreadable."""


class JavaNotFoundError(HarnessError):
    """``java`` is missing or broken, so the PTB tokenizer (and CIDEr) cannot run."""


class InvariantError(HarnessError):
    """An adversarial image left its eps-ball or the [0, 1] box."""


def user_error(exc: BaseException | None) -> BaseException | None:
    """The user-facing error behind ``exc``, if any. Hydra's ``instantiate`` wraps errors raised while building a
    ``_target_``, so the whole cause chain is searched. A missing file and an unwritable folder count too."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, HarnessError | FileNotFoundError):
            return exc
        if isinstance(exc, PermissionError | IsADirectoryError | NotADirectoryError) or (
            isinstance(exc, OSError) and exc.errno in (28, 30)  # ENOSPC, EROFS
        ):
            return HarnessError(f"cannot write or read {exc.filename}: {exc.strerror}; "
                                "fix the permissions or free space, or choose another folder")
        exc = exc.__cause__ or exc.__context__
    return None


#: lines of Hydra's and OmegaConf's messages that only repeat context (the line before them names the problem)
_NOISE = ("Config search path", "full_key:", "object_type", "reference_type", "provider=")


def one_line(exc: BaseException) -> str:
    """The message of ``exc`` on a single line, without the context lines Hydra and OmegaConf append."""
    parts = []
    for part in str(exc).strip().splitlines():
        part = part.strip()
        if part.startswith(_NOISE):
            break
        if part:
            parts.append(part)
    return " ".join(parts) or type(exc).__name__


def report(exc: BaseException) -> int:
    """Print ``error: <message>`` for a user error and return the exit status; re-raise anything else."""
    cause = user_error(exc)
    if cause is None:
        raise exc
    print(f"error: {one_line(cause)}", file=sys.stderr, flush=True)
    return EXIT_USER_ERROR


F = TypeVar("F", bound=Callable[..., Any])


def main_guard(fn: F) -> F:
    """Wrap a ``main`` so that user errors end the process with one line and exit status 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except KeyboardInterrupt:
            print("error: interrupted; run the same command again to resume", file=sys.stderr, flush=True)
            sys.exit(130)
        except Exception as e:  # noqa: BLE001 (report() re-raises what is not a user error)
            logging.shutdown()
            sys.exit(report(e))

    return wrapper  # type: ignore[return-value]


def cli(main: Callable[[], Any]) -> None:
    """``if __name__ == "__main__": cli(main)`` for every script."""
    main_guard(main)()
