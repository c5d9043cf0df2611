"""Config files (`--config=FILE[:ARG]`): loading, and the arguments a file accepts.

A config file is a Python file with `get_config(arg)` returning an `ml_collections.ConfigDict`;
ARG (after the first ":") is a comma-separated list of the arguments the file declares, e.g.
`configs/toy.py:debug`. Every command line (training, evaluation, sweeps) loads files here, so
a mistyped argument, a file without `get_config`, or one that returns something other than a
ConfigDict (a dict, None) fails at start-up with one line naming the file.
"""

from __future__ import annotations

import importlib.util
import os
import traceback
from collections.abc import Iterable

import ml_collections
from absl import flags
from ml_collections import config_flags


class ConfigArgError(ValueError):
    """A config file's argument it does not declare (the message names file and argument)."""


def config_args(arg: str | None, accepted: Iterable[str], path: str) -> set[str]:
    """The comma-separated `arg` of `path`'s `get_config(arg)` as a set; an argument not in
    `accepted` (what the file declares) is an error naming it and the accepted ones."""
    args = {a.strip() for a in (arg or "").split(",") if a.strip()}
    accepted = tuple(accepted)
    if unknown := sorted(args - set(accepted)):
        rel = os.path.relpath(path)  # as typed when it lies below the working directory
        shown = path if rel.startswith("..") else rel
        raise ConfigArgError(
            f"{shown}: unknown config argument(s) {', '.join(map(repr, unknown))} "
            f"(in {arg!r}); accepted: {', '.join(accepted) or 'none'}"
        )
    return args


def load(spec: str, *, lock: bool = True) -> ml_collections.ConfigDict:
    """`get_config(arg)` of the file in `spec` = "FILE[:ARG]", checked to be a ConfigDict."""
    path, sep, arg = spec.partition(":")
    if not os.path.isfile(path):
        what = "is a directory, not a file" if os.path.isdir(path) else "no such file"
        raise ValueError(f"{path}: {what} (--config=FILE[:ARG], FILE a Python config file)")
    module_spec = importlib.util.spec_from_file_location("apo_jax_config_file", path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
        get_config = getattr(module, "get_config", None)
        if not callable(get_config):
            raise ValueError(f"{path}: defines no get_config(arg)")
        config = get_config(arg) if sep else get_config()
    except ConfigArgError:
        raise
    except Exception as e:  # noqa: BLE001 (a bug in a config file: keep its traceback)
        if isinstance(e, ValueError) and str(e).startswith(f"{path}:"):
            raise
        raise ValueError(
            f"{path}: loading it raised {type(e).__name__}: {e}\n\n{traceback.format_exc()}"
        ) from None
    if not isinstance(config, ml_collections.ConfigDict):
        hint = {
            type(None): " (a missing `return` statement?)",
            dict: " (wrap it: ml_collections.ConfigDict({...}))",
        }.get(type(config), "")
        call = f"get_config({arg!r})" if sep else "get_config()"
        raise ValueError(
            f"{path}: {call} returned {type(config).__name__}, not an "
            f"ml_collections.ConfigDict{hint}"
        )
    if lock:
        config.lock()
    return config


class _Parser(flags.ArgumentParser):
    """The `--config` flag's parser: what ml_collections' file parser does, through `load`."""

    def parse(self, argument):
        return load(argument)

    def flag_type(self):
        return "config object"


def define_flag(
    name: str, flag_values: flags.FlagValues = flags.FLAGS, sys_argv: list[str] | None = None
) -> flags.FlagHolder:
    """`--config=FILE[:ARG]` with `--config.KEY=VALUE` overrides on the locked config, as
    ml_collections' DEFINE_config_file, with the file loaded by `load` (one-line errors)."""
    help_string = "Python config file FILE[:ARG] (get_config(arg) -> ConfigDict)."
    holder = config_flags.DEFINE_config_file(
        name, None, help_string, flag_values=flag_values, lock_config=True, sys_argv=sys_argv
    )
    flag_values[name].parser = _Parser()
    return holder
