"""Cooperative deadlines: long computations check one :class:`Deadline` between steps.

The bound scheduler checks it before every dual step, chunk of rows and forward node; the
verifier between its phases, boxes and attack rounds. A passed deadline raises
:class:`DeadlineExceeded`, which callers turn into a ``timeout`` answer (not an error).
"""

from __future__ import annotations

import math
import time


class DeadlineExceeded(Exception):
    """The computation ran past its deadline (callers answer ``timeout``)."""


class Deadline:
    """A point in ``time.monotonic()`` time; ``seconds=None`` never expires."""

    __slots__ = ("start", "at")

    def __init__(self, seconds: float | None = None, start: float | None = None) -> None:
        self.start = time.monotonic() if start is None else start
        self.at = math.inf if seconds is None else self.start + max(0.0, float(seconds))

    @property
    def remaining(self) -> float:
        return self.at - time.monotonic()

    @property
    def expired(self) -> bool:
        return time.monotonic() >= self.at

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def check(self) -> None:
        """Raise :class:`DeadlineExceeded` once the deadline has passed."""
        if self.at != math.inf and time.monotonic() >= self.at:
            raise DeadlineExceeded


NEVER = Deadline()
"""The deadline that never passes (the default everywhere)."""
