-- Take up to ARGV[4] callbacks from a queue's outbox for one daemon to send. Each id
-- enters the daemon's set of callbacks in flight in the same step as it leaves the
-- outbox, and the daemon's lease on the queue is renewed, so should the daemon die, a
-- reaper returns them to the outbox (recover.lua).
-- KEYS[1] -> <prefix>:{<queue>}:callbacks, the outbox
-- KEYS[2] -> <prefix>:{<queue>}:sending:<daemon>, this daemon's callbacks in flight
-- KEYS[3] -> <prefix>:{<queue>}:owners, the leases (keys.leases)
-- ARGV[1..3] -> now, then job hash prefix and limit key prefix (both unused) (the header,
--   lib.lua)
-- ARGV[4] -> most callbacks to take, >= 1
-- ARGV[5] -> this daemon's id
-- Returns the ids taken, oldest first.
local ids = redis.call('RPOP', KEYS[1], tonumber(ARGV[4]))
if not ids then
  return {}
end
redis.call('ZADD', KEYS[3], NOW, ARGV[5])
for _, id in ipairs(ids) do
  redis.call('ZADD', KEYS[2], NOW, id)
end
return ids
