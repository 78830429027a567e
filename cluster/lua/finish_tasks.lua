-- Record what one actor call finished (one task, or a batch of short ones): each task's
-- done mark and task_done event, each stored frame's key, metadata and frame event, in
-- the order given (per task: task_done, then frame), and the farm's counters once for
-- all of them. Nothing is recorded unless the job is still PROCESSING: a cancel that
-- landed while the frames were being written wins.
--
-- KEYS[1]  job hash            rayfarm:job:{id}
-- KEYS[2]  tasks hash          rayfarm:job:{id}:tasks
-- KEYS[3]  events stream       rayfarm:job:{id}:events
-- KEYS[4]  metrics hash        rayfarm:metrics
-- KEYS[5]  frames hash         rayfarm:job:{id}:frames
-- KEYS[6]  frame meta hash     rayfarm:job:{id}:frame_meta
-- ARGV[1]  event stream max length
-- ARGV[2]  the items, JSON: [{"task": key or absent, "done": [task_done event, flat],
--          "frame": number or absent, "object": key, "meta": JSON text,
--          "event": [frame event, flat]}, ...]
-- ARGV[3]  integer counters to add, JSON: {name: amount}
-- ARGV[4]  render seconds to add to render_s_sum ("0" for none)
--
-- Returns the number of frames stored for the job, or -1 (nothing recorded) when the
-- job is not PROCESSING.
if redis.call('HGET', KEYS[1], 'state') ~= 'PROCESSING' then
  return -1
end
local items = cjson.decode(ARGV[2])
for _, item in ipairs(items) do
  if item['task'] then
    redis.call('HSET', KEYS[2], item['task'], 'done')
    redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[1], '*', unpack(item['done']))
  end
  if item['frame'] then
    redis.call('HSET', KEYS[5], item['frame'], item['object'])
    redis.call('HSET', KEYS[6], item['frame'], item['meta'])
    redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[1], '*', unpack(item['event']))
  end
end
for name, amount in pairs(cjson.decode(ARGV[3])) do
  redis.call('HINCRBY', KEYS[4], name, amount)
end
if ARGV[4] ~= '0' then
  redis.call('HINCRBYFLOAT', KEYS[4], 'render_s_sum', ARGV[4])
end
return redis.call('HLEN', KEYS[5])
