"""Every Redis key the limits write, in one place.

Every key starts with the prefix (``GATEWAY_REDIS_PREFIX``, default ``gw:``). The keys of
one organization share the hash tag ``{org}``, so that Redis Cluster keeps them in one
slot: a script may only touch keys of one slot, and ``admit.lua`` touches all of them.

    {org}:rate:<subject>:<window>:<count>  sorted set: admitted hits (sliding log)
    {org}:tokens:<subject>:<window>:<cap>  sorted set: token entries by time (sliding log),
      and ...:<cap>:amounts                hash: each entry's tokens, and their "total"
    {org}:gap:<subject>:<token_type>       last admitted request to one token type
    {org}:inflight:<subject>               sorted set: concurrency leases by expiry
    {org}:refusals:<subject>               sorted set: recent refusals of a principal
    {org}:block:<subject>                  a block; its value is when it ends
    {org}:spend / {org}:spike-alerted      spend per minute bucket; alert cooldown
    {ip:<address>}:refusals / :block       the same for callers with no valid token

``<subject>`` is ``o`` for the organization or ``u:<user>`` for one of its users.
"""

from __future__ import annotations

from redis.crc import key_slot

from gateway.errors import ConfigError
from gateway.limits.config import Concurrency, MinInterval, Per, RateLimit, TokenRate


def clean(value: str) -> str:
    # Braces would end the hash tag early and colons would blur the key's fields.
    return value.replace("%", "%25").replace("{", "%7B").replace("}", "%7D").replace(":", "%3A")


def subject(per: Per | str, user: str) -> str:
    return "o" if per == "organization" else f"u:{clean(user)}"


class Keys:
    """The keys under one prefix."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    def org(self, org: str, *parts: str) -> str:
        return f"{self.prefix}{{{clean(org)}}}:" + ":".join(parts)

    def ip(self, address: str, part: str) -> str:
        return f"{self.prefix}{{ip:{clean(address)}}}:{part}"

    def blocks(self, org: str, user: str) -> list[str]:
        """The user's block, then the organization's."""
        return [self.org(org, "block", subject("user", user)), self.org(org, "block", "o")]

    def rate(self, org: str, user: str, rate: RateLimit) -> str:
        window, count = str(rate.window_seconds), str(rate.count)
        return self.org(org, "rate", subject(rate.per, user), window, count)

    def gap(self, org: str, user: str, gap: MinInterval, token_type: str) -> str:
        return self.org(org, "gap", subject(gap.per, user), clean(token_type))

    def inflight(self, org: str, user: str, cap: Concurrency) -> str:
        return self.org(org, "inflight", subject(cap.per, user))

    def tokens(self, org: str, user: str, rate: TokenRate) -> str:
        window_cap = f"{rate.window_seconds}:{rate.count}"
        return self.org(org, "tokens", subject(rate.per, user), window_cap)

    def all_of(self, org: str, user: str, token_type: str) -> list[str]:
        """One key of each kind for one organization: what must share a slot."""
        log = self.tokens(org, user, TokenRate(limit="1/minute"))
        return [
            *self.blocks(org, user),
            self.rate(org, user, RateLimit(limit="1/minute")),
            self.gap(org, user, MinInterval(seconds=1), token_type),
            self.inflight(org, user, Concurrency(max=1)),
            log,
            f"{log}:amounts",
            self.org(org, "refusals", subject("user", user)),
            self.org(org, "spend"),
            self.org(org, "spike-alerted"),
        ]

    def check_slots(self) -> None:
        """Raise ``ConfigError`` unless the keys of one organization share one cluster slot
        (whatever the organization, user and token type are called) and organizations spread
        over slots. A prefix with braces would break either."""
        samples = [("acme", "alice", "general"), ("a{b}:c", "}{", "x:{y}"), ("%7B", ":", "")]
        errors = []
        slots = set()
        for org, user, token_type in samples:
            keys = self.all_of(org, user, token_type)
            found = {key_slot(key.encode()) for key in keys}
            if len(found) != 1:
                errors.append(
                    f"the keys of organization '{org}' fall in {len(found)} cluster slots "
                    f"(e.g. {keys[0]} and {keys[2]}); a script can only use one"
                )
            slots |= found
        if not errors and len(slots) == 1:
            errors.append("every organization's keys fall in one cluster slot")
        if errors:
            raise ConfigError(
                "GATEWAY_REDIS_PREFIX",
                [f"'{self.prefix}': {e}; use a prefix without braces" for e in errors],
            )
