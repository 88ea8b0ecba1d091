"""What every ``python -m mgjax.<command>`` line shares."""

from __future__ import annotations

import argparse


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` with descriptions as written (they are docstrings, wrapped already) and each flag's default after
    its help, unless there is none to show: a required flag, a switch, or a default of None or empty, whose meaning
    the help text says itself."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.required or action.default is None or action.default is False or action.default in ("", []):
            return action.help
        return super()._get_help_string(action)
