-- Make a bounded batch of due jobs of one queue ready (lib.lua), out of the scheduled set.
-- Atomic, so daemons promoting at the same time never move a job twice.
-- KEYS[1] -> <prefix>:{<queue>}:scheduled
-- KEYS[2] -> <prefix>:{<queue>}:ready, the inbox (keys.inbox)
-- ARGV[1..3] -> now, job hash prefix, limit key prefix (unused) (the header, lib.lua)
-- ARGV[4] -> most jobs to move
-- Returns {moved, due}: how many moved, and the time the next job is due in epoch ms
-- (-1 when none waits).
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', NOW, 'LIMIT', 0, tonumber(ARGV[4]))
for _, id in ipairs(due) do
  redis.call('ZREM', KEYS[1], id)
  redis.call('HSET', JOB .. id, 'state', 'queued')
  redis.call('HDEL', JOB .. id, 'waiting_for')
  -- At the back, in due order, like any new job.
  make_ready(KEYS[2], JOB .. id, id, false)
end
local next_due = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
if next_due[2] then
  return {#due, tonumber(next_due[2])}
end
return {#due, -1}
