-- Put a failed job back on its queue (lib.lua, retry_failed): its attempts reset, due from
-- now.
-- KEYS[1] -> <prefix>:{<queue>}:job:<id>, the job's hash
-- KEYS[2] -> <prefix>:{<queue>}:dead, the failed set (keys.failed)
-- KEYS[3] -> <prefix>:{<queue>}:ready, the inbox (keys.inbox)
-- ARGV[1..3] -> now, then job hash prefix and limit key prefix (both unused) (the header,
--   lib.lua)
-- ARGV[4] -> job id
-- ARGV[5] -> <prefix>:{<queue>}:archive, the archive hand-off (lib.lua,
--   keep_for_archive)
-- Returns the job's state before: 'failed' (now queued), another state (nothing
-- changed), or 'missing'.
local id = ARGV[4]
local state = redis.call('HGET', KEYS[1], 'state') or 'missing'
if state == 'failed' then
  redis.call('ZREM', KEYS[2], id)
  retry_failed(KEYS[3], KEYS[1], id, ARGV[5])
end
return state
