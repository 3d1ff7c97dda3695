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


# ---- Hydra's composition errors as one line ------------------------------------------------------------
# Hydra reports a bad override in several lines (and a search path); the README promises one line naming
# the setting and what it accepts. These turn the exceptions of hydra's compose into that line.

_KIND = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def _override_of(key: str, overrides: list[str]) -> str | None:
    """The last command-line override that sets key (`key=v`, `+key=v`, `++key=v`), if any."""
    for override in reversed(overrides):
        name, eq, _ = override.partition("=")
        if eq and name.lstrip("+~") == key:
            return override
    return None


def _kind(annotation) -> str | None:
    """'an integer', 'a number or null', 'a list of integers', ... for a dataclass field's annotation."""
    import typing

    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Union and type(None) in args:
        inner = [a for a in args if a is not type(None)]
        kind = _kind(inner[0]) if len(inner) == 1 else None
        return f"{kind} or null" if kind else None
    if origin is list and len(args) == 1 and args[0] in _KIND:
        return f"a list of {_KIND[args[0]].removeprefix('an ').removeprefix('a ')}s such as [0, 1]"
    return _KIND.get(annotation)


def _field_kind(object_type, key) -> str | None:
    import dataclasses
    import typing

    if not (isinstance(object_type, type) and dataclasses.is_dataclass(object_type)):
        return None
    try:
        return _kind(typing.get_type_hints(object_type).get(str(key)))
    except (NameError, TypeError):  # an annotation that does not resolve: fall back to OmegaConf's words
        return None


def _group_options(group: str, config_dir: str | None, fallback) -> tuple[list[str], bool]:
    """(the options of a config group, whether they are the yaml files of conf/<group>/).

    The yaml names, not Hydra's list: that one also holds the schemas stored in Hydra's ConfigStore.
    """
    from pathlib import Path

    folder = Path(config_dir) / group if config_dir else None
    if folder is not None and folder.is_dir():
        # nested options too (experiment=schedule/small is conf/experiment/schedule/small.yaml)
        return sorted(p.relative_to(folder).with_suffix("").as_posix() for p in folder.rglob("*.yaml")), True
    return list(fallback or []), False


def _first_lines(text: str) -> str:
    """A multi-line message as one line: its lines up to Hydra's config search path, joined by '; '."""
    lines = []
    for line in str(text).splitlines():
        line = line.strip()
        if line.startswith(("Config search path", "full_key:", "object_type=", "reference_type=")):
            break
        if line and line.strip("^ "):  # a caret under the offending character means nothing on one line
            lines.append(line)
    return "; ".join(lines)


def hydra_error_line(error: BaseException, overrides: list[str], config_dir: str | None = None) -> str:
    """One line for an error of composing a Hydra config, naming the setting and what it accepts.

    error: what hydra's compose raised (a ConfigCompositionException, its MissingConfigException and
    OverrideParseException subclasses, or an OmegaConf error); overrides: the command line's overrides,
    to quote the one at fault; config_dir: conf/, whose group folders list the accepted options.
    """
    import difflib

    from hydra.errors import MissingConfigException, OverrideParseException
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, ValidationError

    cause = error if isinstance(error, (ConfigKeyError, ConfigAttributeError, ValidationError)) else error.__cause__
    if isinstance(error, MissingConfigException) and "/" in (error.missing_cfg_file or ""):
        group, _, choice = error.missing_cfg_file.rpartition("/")
        options, in_conf = _group_options(group, config_dir, error.options)
        where = f" (no conf/{group}/{choice}.yaml)" if in_conf else ""
        return f"{group}={choice} is not known{where}; accepted: {', '.join(options) or 'none found'}"
    if isinstance(error, OverrideParseException):
        return (f"cannot read the override {error.override!r}: {_first_lines(error.message).split('; See ')[0]} "
                "(the grammar: https://hydra.cc/docs/advanced/override_grammar/basic/)")
    if isinstance(cause, (ConfigKeyError, ConfigAttributeError)) and cause.full_key and " not in " in str(cause.msg):
        full_key, key = str(cause.full_key), str(cause.key)
        parent = full_key[: -len(key)].rstrip(".") if full_key.endswith(key) else full_key.rpartition(".")[0]
        node = getattr(cause, "parent_node", None)
        valid = [str(k) for k in node.keys() if k != "hydra"] if hasattr(node, "keys") else []
        close = difflib.get_close_matches(key, valid, n=3, cutoff=0.6)
        named = [f"{parent}.{k}" if parent else k for k in (close or valid)]
        given = _override_of(full_key, overrides) or full_key
        if close:
            return f"{given}: there is no setting {full_key}; did you mean {' or '.join(named)}?"
        return f"{given}: there is no setting {full_key}; {parent or 'the top level'} accepts: {', '.join(named)}"
    if isinstance(cause, ValidationError) and cause.full_key:
        full_key = str(cause.full_key)
        given = _override_of(full_key, overrides) or f"{full_key}={cause.value}"
        kind = _field_kind(cause.object_type, cause.key)
        if kind:
            return f"{given}: {full_key} takes {kind}"
        return f"{given}: {_first_lines(cause.msg)}"
    text = _first_lines(str(error))
    if text.startswith("Ambiguous value for argument"):
        given = text.split("'")[1] if text.count("'") >= 2 else text
        key, _, value = given.partition("=")
        return (f"{given} is a sweep: add -m to run one job per value, or write {key}=[{value}] for a list, "
                f"{key}='{value}' for a string")
    if cause is not None and _first_lines(str(cause)) not in text:
        text = f"{text}: {_first_lines(str(cause))}"
    return text
