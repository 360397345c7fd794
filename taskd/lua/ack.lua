-- Record the outcomes of finished jobs of one queue and take them out of the daemon's
-- active set. A job no longer in that set is not this daemon's any more (it was returned
-- to its queue meanwhile): it is left alone, so a stale daemon never overwrites the record
-- of a newer attempt.
-- KEYS[1] -> this daemon's active set for the queue
-- KEYS[2] -> the queue's completed set
-- KEYS[3] -> the queue's failed set
-- ARGV[1] -> now, epoch ms
-- ARGV[2] -> the queue's job hash prefix
-- ARGV[3..] -> 3 entries per job: id, 'completed' or 'failed', result JSON or error text
-- Returns the number of jobs recorded.
local now = ARGV[1]
local recorded = 0
for i = 3, #ARGV, 3 do
  local id, outcome, value = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  if redis.call('ZREM', KEYS[1], id) == 1 then
    local key = ARGV[2] .. id
    if outcome == 'completed' then
      redis.call('HSET', key, 'state', 'completed', 'finished_at', now, 'result', value)
      redis.call('HDEL', key, 'error')
      redis.call('ZADD', KEYS[2], now, id)
    else
      redis.call('HSET', key, 'state', 'failed', 'finished_at', now, 'error', value)
      redis.call('HDEL', key, 'result')
      redis.call('ZADD', KEYS[3], now, id)
    end
    recorded = recorded + 1
  end
end
return recorded
