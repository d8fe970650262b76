"""The benchmark's two ways of stopping early.

BaseException
 +-- Interrupted   SIGTERM, unwound like Ctrl-C
Exception
 +-- BenchError    the run cannot go on, or its result is not to be trusted
"""

from __future__ import annotations


class BenchError(Exception):
    """The benchmark cannot go on or its result is not to be trusted; the message says why."""


class Interrupted(BaseException):
    """SIGTERM: unwind like Ctrl-C so that every subprocess is stopped."""
