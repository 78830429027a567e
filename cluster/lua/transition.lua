-- Apply one job state change atomically (compare-and-set on the state field).
--
-- KEYS[1]  job hash            rayfarm:job:{id}
-- KEYS[2]  queue sorted set    rayfarm:queue
-- KEYS[3]  events stream       rayfarm:job:{id}:events
-- KEYS[4]  all jobs index      rayfarm:jobs (creation time scores)
-- KEYS[5]  changes stream      rayfarm:changes (job, owner, project, state)
-- KEYS[6..] per-state indexes  rayfarm:jobs:{STATE}, in the order of ARGV[8]
-- ARGV[1]  job id
-- ARGV[2]  target state
-- ARGV[3]  allowed source states, comma-separated (from the SDK's TRANSITIONS)
-- ARGV[4]  queue action: "add" | "rem" | ""
-- ARGV[5]  queue score (used with "add")
-- ARGV[6]  event stream max length
-- ARGV[7]  event time (ISO 8601)
-- ARGV[8]  every state, comma-separated, in the order of KEYS[6..]
-- ARGV[9]  the error message for the event ("" for none)
-- ARGV[10] changes stream max length
-- ARGV[11..] field, value pairs to set on the job hash; an empty value deletes the field
--
-- Returns {1, previous state} on success, {0, ""} if the job does not exist,
-- {-1, current state} if the transition is not allowed from the current state.
local current = redis.call('HGET', KEYS[1], 'state')
if not current then
  return {0, ''}
end
local allowed = false
for s in string.gmatch(ARGV[3], '[^,]+') do
  if s == current then allowed = true end
end
if not allowed then
  return {-1, current}
end
redis.call('HSET', KEYS[1], 'state', ARGV[2])
for i = 11, #ARGV, 2 do
  if ARGV[i + 1] == '' then
    redis.call('HDEL', KEYS[1], ARGV[i])
  else
    redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
  end
end
if ARGV[4] == 'add' then
  redis.call('ZADD', KEYS[2], ARGV[5], ARGV[1])
elseif ARGV[4] == 'rem' then
  redis.call('ZREM', KEYS[2], ARGV[1])
end
local created = redis.call('ZSCORE', KEYS[4], ARGV[1]) or 0
local index = 6
for s in string.gmatch(ARGV[8], '[^,]+') do
  if s == current then redis.call('ZREM', KEYS[index], ARGV[1]) end
  if s == ARGV[2] then redis.call('ZADD', KEYS[index], created, ARGV[1]) end
  index = index + 1
end
local event_id
if ARGV[9] ~= '' then
  event_id = redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[6], '*',
    'kind', 'state', 'from', current, 'to', ARGV[2], 'at', ARGV[7], 'error', ARGV[9])
else
  event_id = redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[6], '*',
    'kind', 'state', 'from', current, 'to', ARGV[2], 'at', ARGV[7])
end
-- Followers of the event stream end at the event that made the job's current state.
redis.call('HSET', KEYS[1], 'state_event', event_id)
-- Lists of jobs follow the farm-wide changes (with who may see the job: its owner and
-- project, fixed at submission).
local owner = redis.call('HGET', KEYS[1], 'owner') or ''
local project = ''
local ok, spec = pcall(cjson.decode, redis.call('HGET', KEYS[1], 'spec') or '')
if ok and type(spec) == 'table' and type(spec['project']) == 'string' then
  project = spec['project']
end
redis.call('XADD', KEYS[5], 'MAXLEN', '~', ARGV[10], '*',
  'job', ARGV[1], 'owner', owner, 'project', project, 'state', ARGV[2])
return {1, current}
