-- Minimum interval between two admitted requests under one key.
-- KEYS[1]  the time of the last admitted request
-- ARGV[1]  now, in milliseconds
-- ARGV[2]  the minimum interval, in milliseconds
-- ARGV[3]  "dry": only tell whether the request would be admitted; record nothing
-- Returns {admitted (1|0), retry_after_ms}.
local now = tonumber(ARGV[1])
local interval = tonumber(ARGV[2])
local last = redis.call('GET', KEYS[1])
if last and now - tonumber(last) < interval then
  return {0, interval - (now - tonumber(last))}
end
if ARGV[3] ~= 'dry' then
  redis.call('SET', KEYS[1], now, 'PX', interval)
end
return {1, 0}
