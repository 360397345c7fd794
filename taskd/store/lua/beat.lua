-- A daemon's heartbeat: refresh its record and its time in the registry, and look for the
-- installation's marker, which the first beat on a Redis writes and only a loss of data
-- removes (a Redis restarted without persistence, a fail-over to an empty replica).
-- KEYS[1] -> <prefix>:{<prefix>:global}:daemons, the registry (scored by last heartbeat)
-- KEYS[2] -> <prefix>:{<prefix>:global}:daemon:<id>, this daemon's record (hash)
-- KEYS[3] -> <prefix>:{<prefix>:global}:marker
-- KEYS[4] -> <prefix>:{<prefix>:global}:record_versions, the job record layout each
--   daemon reads (keys.record_versions)
-- ARGV[1] -> now, epoch ms (of no queue: the header's first entry only, lib.lua)
-- ARGV[2] -> this daemon's id
-- ARGV[3] -> the job record layout it reads (record.RECORD_VERSION)
-- ARGV[4..] -> field, value pairs of the record (record.DAEMON_FIELDS)
-- Returns {registered, marked, record version}: 1 if the daemon was registered before
-- this beat (for a daemon that has beaten before, 0 means a reaper took it for dead and
-- took its jobs back), 1 if the marker was there (0: a new Redis, or one that lost its
-- data; it is written again either way), and the oldest job record layout a registered
-- daemon reads (1 for one that does not say: a daemon of an older taskd).
local known = redis.call('ZSCORE', KEYS[1], ARGV[2])
redis.call('ZADD', KEYS[1], ARGV[1], ARGV[2])
redis.call('HSET', KEYS[2], unpack(ARGV, 4))
redis.call('HSET', KEYS[4], ARGV[2], ARGV[3])
local marked = redis.call('EXISTS', KEYS[3])
if marked == 0 then
  redis.call('SET', KEYS[3], ARGV[2] .. ' ' .. ARGV[1])
end
-- Every daemon in the registry, live or not reaped yet (one that was only stopped may
-- come back and read records), in HMGETs of a bounded size: a beat costs a few commands
-- whatever the size of the fleet.
local ids = redis.call('ZRANGE', KEYS[1], 0, -1)
local oldest = tonumber(ARGV[3])
local said = 0  -- registered daemons with an entry
for first = 1, #ids, 1000 do
  local last = math.min(first + 999, #ids)
  for _, version in ipairs(redis.call('HMGET', KEYS[4], unpack(ids, first, last))) do
    if version then
      said = said + 1
    end
    oldest = math.min(oldest, tonumber(version) or 1)
  end
end
-- Entries of daemons no longer registered go (a reaper or a clean stop removed them from
-- the registry only).
if redis.call('HLEN', KEYS[4]) > said then
  local registered = {}
  for _, id in ipairs(ids) do
    registered[id] = true
  end
  for _, id in ipairs(redis.call('HKEYS', KEYS[4])) do
    if not registered[id] then
      redis.call('HDEL', KEYS[4], id)
    end
  end
end
return {known and 1 or 0, marked, oldest}
