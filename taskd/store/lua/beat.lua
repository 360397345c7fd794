-- A daemon's heartbeat: refresh its record and its time in the registry, and look for the
-- installation's marker, which the first beat on a Redis writes and only a loss of data
-- removes (a Redis restarted without persistence, a fail-over to an empty replica).
-- KEYS[1] -> <prefix>:{<prefix>:global}:daemons, the registry (scored by last heartbeat)
-- KEYS[2] -> <prefix>:{<prefix>:global}:daemon:<id>, this daemon's record (hash)
-- KEYS[3] -> <prefix>:{<prefix>:global}:marker
-- ARGV[1] -> now, epoch ms (of no queue: the header's first entry only, lib.lua)
-- ARGV[2] -> this daemon's id
-- ARGV[3..] -> field, value pairs of the record (record.DAEMON_FIELDS)
-- Returns {registered, marked, record version}: 1 if the daemon was registered before
-- this beat (for a daemon that has beaten before, 0 means a reaper took it for dead and
-- took its jobs back), 1 if the marker was there (0: a new Redis, or one that lost its
-- data; it is written again either way), and the oldest job record layout a registered
-- daemon reads (record.RECORD_VERSION; 1 for a daemon whose record does not say).
local known = redis.call('ZSCORE', KEYS[1], ARGV[2])
redis.call('ZADD', KEYS[1], ARGV[1], ARGV[2])
redis.call('HSET', KEYS[2], unpack(ARGV, 3))
local marked = redis.call('EXISTS', KEYS[3])
if marked == 0 then
  redis.call('SET', KEYS[3], ARGV[2] .. ' ' .. ARGV[1])
end
-- Every daemon in the registry, live or not reaped yet: one that died still has its
-- jobs' records to read should it come back. The records share this one's key prefix.
local prefix = string.sub(KEYS[2], 1, #KEYS[2] - #ARGV[2])
local oldest = nil
for _, id in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  local version = tonumber(redis.call('HGET', prefix .. id, 'record_version') or 1)
  if oldest == nil or version < oldest then
    oldest = version
  end
end
return {known and 1 or 0, marked, oldest}
