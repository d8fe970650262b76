"""What every target is sent, and whom the gateway bills for it: one copy, used by the load
generators, the bench upstream, the bench's routes, the seeding and the ledger checks
(bench/post.lua reads BODY from $BENCH_BODY)."""

from __future__ import annotations

import json

TARGETS = ("upstream", "passthrough", "gateway")
PATH = "/v1/chat/completions"  # the bench's fixed-cost route: every ratio is measured here
USAGE_PATH = "/v1/usage/chat/completions"  # the bench's usage-priced route: extra lines
BODY = json.dumps({"model": "sample-1", "messages": [{"role": "user", "content": "Hello"}]})
ORG, USER, TOKEN_TYPE, PLAN = "bench", "bench", "general", "enterprise"
GRANT = 100_000_000  # tokens: far more than any run can spend
FIXED_COST = 1

# The usage-priced route's rates, in tokens per 1,000 of each counter (as rules.yaml's
# chat_completions route has them), and its hold.
USAGE_RATES = {"input": 100, "output": 200}
USAGE_HOLD = 20

# Streams: the bench upstream answers a request with "stream": true and ?events=N with N
# chat completion chunks EVENT_INTERVAL seconds apart, then a usage chunk and [DONE].
STREAM_EVENTS = 20
EVENT_INTERVAL = 0.05
STREAM_QUERY = f"?events={STREAM_EVENTS}"
STREAM_BODY = json.dumps(
    {
        "model": "sample-1",
        "messages": [{"role": "user", "content": "Hello"}],
        "stream": True,
        "stream_options": {"include_usage": True},
    }
)
# The header by which the bench upstream tells the gateway's requests from the others:
# the gateway adds it to every request it forwards; the pass-through and wrk never send it.
FORWARDED_BY_GATEWAY = "X-Gateway-Organization"


def usage_charge(prompt_tokens: int, completion_tokens: int) -> int:
    """What the usage-priced route charges for a reported usage: the counters at
    USAGE_RATES per 1,000, rounded up once over the sum (the gateway's rule, redone here in
    integers so that the check does not trust the code it checks)."""
    total = prompt_tokens * USAGE_RATES["input"] + completion_tokens * USAGE_RATES["output"]
    return -(-total // 1000)
