"""avgk's own console lines, written straight to stdout.

Ray Train patches print() on its workers to log *and* echo each line (twice on the driver), and
Ray's log monitor prefixes worker output; writing to sys.stdout directly gives one plain line.
"""

from __future__ import annotations

import os
import re
import sys


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


VERBOSE_ENV = "AVGK_VERBOSE"


def verbose() -> bool:
    """`avgk -v`: show every line Ray and MLflow print, including the ones avgk lowers by default."""
    return os.environ.get(VERBOSE_ENV) == "1"


NOISE = re.compile(
    "|".join([
        # Ray Train's controller and Ray Data's actor pools, every run: about restarts Ray itself configures.
        r"core_worker\.cc:\d+: Actor with class name: .* has constructor arguments in the object store",
    ])
)
"""Lines from Ray's processes that a user cannot act on, dropped from the console unless verbose();
they stay in Ray's own log files (/tmp/ray/session_latest/logs)."""

NOISE_WITH_TRACEBACK = re.compile(
    # Ray Train's controller on a machine too busy to answer within its timeout; Ray retries, and says so.
    r"Failed to send resource request for train-.*safe to ignore"
)
"""Noise that Ray logs with a traceback below it: the line and its traceback are dropped unless verbose()."""

TRACEBACK_LINE = re.compile(r"Traceback \(most recent call last\):|\s|[\w.]+(Error|Exception)\b")
"""A line of a Python traceback: its header, an indented frame or source line, the exception line."""
