-- Sliding-log rate limit: at most ARGV[3] hits in any window of ARGV[2] ms.
-- Exact (no boundary burst): each admitted hit is a member of a sorted set scored by its
-- time; hits older than the window are trimmed before counting.
-- KEYS[1]  sorted set of admitted hits
-- ARGV[1]  now, in milliseconds (the gateway's clock, so replicas and tests agree)
-- ARGV[2]  window, in milliseconds
-- ARGV[3]  limit (hits per window)
-- ARGV[4]  a unique member for this hit
-- ARGV[5]  "dry": only tell whether the hit would be admitted; record nothing
-- Returns {admitted (1|0), remaining, retry_after_ms, reset_ms}: reset_ms is when the
-- oldest hit in the window leaves it (the quota's next refill).
local key = KEYS[1]
local now = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
local limit = tonumber(ARGV[3])

local count = redis.call('ZCOUNT', key, now - window + 1, '+inf')
if ARGV[5] ~= 'dry' then
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now - window)
end
local oldest = redis.call('ZRANGEBYSCORE', key, now - window + 1, '+inf', 'WITHSCORES', 'LIMIT', 0, 1)
local reset = window
if oldest[2] then
  reset = tonumber(oldest[2]) + window - now
end
if count < limit then
  if ARGV[5] == 'dry' then
    return {1, limit - count - 1, 0, reset}
  end
  redis.call('ZADD', key, now, ARGV[4])
  redis.call('PEXPIRE', key, window)
  return {1, limit - count - 1, 0, reset}
end
return {0, 0, reset, reset}
