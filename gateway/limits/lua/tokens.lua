-- Token-rate limits: at most <cap> tokens in any window of <window> ms, for every limit of
-- a request at once. All limits are checked before any records, so a refused request
-- leaves no trace. Each limit is a sliding log of entries, one per admitted request:
--   the log      sorted set: entry -> its time (entries older than the window are trimmed)
--   the amounts  hash: entry -> its tokens (the hold, then the charge once settled), and
--                the field "total": the sum of the tokens of every entry in the log, so
--                a check costs the entries that left the window, not those in it.
-- Entries are unique uuids, so "total" cannot clash with one.
-- KEYS[2i-1]  limit i's log
-- KEYS[2i]    limit i's amounts
-- ARGV[1]     now, in milliseconds (the gateway's clock, so replicas and tests agree)
-- ARGV[2]     this request's entry (a unique member)
-- ARGV[3]     tokens this request holds (>= 0). It is admitted when used + tokens <= cap;
--             a hold of 0 still needs used < cap, since its charge is yet to come.
-- ARGV[4]     "dry": only tell whether the request would be admitted; record nothing
-- ARGV[3+2i]  limit i's window, in milliseconds
-- ARGV[4+2i]  limit i's cap, in tokens
-- Returns {admitted (1|0), then for each limit: fits (1|0), used, retry_after_ms}: used is
-- the tokens in the window before this request; retry_after_ms is when enough entries
-- will have left the window for this request to fit (the whole window if it never can).
local now = tonumber(ARGV[1])
local entry = ARGV[2]
local tokens = tonumber(ARGV[3])
local dry = ARGV[4] == 'dry'
local need = math.max(tokens, 1)
local BATCH = 500

local function amounts_of(hash, members, first, last)
  local sum = 0
  for i = first, last, BATCH do
    local batch = redis.call('HMGET', hash, unpack(members, i, math.min(i + BATCH - 1, last)))
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
    left = amounts_of(hash, gone, 1, #gone)
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
  local offset = 0
  local freed = 0
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

local result = {1}
for i = 1, #KEYS / 2 do
  local log, hash = KEYS[2 * i - 1], KEYS[2 * i]
  local window = tonumber(ARGV[3 + 2 * i])
  local cap = tonumber(ARGV[4 + 2 * i])
  local edge = now - window
  local used = used_in(log, hash, edge)
  local fits, retry = 1, 0
  if used + need > cap then
    fits = 0
    result[1] = 0
    if need > cap then
      retry = window
    else
      retry = retry_after(log, hash, edge, window, used + need - cap)
    end
  end
  result[#result + 1] = fits
  result[#result + 1] = used
  result[#result + 1] = retry
end

if result[1] == 1 and not dry then
  for i = 1, #KEYS / 2 do
    local log, hash = KEYS[2 * i - 1], KEYS[2 * i]
    local window = tonumber(ARGV[3 + 2 * i])
    -- ZADD answers 0 for a limit listed twice (the same keys): count the hold once.
    if redis.call('ZADD', log, now, entry) == 1 then
      redis.call('HSET', hash, entry, ARGV[3])
      redis.call('HINCRBY', hash, 'total', ARGV[3])
    end
    -- Every entry is at most `now`, so all have left the window when the keys expire.
    redis.call('PEXPIRE', log, window)
    redis.call('PEXPIRE', hash, window)
  end
end
return result
