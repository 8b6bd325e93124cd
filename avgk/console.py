"""avgk's own console lines, written straight to stdout.

Ray Train patches print() on its workers to log *and* echo each line (twice on the driver), and
Ray's log monitor prefixes worker output; writing to sys.stdout directly gives one plain line.
"""

from __future__ import annotations

import sys


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()
