-- One request's token from a token bucket: ``burst`` tokens at most, refilled at ``rate``
-- a second; the clock is the Redis server's, the same for every replica.
--
-- KEYS[1]  the bucket hash      rayfarm:limit:{kind}:{who} (tokens, at)
-- ARGV[1]  rate (tokens per second)
-- ARGV[2]  burst (tokens)
--
-- Returns {1, 0} when a token was taken, else {0, milliseconds until one is there}.
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local rate, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
local state = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = burst
if state[1] then
  tokens = math.min(burst, tonumber(state[1]) + (now - tonumber(state[2])) * rate)
end
local ttl = math.ceil((burst / rate + 1) * 1000)
if tokens < 1 then
  return {0, math.ceil((1 - tokens) / rate * 1000)}
end
redis.call('HSET', KEYS[1], 'tokens', tokens - 1, 'at', now)
redis.call('PEXPIRE', KEYS[1], ttl)
return {1, 0}
