-- Remove a dead daemon from the registry, unless it beat again meanwhile.
-- KEYS[1] -> the registry of daemons (sorted set, scored by last heartbeat)
-- KEYS[2] -> the daemon's record (hash)
-- ARGV[1] -> the daemon's id
-- ARGV[2] -> heartbeats before this time, epoch ms, are too old
-- Returns 1 if removed, 0 if not.
local last = redis.call('ZSCORE', KEYS[1], ARGV[1])
if last and tonumber(last) < tonumber(ARGV[2]) then
  redis.call('ZREM', KEYS[1], ARGV[1])
  redis.call('DEL', KEYS[2])
  return 1
end
return 0
