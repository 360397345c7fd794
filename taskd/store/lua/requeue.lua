-- Return a daemon's unfinished jobs of one queue to the front of the ready jobs (lib.lua),
-- so they run next. Active jobs get their attempt back: the daemon stopped them (or never
-- started them), they did not fail, and their slot of a global_concurrency; they are due
-- again from now (run_at), so their next wait counts from here. A job someone asked to
-- cancel is cancelled instead.
-- Without ids it moves a bounded batch of all landed and active ids (call again until
-- it returns 0); with ids, only those of them still in the active set.
-- KEYS[1] -> the queue's inbox (its ready list)
-- KEYS[2] -> the daemon's landing list for the queue
-- KEYS[3] -> the daemon's active set for the queue
-- KEYS[4] -> the queue's cancelled set
-- KEYS[5] -> the queue's totals hash
-- KEYS[6] -> the queue's callback outbox
-- ARGV[1] -> the queue's job hash prefix
-- ARGV[2] -> most jobs to move
-- ARGV[3] -> now, epoch ms
-- ARGV[4] -> the queue's limit key prefix
-- ARGV[5..] -> the ids to return (optional)
-- Returns the number of jobs moved.
local limit = tonumber(ARGV[2])
local moved = 0

local function give_back(id)
  local key = ARGV[1] .. id
  release_slot(KEYS[1], ARGV[4], key, id)
  if redis.call('HEXISTS', key, 'cancel_requested') == 1 then
    redis.call('HSET', key, 'state', 'cancelled', 'finished_at', ARGV[3], 'error', 'cancelled')
    redis.call('HDEL', key, 'cancel_requested')
    redis.call('ZADD', KEYS[4], ARGV[3], id)
    redis.call('HINCRBY', KEYS[5], 'cancelled', 1)
    call_back(KEYS[6], key, id)
  elseif redis.call('EXISTS', key) == 1 then
    redis.call('HINCRBY', key, 'attempts', -1)
    redis.call('HSET', key, 'state', 'queued', 'run_at', ARGV[3])
    redis.call('HDEL', key, 'started_at')
    make_ready(KEYS[1], key, id, true)
  end
end

if #ARGV > 4 then
  for i = 5, #ARGV do
    if redis.call('ZREM', KEYS[3], ARGV[i]) == 1 then
      give_back(ARGV[i])
      moved = moved + 1
    end
  end
  return moved
end

moved = move_to_front(KEYS[2], KEYS[1], limit)
if moved < limit then
  local active = redis.call('ZRANGE', KEYS[3], 0, limit - moved - 1)
  for _, id in ipairs(active) do
    give_back(id)
    redis.call('ZREM', KEYS[3], id)
  end
  moved = moved + #active
end
return moved
