-- Forget a queue that holds nothing: delete its flags, counters and statistics, so that
-- a name registered by mistake (or a queue no longer used) leaves no trace. The check and
-- the deletion are one step, so a job enqueued meanwhile is never orphaned.
-- KEYS[1] -> <prefix>:{<queue>}:index, the sorted set index: stored jobs of the queue
-- KEYS[2] -> <prefix>:{<queue>}:owners, the leases (keys.leases)
-- KEYS[3] -> <prefix>:{<queue>}:callbacks, the outbox
-- KEYS[4] -> <prefix>:{<queue>}:archive, the archive hand-off: its entries count as jobs
--   (a deleted job may wait there for the archive)
-- KEYS[5] -> <prefix>:{<queue>}:pages, the paged index's directory: the other stored jobs
-- KEYS[6..] -> the queue's other keys, deleted: flags, counters, statistics, lists
--   (keys.Keys.queue_state)
-- ARGV[1..3] -> now (unused), job hash prefix, limit key prefix (unused) (the header,
--   lib.lua)
-- Returns {jobs, leases, callbacks}: all 0 when the queue was forgotten, else what it
-- still holds (and nothing was deleted).

-- The jobs in the paged index: how many ids it holds, or 0 when none of them has a
-- record. A daemon of a taskd before the paged index deletes jobs without taking their
-- ids out of it (a rollback, or one left running): such ids name no job, and go with the
-- queue. Which records exist is read only until one does.
local function paged_jobs(pages)
  local ids, live = 0, false
  for _, member in ipairs(redis.call('ZRANGE', pages, 0, -1)) do
    local page = page_key(pages, member)
    for _, raw in ipairs(live and {} or redis.call('HKEYS', page)) do
      if redis.call('EXISTS', JOB .. id_text(raw)) == 1 then
        live = true
        break
      end
    end
    ids = ids + redis.call('HLEN', page)
  end
  return live and ids or 0
end

local jobs = redis.call('ZCARD', KEYS[1]) + redis.call('ZCARD', KEYS[4]) + paged_jobs(KEYS[5])
local leases = redis.call('ZCARD', KEYS[2])
local callbacks = redis.call('LLEN', KEYS[3])
if jobs + leases + callbacks > 0 then
  return {jobs, leases, callbacks}
end
for _, member in ipairs(redis.call('ZRANGE', KEYS[5], 0, -1)) do
  redis.call('DEL', page_key(KEYS[5], member))
end
for i = 5, #KEYS do
  redis.call('DEL', KEYS[i])
end
return {0, 0, 0}
