-- Start tasks handed to one render actor (one task, or a batch of short ones): number
-- each attempt and log its task_started event, in one round trip for the batch.
--
-- KEYS[1]  tries hash          rayfarm:job:{id}:tries (task key -> times started, ever)
-- KEYS[2]  events stream       rayfarm:job:{id}:events
-- ARGV[1]  event stream max length
-- ARGV[2]  event time (ISO 8601)
-- ARGV[3]  the tasks, JSON: [[task key, frame, tile], ...] in the order they run (a
--          slice of a sliced frame: [task key, frame, tile, slice])
-- ARGV[4]  where they run, JSON: flat [field, value, ...] (actor, node, host, device)
--
-- Returns each task's attempt number, in the order of ARGV[3].
local tasks = cjson.decode(ARGV[3])
local where = cjson.decode(ARGV[4])
local attempts = {}
for i, t in ipairs(tasks) do
  local attempt = redis.call('HINCRBY', KEYS[1], t[1], 1)
  local body = {'kind', 'task_started', 'at', ARGV[2], 'task', t[1], 'attempt', attempt,
                'frame', t[2], 'tile', t[3]}
  if t[4] ~= nil then
    body[#body + 1] = 'slice'
    body[#body + 1] = t[4]
  end
  for _, v in ipairs(where) do body[#body + 1] = v end
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[1], '*', unpack(body))
  attempts[i] = attempt
end
return attempts
