"""Verified tokens, kept by their whole text so that a token is verified once, not on
every request.

A hit never accepts a token that verifying it again would refuse:

- it is refused once ``now >= exp + leeway``, the verifier's own rule (PyJWT refuses
  ``exp <= now - leeway``), read on the same wall clock; the entry is dropped;
- before ``nbf - leeway`` or ``iat - leeway`` (the wall clock went back) it is dropped and
  the token verified again;
- it is trusted no longer than its verifier says (``trusted_until``: the key set's next
  refresh for JWKS keys) and never longer than ``MAX_AGE_SECONDS``. Tokens without ``exp``
  (accepted only when ``auth.require`` leaves it out) are therefore re-verified at least
  every ``MAX_AGE_SECONDS`` too.

Refusals are never cached. The cache holds at most ``capacity`` tokens and evicts the least
recently used. It belongs to one ``Authenticator``, which is built per rules version, so a
rules reload starts with an empty cache.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from gateway.errors import InvalidToken

T = TypeVar("T")

CAPACITY = 10_000
MAX_AGE_SECONDS = 300.0
EXPIRED = "token has expired"


@dataclass(frozen=True, slots=True)
class _Entry(Generic[T]):
    value: T
    expires_at: float  # wall clock: refused from here on
    not_before: float  # wall clock: verified again before this
    stale_at: float  # monotonic: verified again from here on


class TokenCache(Generic[T]):
    """What verifying a token gave (a principal), by the token's whole text.

    ``leeway`` is the verifier's leeway in seconds; ``wall_clock`` must be the clock the
    verifier reads (seconds since the epoch, as ``exp`` is); ``clock`` is monotonic and
    times ``MAX_AGE_SECONDS`` and ``trusted_until``."""

    def __init__(
        self,
        *,
        leeway: int,
        capacity: int = CAPACITY,
        max_age: float = MAX_AGE_SECONDS,
        wall_clock: Callable[[], float] = time.time,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, not {capacity}")
        self._leeway = leeway
        self._capacity = capacity
        self._max_age = max_age
        self._wall_clock = wall_clock
        self._clock = clock
        self._entries: OrderedDict[str, _Entry[T]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, token: str) -> T | None:
        """The value kept for ``token``, or None when the token must be verified (never
        kept, evicted, stale, or the wall clock is before its ``nbf``/``iat``). Raises
        ``InvalidToken`` once the token has expired, and forgets it."""
        entry = self._entries.get(token)
        if entry is None:
            return None
        now = self._wall_clock()
        if now >= entry.expires_at:
            del self._entries[token]
            raise InvalidToken(EXPIRED)
        if now < entry.not_before or self._clock() >= entry.stale_at:
            del self._entries[token]
            return None
        self._entries.move_to_end(token)
        return entry.value

    def put(
        self,
        token: str,
        value: T,
        claims: Mapping[str, Any],
        *,
        trusted_until: float = math.inf,
    ) -> None:
        """Keep ``value`` for ``token``, whose ``claims`` were verified just now, until the
        token expires, ``MAX_AGE_SECONDS`` pass or the monotonic ``trusted_until``, whichever
        comes first. Evicts the least recently used token beyond ``capacity``."""
        # The verifier has read these claims with int() already, so int() cannot fail here
        # and truncates a fractional claim exactly as the verifier did.
        expires_at = int(claims["exp"]) + self._leeway if "exp" in claims else math.inf
        starts = [int(claims[c]) for c in ("nbf", "iat") if c in claims]
        not_before = max(starts) - self._leeway if starts else -math.inf
        now = self._clock()
        stale_at = min(now + self._max_age, trusted_until)
        if stale_at <= now:
            return  # e.g. a key set kept through a failed refresh: verify every time
        self._entries[token] = _Entry(value, expires_at, not_before, stale_at)
        self._entries.move_to_end(token)
        while len(self._entries) > self._capacity:
            self._entries.popitem(last=False)

    def clear(self) -> None:
        """Forget every token (the keys that verified them have changed)."""
        self._entries.clear()
