"""What every ``python -m mgjax.<command>`` line shares."""

from __future__ import annotations

import argparse
import math


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
