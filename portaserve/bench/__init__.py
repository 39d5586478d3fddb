"""Benchmarks (``portaserve bench NAME``); option types shared by their parsers."""
from __future__ import annotations

import argparse


def at_least(lo, kind=int):
    """An argparse type: a `kind` number >= lo, else an error naming the option."""
    def parse(s: str):
        try:
            v = kind(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{s!r} is not {'an integer' if kind is int else 'a number'}") from None
        if not v >= lo:  # also refuses nan
            raise argparse.ArgumentTypeError(f"must be at least {lo}, got {s}")
        return v
    parse.__name__ = kind.__name__  # what argparse calls the type in its messages
    return parse


def fraction(s: str) -> float:
    """An argparse type: a number in [0, 1]."""
    v = at_least(0.0, float)(s)
    if v > 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {s}")
    return v


def positive(s: str) -> float:
    """An argparse type: a number > 0 (inf allowed)."""
    v = at_least(0.0, float)(s)
    if v == 0:
        raise argparse.ArgumentTypeError(f"must be greater than 0, got {s}")
    return v


def out_file(s: str) -> str:
    """An argparse type: a file the results can be written to, checked (created) before the
    run rather than found unwritable after it."""
    try:
        open(s, "a").close()
    except OSError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return s


POS, NONNEG = at_least(1), at_least(0)
