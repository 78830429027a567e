-- The housekeeping sweep's look at one due blob: drop the references that lapsed (uploads
-- no job of their uploader used in time, leaving that user's quota; holds of submissions
-- that never let go), then mark the blob dying if nothing keeps it, or schedule the next
-- look at its next lapse.
--
-- KEYS[1]     blob hash           rayfarm:blob:{sha}
-- KEYS[2]     blob refs zset      rayfarm:blob:{sha}:refs
-- KEYS[3]     upload bytes hash   rayfarm:upload_bytes (user -> bytes)
-- KEYS[4]     due zset            rayfarm:blobs:due
-- KEYS[5]     dying blobs zset    rayfarm:blobs:dying
-- KEYS[5+i]   user i's uploads    rayfarm:uploads:{user}
-- ARGV[1]     sha256
-- ARGV[2]     now (epoch seconds)
-- ARGV[2+i]   user i, one whose upload of this blob the caller saw lapse
--
-- Returns 1 when the blob is now dying (delete its object, then forget_blobs.lua), else 0.
local sha, now = ARGV[1], tonumber(ARGV[2])
local size = tonumber(redis.call('HGET', KEYS[1], 'size') or '0')
for i = 3, #ARGV do
  local user, uploads = ARGV[i], KEYS[3 + i]
  local score = redis.call('ZSCORE', KEYS[2], 'up:' .. user)
  if score and tonumber(score) <= now then
    redis.call('ZREM', KEYS[2], 'up:' .. user)
  end
  local pending = redis.call('ZSCORE', uploads, sha)
  if pending and tonumber(pending) <= now then
    redis.call('ZREM', uploads, sha)
    if redis.call('HINCRBY', KEYS[3], user, -size) <= 0 then
      redis.call('HDEL', KEYS[3], user)
    end
  end
end
for _, member in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now)) do
  if string.sub(member, 1, 5) == 'hold:' then redis.call('ZREM', KEYS[2], member) end
end
if redis.call('ZCARD', KEYS[2]) == 0 then
  redis.call('ZREM', KEYS[4], sha)
  if redis.call('EXISTS', KEYS[1]) == 0 or redis.call('HGET', KEYS[1], 'state') == 'dying' then
    return 0
  end
  redis.call('HSET', KEYS[1], 'state', 'dying')
  redis.call('ZADD', KEYS[5], now, sha)
  return 1
end
local first = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
if first[2] == 'inf' then
  redis.call('ZREM', KEYS[4], sha)
else
  redis.call('ZADD', KEYS[4], first[2], sha)
end
return 0
