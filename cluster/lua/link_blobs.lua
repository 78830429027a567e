-- A new job's blobs: each is indexed (if it was not: stored before the index, or sent
-- with a single-file submission) and kept while the job exists; the owner's uploads of
-- them leave the owner's quota, since a job of theirs now uses them.
--
-- KEYS[1]      the owner's uploads   rayfarm:uploads:{owner}
-- KEYS[2]      upload bytes hash     rayfarm:upload_bytes (user -> bytes)
-- KEYS[3]      blob stats hash       rayfarm:blobs (count, bytes)
-- KEYS[2i+2]   blob hash             rayfarm:blob:{sha}   (for each blob i)
-- KEYS[2i+3]   blob refs zset        rayfarm:blob:{sha}:refs
-- ARGV[1]      job id
-- ARGV[2]      owner
-- ARGV[3]      now (epoch seconds)
-- ARGV[2i+2]   blob i's sha256
-- ARGV[2i+3]   blob i's size in bytes
--
-- Returns the number of blobs linked.
local member = 'up:' .. ARGV[2]
local n = (#KEYS - 3) / 2
for i = 1, n do
  local blob, refs = KEYS[2 * i + 2], KEYS[2 * i + 3]
  local sha, size = ARGV[2 * i + 2], tonumber(ARGV[2 * i + 3])
  if redis.call('EXISTS', blob) == 0 then
    redis.call('HSET', blob, 'size', size, 'state', 'live', 'at', ARGV[3])
    redis.call('HINCRBY', KEYS[3], 'count', 1)
    redis.call('HINCRBY', KEYS[3], 'bytes', size)
  end
  redis.call('ZADD', refs, 'inf', ARGV[1])
  if redis.call('ZREM', KEYS[1], sha) == 1 then
    redis.call('ZREM', refs, member)
    if redis.call('HINCRBY', KEYS[2], ARGV[2], -size) <= 0 then
      redis.call('HDEL', KEYS[2], ARGV[2])
    end
  end
end
return n
