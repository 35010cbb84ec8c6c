"""argparse value types and the help formatter shared by the bench CLIs: a bad flag is a usage error that says what
was expected, and --help shows every flag's default."""

from __future__ import annotations

import argparse
import math


def integer(low: int):
    """An int >= low."""
    what = f"an integer >= {low}" + (" (a positive integer)" if low == 1 else "")

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
        return value
    return parse


def number(low: float, strict: bool):
    """A finite float > low (strict) or >= low."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value) or value < low or (strict and value == low):
            raise argparse.ArgumentTypeError(f"expected a number {'>' if strict else '>='} {low:g}, got {text}")
        return value
    return parse


def class_chunks(text: str) -> int | str | None:
    """``unroll.compile(classes_per_chunk=)``: a positive integer, 'none' (all classes in one pass) or 'auto'."""
    if text in ("auto", "none"):
        return None if text == "none" else text
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, 'none' or 'auto', got {text!r}")
    return n


class Help(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's defaults in --help, shown only where there is one (not None, not an on/off switch) and the help
    does not already say it."""

    def _get_help_string(self, action):
        if action.default is None or action.nargs == 0 or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)
