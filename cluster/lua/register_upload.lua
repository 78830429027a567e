-- Index one uploaded blob as its uploader's (PUT /blobs), before its object is written:
-- the blob is kept for the upload's grace, and its bytes count against the uploader's
-- quota until a job of theirs uses it. An upload of a blob the user already has pending
-- renews its grace and counts once.
--
-- KEYS[1]  blob hash            rayfarm:blob:{sha}
-- KEYS[2]  blob refs zset       rayfarm:blob:{sha}:refs
-- KEYS[3]  the user's uploads   rayfarm:uploads:{user}
-- KEYS[4]  upload bytes hash    rayfarm:upload_bytes (user -> bytes)
-- KEYS[5]  blob stats hash      rayfarm:blobs (count, bytes)
-- KEYS[6]  due zset             rayfarm:blobs:due
-- ARGV[1]  sha256
-- ARGV[2]  size in bytes
-- ARGV[3]  user
-- ARGV[4]  when the upload lapses (epoch seconds)
-- ARGV[5]  the user's quota in bytes ("0": none)
-- ARGV[6]  now (epoch seconds)
--
-- Returns {1, bytes pending after} when indexed, {0, bytes pending} when over the quota,
-- {-1, 0} when the blob is being deleted now (nothing changed in either case).
if redis.call('HGET', KEYS[1], 'state') == 'dying' then
  return {-1, 0}
end
local size = tonumber(ARGV[2])
local pending = tonumber(redis.call('HGET', KEYS[4], ARGV[3]) or '0')
local member = 'up:' .. ARGV[3]
if redis.call('ZSCORE', KEYS[3], ARGV[1]) then
  redis.call('ZADD', KEYS[3], ARGV[4], ARGV[1])
  redis.call('ZADD', KEYS[2], ARGV[4], member)
  return {1, pending}
end
local quota = tonumber(ARGV[5])
if quota > 0 and pending + size > quota then
  return {0, pending}
end
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('HSET', KEYS[1], 'size', size, 'state', 'live', 'at', ARGV[6])
  redis.call('HINCRBY', KEYS[5], 'count', 1)
  redis.call('HINCRBY', KEYS[5], 'bytes', size)
end
redis.call('ZADD', KEYS[2], ARGV[4], member)
redis.call('ZADD', KEYS[3], ARGV[4], ARGV[1])
redis.call('HINCRBY', KEYS[4], ARGV[3], size)
redis.call('ZADD', KEYS[6], 'LT', ARGV[4], ARGV[1])
return {1, pending + size}
