-- Admissions made ahead for one busy caller (see gateway/leases.py): the blocks are
-- checked, and up to A[5] hits are taken at once from every rate limit of the request, so
-- that the process can admit that many of the caller's requests without asking again.
-- Only for requests whose limits are blocks and rates alone (the minimum interval, the
-- concurrency cap and token rates are judged request by request, by admit.lua).
--
-- The hits are recorded at A[6], the time the lease's last admission may be drawn, never
-- earlier: each counts in every window its request can fall in, so a rate is never
-- exceeded, whichever process admits. Hits not drawn are taken back (ZREM) by the
-- process; a process that dies leaves them to age out, which only refuses early.
--
-- KEYS: the user's block and the organization's block (A[3] of them: 0 or 2), then one
-- sorted set of admitted hits per rate (A[4]).
-- ARGV[1] holds every argument, joined by single spaces:
-- A[1]  now
-- A[2]  the prefix of the hits' members (each is the prefix, ':' and its number)
-- A[3], A[4]  the counts of keys above
-- A[5]  the hits wanted
-- A[6]  when the last admission may be drawn (>= now): the hits' time
-- then per rate: window, hits per window.
-- Returns {hits taken (0: none, the caller asks admit.lua request by request), then per
-- rate: hits in the window before this lease, reset (as admit.lua's)}. At most half of
-- what a rate has left is taken, so a lease never strands the last of a window.
local A = {}
for word in string.gmatch(ARGV[1], '%S+') do
  A[#A + 1] = word
end
local now, prefix = tonumber(A[1]), A[2]
local n_blocks, n_rates = tonumber(A[3]), tonumber(A[4])
local take, at = tonumber(A[5]), tonumber(A[6])

-- A call run again under the same prefix (a client that lost the first answer retries)
-- replaces the first run's hits instead of adding to them: none is left behind unknown.
local first = prefix .. ':1'
for i = 1, n_rates do
  local key = KEYS[n_blocks + i]
  if redis.call('ZSCORE', key, first) then
    local mine = {}
    for j = 1, take do  -- as many as the first run may have taken
      mine[#mine + 1] = prefix .. ':' .. j
    end
    redis.call('ZREM', key, unpack(mine))
  end
end

for i = 1, n_blocks do
  local ends = redis.call('GET', KEYS[i])
  if ends and tonumber(ends) > now then
    return {0}
  end
end

local result = {0}
local rates = {}
for i = 1, n_rates do
  local key = KEYS[n_blocks + i]
  local window, count = tonumber(A[5 + 2 * i]), tonumber(A[6 + 2 * i])
  local hits, reset = in_window(key, window, now)  -- window.lua
  take = math.min(take, math.floor((count - hits) / 2))
  rates[i] = {key, window}
  result[#result + 1] = hits
  result[#result + 1] = reset
end
if take < 1 then
  return result
end

result[1] = take
for _, rate in ipairs(rates) do
  redis.call('ZREMRANGEBYSCORE', rate[1], '-inf', now - rate[2])
  local members = {}
  for j = 1, take do
    members[#members + 1] = at
    members[#members + 1] = prefix .. ':' .. j
  end
  redis.call('ZADD', rate[1], unpack(members))
  -- Kept until the last hit leaves the window (neither script ever shortens this); in
  -- milliseconds from now, so that only the gateways' clocks matter, not Redis's.
  local ttl = at + rate[2] - now
  if redis.call('PTTL', rate[1]) < ttl then
    redis.call('PEXPIRE', rate[1], ttl)
  end
end
return result
