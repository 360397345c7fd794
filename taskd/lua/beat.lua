-- A daemon's heartbeat: refresh its record and its time in the registry.
-- KEYS[1] -> the registry of daemons (sorted set, scored by last heartbeat)
-- KEYS[2] -> this daemon's record (hash)
-- ARGV[1] -> this daemon's id
-- ARGV[2] -> now, epoch ms
-- ARGV[3..] -> field, value pairs of the record
-- Returns 1 if the daemon was registered before this beat, 0 if not: for a daemon that
-- has beaten before, 0 means a reaper took it for dead and took its jobs back.
local known = redis.call('ZSCORE', KEYS[1], ARGV[1])
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
redis.call('HSET', KEYS[2], unpack(ARGV, 3))
if known then
  return 1
end
return 0
