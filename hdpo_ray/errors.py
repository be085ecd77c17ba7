"""The two kinds of error a user sees as one line instead of a traceback, and the exit code of each.

Every module raises a subclass of one of them (ConfigError, DataError, ResourceError, ... are UserErrors;
TrainingStopped is Stopped); the CLI finds it with `user_facing` and exits with its code. Anything else
is a bug or an outage and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """Input the user can fix (a config key, a file, a data row, a cluster too small): exit status 2."""

    exit_code = 2


class Stopped(Exception):
    """A run that started and stopped itself on purpose (e.g. non-finite losses): exit status 1."""

    exit_code = 1


def user_facing(err: BaseException | None) -> UserError | Stopped | None:
    """The UserError or Stopped in err's chain of causes (Ray wraps a worker's error as `cause`), or None."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, (UserError, Stopped)):
            return err
        seen.add(id(err))
        err = getattr(err, "cause", None) or err.__cause__
    return None
