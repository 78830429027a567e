-- Delete a job's state from Redis at once (the record, its tasks, frames, attempts and
-- execution log, its place in every index and the queue), when its state allows; let
-- go of its blobs, and mark those nothing else keeps as dying (their objects are
-- deleted next, then forget_blobs.lua drops them from the index).
--
-- KEYS[1]   job hash            rayfarm:job:{id}
-- KEYS[2]   tasks hash          rayfarm:job:{id}:tasks
-- KEYS[3]   frames hash         rayfarm:job:{id}:frames
-- KEYS[4]   frame meta hash     rayfarm:job:{id}:frame_meta
-- KEYS[5]   attempts hash       rayfarm:job:{id}:attempts
-- KEYS[6]   tries hash          rayfarm:job:{id}:tries
-- KEYS[7]   events stream       rayfarm:job:{id}:events
-- KEYS[8]   all jobs index      rayfarm:jobs
-- KEYS[9]   queue               rayfarm:queue
-- KEYS[10]  owner index         rayfarm:jobs:owner:{owner}
-- KEYS[11]  project index       rayfarm:jobs:project:{project} (the owner index again
--                               for a job without a project)
-- KEYS[12]  changes stream      rayfarm:changes
-- KEYS[13]  deleted jobs zset   rayfarm:deleted
-- KEYS[14]  dying blobs zset    rayfarm:blobs:dying
-- KEYS[15]  metrics hash        rayfarm:metrics
-- KEYS[16 .. 15+S]              the per-state indexes rayfarm:jobs:{STATE}
-- KEYS[16+S+2i-2]               blob i's hash   rayfarm:blob:{sha}
-- KEYS[16+S+2i-1]               blob i's refs   rayfarm:blob:{sha}:refs
-- ARGV[1]   job id
-- ARGV[2]   the states it may be deleted in, comma-separated
-- ARGV[3]   the owner, as the caller read it (the job is refused if that changed)
-- ARGV[4]   the project ("" for none)
-- ARGV[5]   S, the number of per-state indexes
-- ARGV[6]   now (epoch seconds)
-- ARGV[7]   changes stream max length
-- ARGV[8+i-1] blob i's sha256
--
-- Returns {1, state, {dying sha256s}} when deleted, {0, ""} when there is no such job,
-- {-1, state} when its state does not allow it.
local state = redis.call('HGET', KEYS[1], 'state')
if not state or redis.call('HGET', KEYS[1], 'owner') ~= ARGV[3] then
  return {0, ''}
end
local allowed = false
for s in string.gmatch(ARGV[2], '[^,]+') do
  if s == state then allowed = true end
end
if not allowed then
  return {-1, state}
end
for i = 1, 7 do
  redis.call('UNLINK', KEYS[i])
end
for i = 8, 11 do
  redis.call('ZREM', KEYS[i], ARGV[1])
end
local states = tonumber(ARGV[5])
for i = 16, 15 + states do
  redis.call('ZREM', KEYS[i], ARGV[1])
end
redis.call('ZADD', KEYS[13], ARGV[6], ARGV[1])
redis.call('HINCRBY', KEYS[15], 'jobs_deleted_total', 1)
redis.call('XADD', KEYS[12], 'MAXLEN', '~', ARGV[7], '*',
  'job', ARGV[1], 'owner', ARGV[3], 'project', ARGV[4], 'state', 'DELETED')
local now = tonumber(ARGV[6])
local dying = {}
local first = 16 + states
for i = 0, (#KEYS - first + 1) / 2 - 1 do
  local blob, refs, sha = KEYS[first + 2 * i], KEYS[first + 2 * i + 1], ARGV[8 + i]
  redis.call('ZREM', refs, ARGV[1])
  -- A submission that never let go of its hold (its replica died) holds no longer.
  for _, member in ipairs(redis.call('ZRANGEBYSCORE', refs, '-inf', now)) do
    if string.sub(member, 1, 5) == 'hold:' then redis.call('ZREM', refs, member) end
  end
  if redis.call('ZCARD', refs) == 0 and redis.call('EXISTS', blob) == 1 then
    redis.call('HSET', blob, 'state', 'dying')
    redis.call('ZADD', KEYS[14], now, sha)
    dying[#dying + 1] = sha
  end
end
return {1, state, dying}
