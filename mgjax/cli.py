"""What every ``python -m mgjax.<command>`` line shares: its help format, typed numeric flags, the compilation cache."""

from __future__ import annotations

import argparse
import math
import os


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` with descriptions as written (they are docstrings, wrapped already) and each flag's default after
    its help, unless there is none to show: a required flag, a switch, or a default of None or empty, whose meaning
    the help text says itself."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.required or action.default is None or action.default is False or action.default in ("", []):
            return action.help
        return super()._get_help_string(action)


def integer(lo: int, hi: int | None = None):
    """An argparse ``type``: an integer in ``[lo, hi]``; anything else is a usage error (exit 2) naming the flag."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < lo or (hi is not None and value > hi):
            raise argparse.ArgumentTypeError(f"must be {_range(lo, hi)}, not {value}")
        return value

    return parse


def number(lo: float, hi: float | None = None):
    """An argparse ``type``: a finite number in ``[lo, hi]``."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value) or value < lo or (hi is not None and value > hi):
            raise argparse.ArgumentTypeError(f"must be a finite number {_range(lo, hi)}, not {text}")
        return value

    return parse


def _range(lo, hi) -> str:
    return f">= {lo}" if hi is None else f"from {lo} to {hi}"


CACHE_ENV = "MGJAX_COMPILATION_CACHE"


def cache_home() -> str:
    """The user's cache folder: ``$XDG_CACHE_HOME``, else ``~/.cache``."""
    return os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")


def compilation_cache() -> str | None:
    """Turn on JAX's persistent compilation cache for this command, so a second run of it loads its programs
    instead of compiling them (``generate`` on the demo's model: most of a call is compiling). The folder:
    ``$MGJAX_COMPILATION_CACHE`` (``off`` disables it), else ``$XDG_CACHE_HOME/mgjax/jax`` (``~/.cache``); JAX's own
    ``JAX_COMPILATION_CACHE_DIR``, when set, wins. Returns the folder in use, or None."""
    import jax

    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return os.environ["JAX_COMPILATION_CACHE_DIR"]
    choice = os.environ.get(CACHE_ENV, "")
    if choice.lower() in ("off", "0", "false", "no"):
        return None
    path = choice or os.path.join(cache_home(), "mgjax", "jax")
    jax.config.update("jax_compilation_cache_dir", path)
    # every program, however quick to compile: a command's start-up is many small ones (JAX keeps those over 1 s)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    return path
