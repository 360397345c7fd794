-- Make a bounded batch of due jobs of one queue ready (lib.lua), out of the scheduled set.
-- Atomic, so daemons promoting at the same time never move a job twice.
-- KEYS[1] -> the queue's scheduled set
-- KEYS[2] -> the queue's inbox (its ready list)
-- ARGV[1] -> now, epoch ms
-- ARGV[2] -> most jobs to move
-- ARGV[3] -> the queue's job hash prefix
-- Returns {moved, due}: how many moved, and the time the next job is due in epoch ms
-- (-1 when none waits).
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
for _, id in ipairs(due) do
  redis.call('ZREM', KEYS[1], id)
  redis.call('HSET', ARGV[3] .. id, 'state', 'queued')
  redis.call('HDEL', ARGV[3] .. id, 'waiting_for')
  -- At the back, in due order, like any new job.
  make_ready(KEYS[2], ARGV[3] .. id, id, false)
end
local next_due = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
if next_due[2] then
  return {#due, tonumber(next_due[2])}
end
return {#due, -1}
