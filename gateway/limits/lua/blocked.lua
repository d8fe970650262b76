-- Is any of these keys blocked? A block's value is the time it ends, in milliseconds.
-- KEYS     the block keys to look at (the user's, the organization's, the address's)
-- ARGV[1]  now, in milliseconds
-- Returns {index of the first active block (1-based) or 0, retry_after_ms}.
local now = tonumber(ARGV[1])
for i, key in ipairs(KEYS) do
  local ends = redis.call('GET', key)
  if ends and tonumber(ends) > now then
    return {i, tonumber(ends) - now}
  end
end
return {0, 0}
