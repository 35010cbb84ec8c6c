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


def add_threads_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=integer(1), help="torch CPU threads (default: torch's choice). On a CPU shared "
                                                      "with other jobs, 1 is often faster: small ops stall on OpenMP "
                                                      "barriers")


def set_threads(n: int | None) -> None:
    if n is not None:
        import torch

        torch.set_num_threads(n)


def progress_bar(console):
    """The rich progress bar of the saliency experiments (bench.wsss, bench.window): description, bar, n/N, time."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console, transient=False)


def check_calibration_lr(calibration_lr: float, heatmap_scale, background: str) -> None:
    """--calibration-lr scales the lr of the calibration scalars (a learnt heatmap scale, a constant background level);
    without either it would change nothing, so say so instead of running."""
    if calibration_lr != 1.0 and heatmap_scale != "learn" and background != "constant":
        raise ValueError("--calibration-lr scales the lr of the learnt heatmap scale and background level; with a "
                         "fixed --heatmap-scale and --background heatmap there are none")
