-- Drop dying blobs from the index once their objects are deleted (delete_job.lua and
-- collect_blob.lua mark them); a blob something took up again meanwhile lives on.
--
-- KEYS[1]     dying blobs zset    rayfarm:blobs:dying
-- KEYS[2]     blob stats hash     rayfarm:blobs (count, bytes)
-- KEYS[3]     due zset            rayfarm:blobs:due
-- KEYS[2i+2]  blob i's hash       rayfarm:blob:{sha}
-- KEYS[2i+3]  blob i's refs       rayfarm:blob:{sha}:refs
-- ARGV[i]     blob i's sha256
--
-- Returns the bytes of the blobs dropped.
local freed = 0
for i = 1, #ARGV do
  local blob, refs, sha = KEYS[2 * i + 2], KEYS[2 * i + 3], ARGV[i]
  if redis.call('HGET', blob, 'state') == 'dying' then
    if redis.call('ZCARD', refs) == 0 then
      local size = tonumber(redis.call('HGET', blob, 'size') or '0')
      redis.call('DEL', blob)
      redis.call('HINCRBY', KEYS[2], 'count', -1)
      redis.call('HINCRBY', KEYS[2], 'bytes', -size)
      redis.call('ZREM', KEYS[3], sha)
      freed = freed + size
    else
      redis.call('HSET', blob, 'state', 'live')
    end
  end
  redis.call('ZREM', KEYS[1], sha)
end
return freed
