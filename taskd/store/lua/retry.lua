-- Put a failed job back on its queue with its attempts reset, due from now (run_at), so
-- that its wait counts from the retry, not from its creation. The attempts it had are
-- added to its earlier_attempts: the count of every attempt it has had goes on, and names
-- each attempt to the endpoints it is sent to (taskd.signing).
-- KEYS[1] -> <prefix>:{<queue>}:job:<id>, the job's hash
-- KEYS[2] -> <prefix>:{<queue>}:dead, the failed set (keys.failed)
-- KEYS[3] -> <prefix>:{<queue>}:ready, the inbox (keys.inbox)
-- ARGV[1..3] -> now, then job hash prefix and limit key prefix (both unused) (the header,
--   lib.lua)
-- ARGV[4] -> job id
-- ARGV[5] -> <prefix>:{<queue>}:archive, the archive hand-off, or '' (lib.lua,
--   keep_for_archive)
-- Returns the job's state before: 'failed' (now queued), another state (nothing
-- changed), or 'missing'.
local id = ARGV[4]
local state = redis.call('HGET', KEYS[1], 'state') or 'missing'
if state == 'failed' then
  keep_for_archive(ARGV[5], KEYS[1], id)
  settle_history(KEYS[1])
  redis.call('ZREM', KEYS[2], id)
  local attempts = tonumber(redis.call('HGET', KEYS[1], 'attempts') or 0)
  if attempts > 0 then
    redis.call('HINCRBY', KEYS[1], 'earlier_attempts', attempts)
  end
  redis.call('HSET', KEYS[1], 'state', 'queued', 'attempts', 0, 'run_at', NOW)
  redis.call('HDEL', KEYS[1], 'started_at', 'finished_at', 'error', 'result')
  make_ready(KEYS[3], KEYS[1], id, false)
end
return state
