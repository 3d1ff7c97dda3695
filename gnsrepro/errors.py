"""Errors a user can fix, reported as one line before any compute instead of as a traceback."""

from __future__ import annotations

import functools
import sys


class ConfigError(ValueError):
    """A setting has a value it cannot take; the message names the setting and what it accepts."""


class DivergedError(FloatingPointError):
    """Training stopped on a non-finite loss; the message says which step and what was kept."""


def _user_error_types() -> tuple[type[BaseException], ...]:
    from gnsrepro.data.prepare import DataError
    from gnsrepro.data.tokenizer import TokenizerUnavailable

    return ConfigError, DivergedError, DataError, TokenizerUnavailable


def exit_on_user_error(command: str):
    """Decorator for a CLI task: a user error prints `gnsrepro <command>: error: <message>` and exits 2;
    Ctrl-C exits 130 without a traceback."""

    def wrap(fn):
        @functools.wraps(fn)
        def inner(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except _user_error_types() as e:
                print(f"gnsrepro {command}: error: {e}", file=sys.stderr)
                sys.exit(2)
            except KeyboardInterrupt:
                print(f"gnsrepro {command}: interrupted", file=sys.stderr)
                sys.exit(130)

        return inner

    return wrap
