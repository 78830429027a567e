-- Say why a waiting job waits (or that it no longer does), only while it waits.
--
-- KEYS[1]  job hash            rayfarm:job:{id}
-- KEYS[2]  events stream       rayfarm:job:{id}:events
-- ARGV[1]  the reason ("" clears it: no event)
-- ARGV[2]  event time (ISO 8601)
-- ARGV[3]  event stream max length
--
-- Returns 1 when done, 0 when the job is not PENDING or PROCESSING (nothing changed: a
-- job that ended meanwhile keeps no stale reason).
local state = redis.call('HGET', KEYS[1], 'state')
if state ~= 'PENDING' and state ~= 'PROCESSING' then
  return 0
end
if ARGV[1] == '' then
  redis.call('HDEL', KEYS[1], 'detail')
else
  redis.call('HSET', KEYS[1], 'detail', ARGV[1])
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*',
    'kind', 'waiting', 'reason', ARGV[1], 'at', ARGV[2])
end
return 1
