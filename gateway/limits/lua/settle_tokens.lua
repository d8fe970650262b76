-- Settle one request's entries in token-rate logs (see tokens.lua): its hold becomes what
-- it was charged (more, less, or 0 for a refund). The entry keeps its time, so the charge
-- counts in the window the hold was admitted in. Setting the same charge again changes
-- nothing; an entry that has left its window is not touched.
-- KEYS[2i-1]  limit i's log
-- KEYS[2i]    limit i's amounts
-- ARGV[1]     now, in milliseconds
-- ARGV[2]     the entry
-- ARGV[3]     the charge, in tokens (>= 0)
-- ARGV[3+i]   limit i's window, in milliseconds
-- Returns {entries settled}.
local now = tonumber(ARGV[1])
local entry = ARGV[2]
local settled = 0
for i = 1, #KEYS / 2 do
  local log, hash = KEYS[2 * i - 1], KEYS[2 * i]
  local at = redis.call('ZSCORE', log, entry)
  local before = redis.call('HGET', hash, entry)
  if at and before and tonumber(at) > now - tonumber(ARGV[3 + i]) then
    redis.call('HSET', hash, entry, ARGV[3])
    redis.call('HINCRBY', hash, 'total', string.format('%d', tonumber(ARGV[3]) - tonumber(before)))
    settled = settled + 1
  end
end
return {settled}
