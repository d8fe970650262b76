-- Every limit of one request, in one call: blocks, rate limits (sliding logs), the minimum
-- interval, the concurrency cap (leases) and token rates (sliding logs of amounts). All
-- are checked before any is recorded, and all are recorded only when all pass, so a
-- refused request uses up nothing. Every key belongs to one organization (one hash tag,
-- so one cluster slot). Time is in milliseconds, from the gateway's clock.
--
-- KEYS, in this order (a kind that does not apply has no keys):
--   the user's block, the organization's block      (A[4] of them: 0 or 2)
--   one sorted set of admitted hits per rate        (A[5])
--   the time of the last admitted request           (A[6]: 0 or 1)
--   the sorted set of concurrency leases by expiry  (A[7]: 0 or 1)
--   per token rate: its log (sorted set: entry -> time) and its amounts (hash: entry ->
--   tokens, and "total": the sum over the log)      (A[8] token rates, 2 keys each)
-- ARGV[1] holds every argument below, joined by single spaces (one argument costs the
-- client far less to send than twenty); they are read as A[1], A[2], ...
-- A[1]  now
-- A[2]  "record", or "dry": only tell what would happen; write nothing
-- A[3]  a unique id for this request: its member in the rate logs, its lease, its
--       entry in the token logs (a uuid, so it cannot clash with "total")
-- A[4..8]  the counts of keys above
-- A[9]  the tokens this request holds (>= 0): it fits a token rate when used + tokens
--       <= cap; a hold of 0 still needs used < cap, since its charge is yet to come
-- A[10] the lease's length
-- then per rate: window, hits per window; then the interval (if any); then the cap (if
-- any); then per token rate: window, tokens per window.
-- Returns {admitted (1|0),
--          first active block (1: user, 2: organization, 0: none), its retry_after,
--          per rate:        fits (1|0), hits in the window before this one, reset (when
--                           the oldest hit leaves the window: the retry_after of a refusal),
--          the interval:    fits, retry_after                           (if any),
--          the cap:         fits, leases in force, retry_after           (if any),
--          per token rate:  fits, tokens in the window, retry_after}
local A = {}
for word in string.gmatch(ARGV[1], '%S+') do
  A[#A + 1] = word
end
local now = tonumber(A[1])
local dry = A[2] == 'dry'
local id = A[3]
local n_blocks, n_rates = tonumber(A[4]), tonumber(A[5])
local n_gap, n_cap, n_tokens = tonumber(A[6]), tonumber(A[7]), tonumber(A[8])
local hold = tonumber(A[9])
local lease_ms = tonumber(A[10])
local BATCH = 500

local k, a = 0, 10 -- the last key and argument read
local function next_key()
  k = k + 1
  return KEYS[k]
end
local function next_arg()
  a = a + 1
  return tonumber(A[a])
end

local result = {1}
local function answer(fits, ...)
  if fits == 0 then
    result[1] = 0
  end
  result[#result + 1] = fits
  for _, v in ipairs({...}) do
    result[#result + 1] = v
  end
end

-- Blocks: a block's value is the time it ends.
local blocked, block_retry = 0, 0
for i = 1, n_blocks do
  local ends = redis.call('GET', next_key())
  if blocked == 0 and ends and tonumber(ends) > now then
    blocked, block_retry = i, tonumber(ends) - now
  end
end
if blocked > 0 then
  result[1] = 0
end
result[2], result[3] = blocked, block_retry

-- Rates: at most <count> hits in any window; exact, since each hit is kept.
local rates = {}
for i = 1, n_rates do
  local key, window, count = next_key(), next_arg(), next_arg()
  local hits, reset = in_window(key, window, now)  -- window.lua
  rates[i] = {key, window}
  answer(hits < count and 1 or 0, hits, reset)
end

-- The minimum interval since the last admitted request.
local gap
if n_gap == 1 then
  local key, interval = next_key(), next_arg()
  local last = redis.call('GET', key)
  gap = {key, interval}
  if last and now - tonumber(last) < interval then
    answer(0, interval - (now - tonumber(last)))
  else
    answer(1, 0)
  end
end

-- Concurrency: a lease ends by itself, so a dead gateway's slot frees after its lease.
local cap
if n_cap == 1 then
  local key, max = next_key(), next_arg()
  local held = redis.call('ZCOUNT', key, '(' .. now, '+inf')
  cap = key
  if held < max then
    answer(1, held, 0)
  else
    local first = redis.call('ZRANGEBYSCORE', key, '(' .. now, '+inf', 'WITHSCORES', 'LIMIT', 0, 1)
    answer(0, held, tonumber(first[2]) - now)
  end
end

-- Token rates. The amounts' "total" makes a check cost the entries that left the window,
-- not those in it.
local function amounts_of(hash, members)
  local sum = 0
  for i = 1, #members, BATCH do
    local batch = redis.call('HMGET', hash, unpack(members, i, math.min(i + BATCH - 1, #members)))
    for j = 1, #batch do
      sum = sum + (tonumber(batch[j]) or 0)
    end
  end
  return sum
end

-- The tokens in the window now; trims the entries that left it unless dry.
local function used_in(log, hash, edge)
  local gone = redis.call('ZRANGEBYSCORE', log, '-inf', edge)
  local left = 0
  if #gone > 0 then
    left = amounts_of(hash, gone)
  end
  local total = tonumber(redis.call('HGET', hash, 'total') or '0')
  if #gone > 0 and not dry then
    redis.call('ZREMRANGEBYSCORE', log, '-inf', edge)
    for i = 1, #gone, BATCH do
      redis.call('HDEL', hash, unpack(gone, i, math.min(i + BATCH - 1, #gone)))
    end
    redis.call('HINCRBY', hash, 'total', string.format('%d', -left))
  end
  return total - left
end

-- When the oldest entries in the window will have freed `excess` tokens.
local function retry_after(log, hash, edge, window, excess)
  local offset, freed = 0, 0
  while true do
    local page = redis.call('ZRANGEBYSCORE', log, '(' .. edge, '+inf', 'WITHSCORES', 'LIMIT', offset, BATCH)
    if #page == 0 then
      return window
    end
    local members = {}
    for i = 1, #page, 2 do
      members[#members + 1] = page[i]
    end
    local amounts = redis.call('HMGET', hash, unpack(members))
    for i = 1, #members do
      freed = freed + (tonumber(amounts[i]) or 0)
      if freed >= excess then
        return tonumber(page[2 * i]) + window - now
      end
    end
    offset = offset + BATCH
  end
end

local need = math.max(hold, 1)
local logs = {}
for i = 1, n_tokens do
  local log, hash = next_key(), next_key()
  local window, most = next_arg(), next_arg()
  local edge = now - window
  local used = used_in(log, hash, edge)
  logs[i] = {log, hash, window}
  if used + need <= most then
    answer(1, used, 0)
  elseif need > most then
    answer(0, used, window)
  else
    answer(0, used, retry_after(log, hash, edge, window, used + need - most))
  end
end

if result[1] == 0 or dry then
  return result
end

-- Every limit passed: record the request in each.
for _, rate in ipairs(rates) do
  redis.call('ZREMRANGEBYSCORE', rate[1], '-inf', now - rate[2])
  redis.call('ZADD', rate[1], now, id)
  -- Never shortened: a lease's hits (lease.lua) may be later than now.
  if redis.call('PTTL', rate[1]) < rate[2] then
    redis.call('PEXPIRE', rate[1], rate[2])
  end
end
if gap then
  redis.call('SET', gap[1], now, 'PX', gap[2])
end
if cap then
  redis.call('ZREMRANGEBYSCORE', cap, '-inf', now)
  local expiry = now + lease_ms
  redis.call('ZADD', cap, expiry, id)
  local latest = redis.call('ZRANGE', cap, -1, -1, 'WITHSCORES')
  redis.call('PEXPIREAT', cap, math.max(expiry, tonumber(latest[2])))
end
for _, t in ipairs(logs) do
  -- ZADD answers 0 for a limit listed twice (the same keys): count the hold once.
  if redis.call('ZADD', t[1], now, id) == 1 then
    redis.call('HSET', t[2], id, A[9])
    redis.call('HINCRBY', t[2], 'total', A[9])
  end
  -- Every entry is at most `now`, so all have left the window when the keys expire.
  redis.call('PEXPIRE', t[1], t[3])
  redis.call('PEXPIRE', t[2], t[3])
end
return result
