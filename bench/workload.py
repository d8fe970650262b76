"""What every target is sent, and whom the gateway bills for it: one copy, used by the load
generators, the seeding and the ledger check (bench/post.lua reads BODY from $BENCH_BODY)."""

from __future__ import annotations

import json

TARGETS = ("upstream", "passthrough", "gateway")
PATH = "/v1/chat/completions"
BODY = json.dumps({"model": "sample-1", "messages": [{"role": "user", "content": "Hello"}]})
ORG, USER, TOKEN_TYPE, PLAN = "bench", "bench", "general", "enterprise"
GRANT = 100_000_000  # tokens: far more than any run can spend (the route costs 1)
