-- Delete a job that is not running: its record and its id wherever it is (lib.lua,
-- drop_job: the idempotency key that names it goes too).
-- KEYS[1] -> <prefix>:{<queue>}:job:<id>, the job's hash
-- KEYS[2] -> <prefix>:{<queue>}:ready, the inbox (keys.inbox)
-- KEYS[3] -> <prefix>:{<queue>}:scheduled
-- KEYS[4] -> <prefix>:{<queue>}:completed
-- KEYS[5] -> <prefix>:{<queue>}:dead, the failed set (keys.failed)
-- KEYS[6] -> <prefix>:{<queue>}:cancelled
-- KEYS[7] -> <prefix>:{<queue>}:index, the sorted set index (keys.index)
-- KEYS[8] -> <prefix>:{<queue>}:pages, the paged index's directory (index.lua)
-- ARGV[1..3] -> now and job hash prefix (both unused), limit key prefix (the header, lib.lua)
-- ARGV[4] -> job id
-- ARGV[5] -> <prefix>:{<queue>}:archive, the archive hand-off (lib.lua,
--   keep_for_archive): a final job not yet archived is kept for it
-- ARGV[6] -> <prefix>:{<queue>}:idem:, the idempotency key prefix
-- Returns the job's state before ('active': nothing changed), or 'missing'.
local id = ARGV[4]
local state = redis.call('HGET', KEYS[1], 'state') or 'missing'
if state == 'missing' or state == 'active' then
  return state
end
if state == 'queued' then
  remove_queued(KEYS[2], KEYS[1], id)
end
keep_for_archive(ARGV[5], KEYS[1], id)
for i = 3, 6 do
  redis.call('ZREM', KEYS[i], id)
end
drop_job(KEYS[1], id, ARGV[6])
unindex(KEYS[7], KEYS[8], dropped)
return state
