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
-- No ARGV, and so no header (lib.lua): it uses none of now, job prefix and limit prefix.
-- Returns {jobs, leases, callbacks}: all 0 when the queue was forgotten, else what it
-- still holds (and nothing was deleted).
local jobs = redis.call('ZCARD', KEYS[1]) + redis.call('ZCARD', KEYS[4])
for _, member in ipairs(redis.call('ZRANGE', KEYS[5], 0, -1)) do
  jobs = jobs + redis.call('HLEN', KEYS[5] .. ':' .. string.match(member, ':(%d+)$'))
end
local leases = redis.call('ZCARD', KEYS[2])
local callbacks = redis.call('LLEN', KEYS[3])
if jobs + leases + callbacks > 0 then
  return {jobs, leases, callbacks}
end
for i = 6, #KEYS do
  redis.call('DEL', KEYS[i])
end
return {0, 0, 0}
