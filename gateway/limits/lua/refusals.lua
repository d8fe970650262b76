-- Count a refusal of one principal and block it once there were too many.
-- KEYS[1]  sorted set of recent refusals (sliding window)
-- KEYS[2]  the block: its value is the time it ends, in milliseconds
-- ARGV[1]  now, in milliseconds
-- ARGV[2]  window, in milliseconds
-- ARGV[3]  refusals within the window that trigger a block
-- ARGV[4]  the block's length, in milliseconds
-- ARGV[5]  a unique member for this refusal
-- Returns {blocked_now (1|0), refusals_in_window}.
local now = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
redis.call('ZADD', KEYS[1], now, ARGV[5])
redis.call('PEXPIRE', KEYS[1], window)
local count = redis.call('ZCARD', KEYS[1])
if count >= tonumber(ARGV[3]) and redis.call('EXISTS', KEYS[2]) == 0 then
  local cooldown = tonumber(ARGV[4])
  redis.call('SET', KEYS[2], now + cooldown, 'PX', cooldown)
  redis.call('DEL', KEYS[1])
  return {1, count}
end
return {0, count}
