-- Record an organization's token spend and tell whether it spikes above its own baseline.
-- Spend is kept in per-bucket counters of a hash (field: bucket number).
-- KEYS[1]  hash of spend per bucket
-- KEYS[2]  alert cooldown marker (one alert per cooldown)
-- KEYS[3]  the organization's block: its value is the time it ends
-- ARGV[1]  now, in milliseconds
-- ARGV[2]  bucket length, in milliseconds
-- ARGV[3]  buckets in the recent window
-- ARGV[4]  buckets in the trailing baseline (before the recent window)
-- ARGV[5]  factor: recent spend above factor x baseline average is a spike
-- ARGV[6]  minimum recent spend for a spike (small numbers are never spikes)
-- ARGV[7]  tokens spent now
-- ARGV[8]  alert cooldown, in milliseconds
-- ARGV[9]  "block": a spike also blocks the organization for the cooldown
-- Returns {spike (1|0), recent_spend, baseline_per_window (x1000, integer)}.
local now = tonumber(ARGV[1])
local size = tonumber(ARGV[2])
local recent_n = tonumber(ARGV[3])
local base_n = tonumber(ARGV[4])
local bucket = math.floor(now / size)
redis.call('HINCRBY', KEYS[1], bucket, tonumber(ARGV[7]))
redis.call('PEXPIRE', KEYS[1], size * (recent_n + base_n + 1))
local recent = 0
local base = 0
for b = bucket - recent_n - base_n + 1, bucket do
  local v = tonumber(redis.call('HGET', KEYS[1], b) or '0')
  if b > bucket - recent_n then recent = recent + v else base = base + v end
end
-- Drop buckets that fell out of both windows.
for _, field in ipairs(redis.call('HKEYS', KEYS[1])) do
  if tonumber(field) <= bucket - recent_n - base_n then redis.call('HDEL', KEYS[1], field) end
end
local baseline = base * recent_n / base_n
local spike = 0
if recent >= tonumber(ARGV[6]) and recent > tonumber(ARGV[5]) * baseline
    and redis.call('EXISTS', KEYS[2]) == 0 then
  redis.call('SET', KEYS[2], now, 'PX', tonumber(ARGV[8]))
  if ARGV[9] == 'block' then
    redis.call('SET', KEYS[3], now + tonumber(ARGV[8]), 'PX', tonumber(ARGV[8]))
  end
  spike = 1
end
return {spike, recent, math.floor(baseline * 1000)}
