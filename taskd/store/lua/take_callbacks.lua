-- Take up to ARGV[1] callbacks from a queue's outbox for one daemon to send. Each id
-- enters the daemon's set of callbacks in flight in the same step as it leaves the
-- outbox, and the daemon's lease on the queue is renewed, so should the daemon die, a
-- reaper returns them to the outbox (recover.lua).
-- KEYS[1] -> the queue's callback outbox
-- KEYS[2] -> this daemon's set of callbacks in flight for the queue
-- KEYS[3] -> the queue's owners (daemon leases)
-- ARGV[1] -> most callbacks to take, >= 1
-- ARGV[2] -> now, epoch ms
-- ARGV[3] -> this daemon's id
-- Returns the ids taken, oldest first.
local ids = redis.call('RPOP', KEYS[1], tonumber(ARGV[1]))
if not ids then
  return {}
end
redis.call('ZADD', KEYS[3], ARGV[2], ARGV[3])
for _, id in ipairs(ids) do
  redis.call('ZADD', KEYS[2], ARGV[2], id)
end
return ids
