-- Put before admit.lua and lease.lua by the store (gateway/limits/store.py), so that both
-- read a rate's window one way: the hits of its sliding log in the window that ends at
-- `now`, and the milliseconds until the oldest of them leaves it (the window when none).
local function in_window(key, window, now)
  local hits = redis.call('ZCOUNT', key, now - window + 1, '+inf')
  local oldest = redis.call('ZRANGEBYSCORE', key, now - window + 1, '+inf', 'WITHSCORES', 'LIMIT', 0, 1)
  if oldest[2] then
    return hits, tonumber(oldest[2]) + window - now
  end
  return hits, window
end

