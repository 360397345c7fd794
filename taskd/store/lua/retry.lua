-- Put a failed (dead) job back on its queue with its attempts reset, due from now (run_at),
-- so that its wait counts from the retry, not from its creation.
-- KEYS[1] -> the job's hash
-- KEYS[2] -> the queue's dead set
-- KEYS[3] -> the queue's inbox (its ready list)
-- ARGV[1] -> job id
-- ARGV[2] -> now, epoch ms
-- Returns the job's state before: 'failed' (now queued), another state (nothing
-- changed), or 'missing'.
local state = redis.call('HGET', KEYS[1], 'state')
if not state then
  return 'missing'
end
if state == 'failed' then
  redis.call('ZREM', KEYS[2], ARGV[1])
  redis.call('HSET', KEYS[1], 'state', 'queued', 'attempts', 0, 'run_at', ARGV[2])
  redis.call('HDEL', KEYS[1], 'started_at', 'finished_at', 'error', 'result')
  make_ready(KEYS[3], KEYS[1], ARGV[1], false)
end
return state
