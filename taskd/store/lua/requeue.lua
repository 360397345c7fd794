-- Return a daemon's unfinished jobs of one queue to the front of the ready jobs (lib.lua),
-- so they run next. Active jobs get their attempt back: the daemon stopped them (or never
-- started them), they did not fail, and their slot of a global_concurrency; they are due
-- again from now (run_at), so their next wait counts from here. A job someone asked to
-- cancel is cancelled instead.
-- Without ids it moves a bounded batch of all landed and active ids (call again until
-- it returns 0); with ids, only those of them still in the active set.
-- KEYS[1] -> <prefix>:{<queue>}:ready, the inbox (keys.inbox)
-- KEYS[2] -> <prefix>:{<queue>}:landing:<daemon>, the daemon's landing list
-- KEYS[3] -> <prefix>:{<queue>}:active:<daemon>, the daemon's active set
-- KEYS[4] -> <prefix>:{<queue>}:cancelled
-- KEYS[5] -> <prefix>:{<queue>}:totals
-- KEYS[6] -> <prefix>:{<queue>}:callbacks, the outbox
-- ARGV[1..3] -> now, job hash prefix, limit key prefix (the header, lib.lua)
-- ARGV[4] -> most jobs to move
-- ARGV[5] -> <prefix>:{<queue>}:archive, the archive hand-off, or '' (lib.lua, finish_into)
-- ARGV[6..] -> the ids to return (optional)
-- Returns the number of jobs moved.
local most = tonumber(ARGV[4])
local moved = 0
finish_into(KEYS[5], KEYS[6], ARGV[5])

local function give_back(id)
  local key = JOB .. id
  release_slot(KEYS[1], key, id)
  -- Before it may end cancelled: this attempt did not end the job (lib.lua, history).
  redis.call('HDEL', key, 'started_at')
  if cancel_if_requested(key, id, KEYS[4]) then
    return
  end
  if redis.call('EXISTS', key) == 1 then
    redis.call('HINCRBY', key, 'attempts', -1)
    redis.call('HSET', key, 'state', 'queued', 'run_at', NOW)
    make_ready(KEYS[1], key, id, true)
  end
end

if #ARGV > 5 then
  for i = 6, #ARGV do
    if redis.call('ZREM', KEYS[3], ARGV[i]) == 1 then
      give_back(ARGV[i])
      moved = moved + 1
    end
  end
  flush_finished()
  return moved
end

moved = move_to_front(KEYS[2], KEYS[1], most)
if moved < most then
  local active = redis.call('ZRANGE', KEYS[3], 0, most - moved - 1)
  for _, id in ipairs(active) do
    give_back(id)
    redis.call('ZREM', KEYS[3], id)
  end
  moved = moved + #active
end
flush_finished()
return moved
