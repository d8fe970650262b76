-- Concurrency cap with leases: a slot is a member of a sorted set scored by its lease's
-- expiry, so the slot of a gateway that died mid-request frees itself when its lease ends.
-- KEYS[1]  sorted set of leases
-- ARGV[1]  now, in milliseconds
-- ARGV[2]  the cap
-- ARGV[3]  the lease id to take
-- ARGV[4]  lease length, in milliseconds
-- ARGV[5]  "dry": only tell whether a slot is free; take nothing
-- Returns {admitted (1|0), in_flight_after, retry_after_ms}: retry_after_ms is when the
-- earliest lease ends if nothing is released before.
local key = KEYS[1]
local now = tonumber(ARGV[1])
local cap = tonumber(ARGV[2])
local count = redis.call('ZCOUNT', key, '(' .. now, '+inf')
if ARGV[5] == 'dry' then
  return {count < cap and 1 or 0, count, 0}
end
redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
if count < cap then
  local expiry = now + tonumber(ARGV[4])
  redis.call('ZADD', key, expiry, ARGV[3])
  local latest = redis.call('ZRANGE', key, -1, -1, 'WITHSCORES')
  redis.call('PEXPIREAT', key, math.max(expiry, tonumber(latest[2])))
  return {1, count + 1, 0}
end
local first = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
return {0, count, tonumber(first[2]) - now}
