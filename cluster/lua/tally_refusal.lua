-- Count one refused anonymous request (a failed sign-in, a cross-site form) from an
-- address, and say whether it is time for an audit record: at most one per address and
-- kind a minute, and at most ``ARGV[3]`` a minute farm-wide, so a stranger cannot push
-- the real records out of the trimmed audit stream. A record carries the tally since the
-- previous one; the tally waits for the next record otherwise.
--
-- KEYS[1]  the tally hash          rayfarm:limit:tally:{kind}:{address}
--                                  (count, refused: answered 429, since, first: what)
-- KEYS[2]  the address's bucket    rayfarm:limit:record:{kind}:{address}
-- KEYS[3]  the farm-wide bucket    rayfarm:limit:record:*
-- KEYS[4]  metrics hash            rayfarm:metrics
-- ARGV[1]  what was refused (for the record)
-- ARGV[2]  1 when it was answered 429, else 0
-- ARGV[3]  farm-wide records a minute
-- ARGV[4]  the counter to add one to in the metrics hash
-- ARGV[5]  seconds a tally is kept waiting for its record
--
-- Returns {count, refused, since, first} when a record is due (the tally is reset), else {}.
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
redis.call('HINCRBY', KEYS[4], ARGV[4], 1)
redis.call('HINCRBY', KEYS[1], 'count', 1)
redis.call('HINCRBY', KEYS[1], 'refused', tonumber(ARGV[2]))
redis.call('HSETNX', KEYS[1], 'since', string.format('%.3f', now))
redis.call('HSETNX', KEYS[1], 'first', ARGV[1])
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[5]))

local function level(key, rate, burst)
  local state = redis.call('HMGET', key, 'tokens', 'at')
  if not state[1] then return burst end
  return math.min(burst, tonumber(state[1]) + (now - tonumber(state[2])) * rate)
end
local global_rate = tonumber(ARGV[3]) / 60
local own, farm = level(KEYS[2], 1 / 60, 1), level(KEYS[3], global_rate, tonumber(ARGV[3]))
if own < 1 or farm < 1 then
  return {}
end
redis.call('HSET', KEYS[2], 'tokens', own - 1, 'at', now)
redis.call('EXPIRE', KEYS[2], 120)
redis.call('HSET', KEYS[3], 'tokens', farm - 1, 'at', now)
redis.call('EXPIRE', KEYS[3], 120)
local tally = redis.call('HMGET', KEYS[1], 'count', 'refused', 'since', 'first')
redis.call('DEL', KEYS[1])
return tally
