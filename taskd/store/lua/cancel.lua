-- Cancel a job. A queued or scheduled one is cancelled at once and never runs. An active
-- one is marked, and its id published, so that the daemon running it cancels it and
-- records it cancelled (a reaper honours the mark too, should that daemon die).
-- KEYS[1] -> <prefix>:{<queue>}:job:<id>, the job's hash
-- KEYS[2] -> <prefix>:{<queue>}:ready, the inbox (keys.inbox)
-- KEYS[3] -> <prefix>:{<queue>}:scheduled
-- KEYS[4] -> <prefix>:{<queue>}:cancelled
-- KEYS[5] -> <prefix>:{<queue>}:totals
-- KEYS[6] -> <prefix>:{<queue>}:callbacks, the outbox
-- ARGV[1..3] -> now, job hash prefix (unused), limit key prefix (the header, lib.lua)
-- ARGV[4] -> job id
-- ARGV[5] -> <prefix>:{<prefix>:global}:cancel, the cancel channel
-- ARGV[6] -> <prefix>:{<queue>}:archive, the archive hand-off, or '' (lib.lua, finish_into)
-- Returns the job's state before: 'queued', 'scheduled' or 'active' (now cancelled or
-- cancelling), a final state (nothing changed), or 'missing'.
local id = ARGV[4]
finish_into(KEYS[5], KEYS[6], ARGV[6])
local state = redis.call('HGET', KEYS[1], 'state') or 'missing'
if state == 'queued' or state == 'scheduled' then
  if state == 'queued' then
    remove_queued(KEYS[2], KEYS[1], id)
  else
    redis.call('ZREM', KEYS[3], id)
  end
  redis.call('HDEL', KEYS[1], 'run_at', 'waiting_for')
  finish_job(KEYS[1], id, 'cancelled', KEYS[4], {'error', 'cancelled'})
  flush_finished()
elseif state == 'active' then
  redis.call('HSET', KEYS[1], 'cancel_requested', NOW)
  redis.call('PUBLISH', ARGV[5], id)
end
return state
