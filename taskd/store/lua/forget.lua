-- Remove a dead daemon from the registry, unless it beat again meanwhile.
-- KEYS[1] -> <prefix>:{<prefix>:global}:daemons, the registry (scored by last heartbeat)
-- KEYS[2] -> <prefix>:{<prefix>:global}:daemon:<id>, the daemon's record (hash)
-- No ARGV header (lib.lua): it uses none of now, job prefix and limit prefix.
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
