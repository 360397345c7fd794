-- Take a bounded batch of jobs back from a daemon whose lease on this queue has lapsed
-- (it died, or stalled past dead_after). Its lease is checked in this same script, so a
-- daemon that beat in the meantime keeps its jobs. Landed ids go back as they were; an
-- active job's attempt counts (a job that keeps killing daemons must end), so it returns
-- to the queue (due again from now, as its run_at) or, out of attempts, becomes failed; a
-- job someone cancelled is cancelled.
-- Either way it gives back its slot of its type's global_concurrency. The callbacks the
-- daemon was sending go back to the outbox, and a job that ends here calls back too.
-- KEYS[1] -> <prefix>:{<queue>}:owners, the leases (keys.leases)
-- KEYS[2] -> <prefix>:{<queue>}:ready, the inbox (keys.inbox)
-- KEYS[3] -> <prefix>:{<queue>}:landing:<daemon>, the dead daemon's landing list
-- KEYS[4] -> <prefix>:{<queue>}:active:<daemon>, the dead daemon's active set
-- KEYS[5] -> <prefix>:{<queue>}:dead, the failed set (keys.failed)
-- KEYS[6] -> <prefix>:{<queue>}:cancelled
-- KEYS[7] -> <prefix>:{<queue>}:totals
-- KEYS[8] -> <prefix>:{<queue>}:callbacks, the outbox
-- KEYS[9] -> <prefix>:{<queue>}:sending:<daemon>, the dead daemon's callbacks in flight
-- ARGV[1..3] -> now, job hash prefix, limit key prefix (the header, lib.lua)
-- ARGV[4] -> the dead daemon's id
-- ARGV[5] -> leases renewed before this time, epoch ms, have lapsed
-- ARGV[6] -> most jobs to move
-- ARGV[7] -> <prefix>:{<queue>}:archive, the archive hand-off, or '' (lib.lua, finish_into)
-- Returns {jobs taken back, callbacks returned}, or {-1, 0} when the daemon's lease is
-- alive.
local daemon = ARGV[4]
local lease = redis.call('ZSCORE', KEYS[1], daemon)
if lease and tonumber(lease) >= tonumber(ARGV[5]) then
  return {-1, 0}
end
local most = tonumber(ARGV[6])
finish_into(KEYS[7], KEYS[8], ARGV[7])
local moved = move_to_front(KEYS[3], KEYS[2], most)

-- To the front of the outbox, the first taken to be taken first again.
local sending = redis.call('ZRANGE', KEYS[9], 0, most - 1)
for i = #sending, 1, -1 do
  redis.call('ZREM', KEYS[9], sending[i])
  redis.call('RPUSH', KEYS[8], sending[i])
end

local active = {}
if moved < most then
  active = redis.call('ZRANGE', KEYS[4], 0, most - moved - 1)
end
for _, id in ipairs(active) do
  local key = JOB .. id
  local f = redis.call('HMGET', key, 'attempts', 'max_attempts', 'started_at')
  if f[1] then
    local err = 'daemon ' .. daemon .. ' died during attempt ' .. f[1]
    append_history(key, history_entry(f[1], daemon, f[3], NOW, 'lost', err))
    release_slot(KEYS[2], key, id)
    redis.call('HDEL', key, 'started_at')
    if not cancel_if_requested(key, id, KEYS[6]) then
      if tonumber(f[1]) >= tonumber(f[2]) then
        finish_job(key, id, 'failed', KEYS[5], {'error', err .. ', its last'})
      else
        redis.call('HSET', key, 'state', 'queued', 'error', err, 'run_at', NOW)
        make_ready(KEYS[2], key, id, true)
      end
    end
    redis.call('HINCRBY', KEYS[7], 'recovered', 1)
  end
  redis.call('ZREM', KEYS[4], id)
end
moved = moved + #active
flush_finished()
if redis.call('LLEN', KEYS[3]) + redis.call('ZCARD', KEYS[4]) + redis.call('ZCARD', KEYS[9]) == 0 then
  redis.call('ZREM', KEYS[1], daemon)
end
return {moved, #sending}
