-- wrk script for bench/run.py: every request is a small non-streamed chat completion.
--
-- The body comes from $BENCH_BODY when set (the bench sets it from bench/workload.py,
-- which holds the one copy); the default below is the same body, for running wrk by hand:
--
--   wrk -t2 -c32 -d10s --latency -s bench/post.lua \
--       -H "Authorization: Bearer $TOKEN" http://127.0.0.1:8080/v1/chat/completions
--
-- No request() or response() callback: wrk then builds the request once and does no Lua
-- work per request, so the load generator stays as cheap as it can be.
wrk.method = "POST"
wrk.body = os.getenv("BENCH_BODY")
    or '{"model": "sample-1", "messages": [{"role": "user", "content": "Hello"}]}'
wrk.headers["Content-Type"] = "application/json"
