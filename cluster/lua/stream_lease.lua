-- Take or renew leases on a user's open event streams, in one step: leases past their
-- expiry are dropped first (a replica that died mid-stream never released its own), so
-- the count is of streams still open somewhere. Times are the Redis server's, in ms.
--
-- KEYS[1]  the user's leases  rayfarm:streams:{user}  (sorted set: lease id -> expiry)
-- ARGV[1]  most leases the user may hold; 0 renews the given leases only (never refused)
-- ARGV[2]  lease length, ms
-- ARGV[3..] lease ids: one to take, or every one of this user's to renew
--
-- Returns 1 when the lease was taken (or the leases renewed), 0 when the user already
-- holds ARGV[1] and none was taken.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local limit = tonumber(ARGV[1])
local until_ms = now + tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if limit > 0 then
  if redis.call('ZCARD', KEYS[1]) >= limit then
    return 0
  end
  redis.call('ZADD', KEYS[1], until_ms, ARGV[3])
else
  for i = 3, #ARGV do
    -- XX: a lease already released (or expired and dropped) is not brought back.
    redis.call('ZADD', KEYS[1], 'XX', until_ms, ARGV[i])
  end
end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
