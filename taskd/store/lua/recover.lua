-- Take a bounded batch of jobs back from a daemon whose lease on this queue has lapsed
-- (it died, or stalled past dead_after). Its lease is checked in this same script, so a
-- daemon that beat in the meantime keeps its jobs. Landed ids go back as they were; an
-- active job's attempt counts (a job that keeps killing daemons must end), so it returns
-- to the queue (due again from now, as its run_at) or, out of attempts, becomes failed; a
-- job someone cancelled is cancelled.
-- Either way it gives back its slot of its type's global_concurrency. The callbacks the
-- daemon was sending go back to the outbox, and a job that ends here calls back too.
-- KEYS[1] -> the queue's owners (daemon leases)
-- KEYS[2] -> the queue's inbox (its ready list)
-- KEYS[3] -> the dead daemon's landing list
-- KEYS[4] -> the dead daemon's active set
-- KEYS[5] -> the queue's dead set
-- KEYS[6] -> the queue's cancelled set
-- KEYS[7] -> the queue's totals hash
-- KEYS[8] -> the queue's callback outbox
-- KEYS[9] -> the dead daemon's set of callbacks in flight
-- ARGV[1] -> the dead daemon's id
-- ARGV[2] -> now, epoch ms
-- ARGV[3] -> leases renewed before this time, epoch ms, have lapsed
-- ARGV[4] -> the queue's job hash prefix
-- ARGV[5] -> most jobs to move
-- ARGV[6] -> the queue's limit key prefix
-- Returns {jobs taken back, callbacks returned}, or {-1, 0} when the daemon's lease is
-- alive.
local lease = redis.call('ZSCORE', KEYS[1], ARGV[1])
if lease and tonumber(lease) >= tonumber(ARGV[3]) then
  return {-1, 0}
end
local now, limit = ARGV[2], tonumber(ARGV[5])
local moved = move_to_front(KEYS[3], KEYS[2], limit)

local function finish(key, id, state, set, total, err)
  redis.call('HSET', key, 'state', state, 'finished_at', now, 'error', err)
  redis.call('ZADD', set, now, id)
  redis.call('HINCRBY', KEYS[7], total, 1)
  call_back(KEYS[8], key, id)
end

-- To the front of the outbox, the first taken to be taken first again.
local sending = redis.call('ZRANGE', KEYS[9], 0, limit - 1)
for i = #sending, 1, -1 do
  redis.call('ZREM', KEYS[9], sending[i])
  redis.call('RPUSH', KEYS[8], sending[i])
end

local active = {}
if moved < limit then
  active = redis.call('ZRANGE', KEYS[4], 0, limit - moved - 1)
end
for _, id in ipairs(active) do
  local key = ARGV[4] .. id
  local f = redis.call('HMGET', key, 'attempts', 'max_attempts', 'cancel_requested', 'started_at')
  if f[1] then
    local err = 'daemon ' .. ARGV[1] .. ' died during attempt ' .. f[1]
    local entry = cjson.encode({attempt = tonumber(f[1]), daemon = ARGV[1],
      started_at = tonumber(f[4]), finished_at = tonumber(now), outcome = 'lost', error = err})
    append_history(key, entry)
    release_slot(KEYS[2], ARGV[6], key, id)
    redis.call('HDEL', key, 'started_at')
    if f[3] then
      redis.call('HDEL', key, 'cancel_requested')
      finish(key, id, 'cancelled', KEYS[6], 'cancelled', 'cancelled')
    elseif tonumber(f[1]) >= tonumber(f[2]) then
      finish(key, id, 'failed', KEYS[5], 'failed', err .. ', its last')
    else
      redis.call('HSET', key, 'state', 'queued', 'error', err, 'run_at', now)
      make_ready(KEYS[2], key, id, true)
    end
    redis.call('HINCRBY', KEYS[7], 'recovered', 1)
  end
  redis.call('ZREM', KEYS[4], id)
end
moved = moved + #active
if redis.call('LLEN', KEYS[3]) + redis.call('ZCARD', KEYS[4]) + redis.call('ZCARD', KEYS[9]) == 0 then
  redis.call('ZREM', KEYS[1], ARGV[1])
end
return {moved, #sending}
