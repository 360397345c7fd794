-- Put a failed (dead) job back on its queue with its attempts reset.
-- KEYS[1] -> the job's hash
-- KEYS[2] -> the queue's dead set
-- KEYS[3] -> the queue's inbox (its ready list)
-- ARGV[1] -> job id
-- Returns the job's state before: 'failed' (now queued), another state (nothing
-- changed), or 'missing'.
local state = redis.call('HGET', KEYS[1], 'state')
if not state then
  return 'missing'
end
if state == 'failed' then
  redis.call('ZREM', KEYS[2], ARGV[1])
  redis.call('HSET', KEYS[1], 'state', 'queued', 'attempts', 0)
  redis.call('HDEL', KEYS[1], 'started_at', 'finished_at', 'error', 'result')
  make_ready(KEYS[3], KEYS[1], ARGV[1], false)
end
return state
