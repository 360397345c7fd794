-- Cancel a job. A queued or scheduled one is cancelled at once and never runs. An active
-- one is marked, and its id published, so that the daemon running it cancels it and
-- records it cancelled (a reaper honours the mark too, should that daemon die).
-- KEYS[1] -> the job's hash
-- KEYS[2] -> the queue's inbox (its ready list)
-- KEYS[3] -> the queue's scheduled set
-- KEYS[4] -> the queue's cancelled set
-- KEYS[5] -> the queue's totals hash
-- KEYS[6] -> the queue's callback outbox
-- ARGV[1] -> job id
-- ARGV[2] -> now, epoch ms
-- ARGV[3] -> the cancel channel
-- ARGV[4] -> the queue's limit key prefix
-- Returns the job's state before: 'queued', 'scheduled' or 'active' (now cancelled or
-- cancelling), a final state (nothing changed), or 'missing'.
local state = redis.call('HGET', KEYS[1], 'state')
if not state then
  return 'missing'
end
if state == 'queued' or state == 'scheduled' then
  if state == 'queued' then
    remove_queued(KEYS[2], ARGV[4], KEYS[1], ARGV[1])
  else
    redis.call('ZREM', KEYS[3], ARGV[1])
  end
  redis.call('HSET', KEYS[1], 'state', 'cancelled', 'finished_at', ARGV[2], 'error', 'cancelled')
  redis.call('HDEL', KEYS[1], 'run_at', 'waiting_for')
  redis.call('ZADD', KEYS[4], ARGV[2], ARGV[1])
  redis.call('HINCRBY', KEYS[5], 'cancelled', 1)
  call_back(KEYS[6], KEYS[1], ARGV[1])
elseif state == 'active' then
  redis.call('HSET', KEYS[1], 'cancel_requested', ARGV[2])
  redis.call('PUBLISH', ARGV[3], ARGV[1])
end
return state
