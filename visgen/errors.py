"""Errors a user is expected to make (a typo, an occupied directory, a missing file), and how mains report them.

`train.py` and `evaluate.py` print a `UserError` as one line naming the value, the place and the fix, and exit
with status 1; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["UserError", "ConfigValueError", "MissingInputError", "OutputExistsError", "user_error_cause",
           "report_user_errors"]

F = TypeVar("F", bound=Callable[..., Any])


class UserError(Exception):
    """A mistake in the command or its inputs: reported as one line, no traceback."""


class ConfigValueError(UserError, ValueError):
    """A config value that cannot work (out of range, of the wrong kind, contradicting another)."""


class MissingInputError(UserError, FileNotFoundError):
    """A file or shard the command names does not exist."""


class OutputExistsError(UserError, FileExistsError):
    """The output would replace earlier results."""


def user_error_cause(err: BaseException) -> UserError | None:
    """The `UserError` behind `err`: itself, or one it was raised from (Hydra's `instantiate` wraps whatever a
    constructor raises in an InstantiationException, which would otherwise turn a one-line error into a
    traceback)."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        if isinstance(current, UserError):
            return current
        seen.add(id(current))
        current = current.__cause__
    return None


def report_user_errors(main: F) -> F:
    """Wrap a Hydra task function: a `UserError` (also one wrapped by Hydra's instantiate) prints
    `error: <message>` on stderr and exits with status 1."""

    @functools.wraps(main)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        try:
            return main(*args, **kwargs)
        except Exception as err:
            cause = user_error_cause(err)
            if cause is None:
                raise
            print(f"error: {cause}", file=sys.stderr, flush=True)
            sys.exit(1)

    return wrapped  # type: ignore[return-value]


# Hydra's SLURM (submitit) launcher resolves each sweep job's folder (conf/hydra/default.yaml: ${visgen.sweep_dir:..},
# ${visgen.dir_name:..}) inside the job, before any of train.py runs. Unpickling the task function there, which
# report_user_errors wraps, imports this module first: registering the resolvers here makes them exist in the job.
from visgen.dirnames import register_resolvers  # noqa: E402

register_resolvers()
