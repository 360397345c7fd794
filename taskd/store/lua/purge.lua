-- Purge a bounded batch of one queue's jobs in one state: take up to ARGV[4] ids out of
-- where that state keeps them, and delete the records of the jobs still in it (lib.lua,
-- drop_job). The store calls it again until nothing is left to take, so that Redis serves
-- other commands between batches; each batch is one step, so a job a claim started (or
-- a promotion made ready) before it is no longer the state's, and is left alone. A job of
-- another state is never deleted: an active one above all.
--   queued: ids landed for a daemon's next claim (its blocking fetch moved them out of
--     the inbox; at most a few, read from the landing lists of the daemons leasing the
--     queue), then the inbox's and each priority list's, then the lines of jobs held for
--     a global_concurrency (and the plain lists older daemons held them in) of every type
--     that ever held one (limit_waits counts their waits). An id whose record is not
--     queued is dropped, as a claim drops it: its job was deleted, cancelled or started
--     (a held job's wake-up call, lib.lua release_slot); a landed one is left to its claim.
--   scheduled: ids of the scheduled set, soonest first: delayed jobs, retries waiting for
--     their time, jobs waiting for their rate_limit.
--   failed: ids of the failed set, oldest first, of jobs that failed at or before NOW
--     (when the purge began: a job failing meanwhile is kept). A final record not yet
--     archived is kept for the archive (lib.lua, keep_for_archive).
-- KEYS[1] -> <prefix>:{<queue>}:ready, the inbox (keys.inbox)
-- KEYS[2] -> <prefix>:{<queue>}:scheduled
-- KEYS[3] -> <prefix>:{<queue>}:dead, the failed set (keys.failed)
-- KEYS[4] -> <prefix>:{<queue>}:index, the sorted set index (keys.index)
-- KEYS[5] -> <prefix>:{<queue>}:owners, the leases (keys.leases): whose landing lists to read
-- KEYS[6] -> <prefix>:{<queue>}:limit_waits: TYPE:concurrency names the types that held jobs
-- KEYS[7] -> <prefix>:{<queue>}:pages, the paged index's directory (index.lua)
-- ARGV[1..3] -> now, job hash prefix, limit key prefix (the header, lib.lua)
-- ARGV[4] -> most ids to take, >= 1
-- ARGV[5] -> the state: 'queued', 'scheduled' or 'failed'
-- ARGV[6] -> <prefix>:{<queue>}:idem:, the idempotency key prefix
-- ARGV[7] -> <prefix>:{<queue>}:landing:, the landing lists' prefix (keys.landing_prefix)
-- ARGV[8] -> <prefix>:{<queue>}:archive, the archive hand-off (lib.lua,
--   keep_for_archive)
-- Returns {removed, taken, left}: the jobs deleted, the ids taken out of where they were
-- (strays too: 0 when there was nothing left to take), and the ids still there after it.
local most = tonumber(ARGV[4])
local state = ARGV[5]
local removed, taken = 0, 0

-- Delete the job named by an id taken out of its place, if it is still in the state.
local function purge(id)
  taken = taken + 1
  local key = JOB .. id
  local f = redis.call('HMGET', key, 'state', 'waiting_for', 'type')
  if f[1] ~= state then
    return
  end
  if state == 'queued' and f[2] == 'concurrency' then
    -- A held job's id among the ready ones is a wake-up call; the job waits in its line.
    redis.call('ZREM', LIMIT .. f[3] .. ':line', id)
  elseif state == 'failed' then
    keep_for_archive(ARGV[8], key, id)
  end
  drop_job(key, id, ARGV[6])
  removed = removed + 1
end

-- The types whose jobs may wait in a line: those that ever waited for a global_concurrency.
local function held_types()
  local types = {}
  for _, field in ipairs(redis.call('HKEYS', KEYS[6])) do
    local job_type = string.match(field, '^(.+):concurrency$')
    if job_type then
      types[#types + 1] = job_type
    end
  end
  return types
end

-- Take up to what the batch has left of `most` ids from the consuming end of a list.
local function take_from(list)
  while taken < most do
    local ids = redis.call('RPOP', list, most - taken)
    if not ids then
      return
    end
    for _, id in ipairs(ids) do
      purge(id)
    end
  end
end

local function purge_queued()
  for _, daemon in ipairs(redis.call('ZRANGE', KEYS[5], 0, -1)) do
    local landing = ARGV[7] .. daemon
    for _, id in ipairs(redis.call('LRANGE', landing, 0, most - 1)) do
      if taken < most and redis.call('HGET', JOB .. id, 'state') == 'queued' then
        redis.call('LREM', landing, 0, id)
        purge(id)
      end
    end
  end
  local lists = {KEYS[1]}
  for p = 9, 0, -1 do
    lists[#lists + 1] = priority_list(KEYS[1], p)
  end
  for _, list in ipairs(lists) do
    take_from(list)
  end
  local left = 0
  for _, job_type in ipairs(held_types()) do
    local base = LIMIT .. job_type
    if taken < most then
      local popped = redis.call('ZPOPMIN', base .. ':line', most - taken)
      for i = 1, #popped, 2 do
        purge(popped[i])
      end
    end
    take_from(base .. ':held')
    left = left + redis.call('ZCARD', base .. ':line') + redis.call('LLEN', base .. ':held')
  end
  for _, list in ipairs(lists) do
    left = left + redis.call('LLEN', list)
  end
  return left
end

-- Take the first ids of a sorted set (those of `ids`), purging their jobs.
local function take_set(set, ids)
  for _, id in ipairs(ids) do
    purge(id)
  end
  call_chunked('ZREM', set, ids)
end

local left
if state == 'queued' then
  left = purge_queued()
elseif state == 'scheduled' then
  take_set(KEYS[2], redis.call('ZRANGE', KEYS[2], 0, most - 1))
  left = redis.call('ZCARD', KEYS[2])
elseif state == 'failed' then
  take_set(KEYS[3], redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', NOW, 'LIMIT', 0, most))
  left = redis.call('ZCOUNT', KEYS[3], '-inf', NOW)
else
  return redis.error_reply('purge: no such state ' .. state)
end
unindex(KEYS[4], KEYS[7], dropped)
return {removed, taken, left}
