-- Take the oldest entries of a queue's archive hand-off (lib.lua, keep_for_archive) for
-- one daemon to write to the archive, with what each names. One daemon at a time
-- archives a queue: it holds the queue's archive lock for a lease it renews with every
-- take, so that daemons do not write the same entries over one another; should it die,
-- the lease lapses and another takes over. Entries stay in the hand-off until written
-- (archive_done.lua), so the janitor keeps their jobs (trim.lua) and no crash loses one.
--
-- The record is answered as the hash holds it: filling in defaults and the history entry
-- the record implies is the archiver's (record.py, decode_archive_record), in its own
-- process, not Redis's, which every daemon shares.
-- KEYS[1] -> <prefix>:{<queue>}:archive, the hand-off
-- KEYS[2] -> <prefix>:{<queue>}:archive:kept, copies of records that left their final
--   state before they were archived
-- KEYS[3] -> <prefix>:{<queue>}:archive:lock, the daemon archiving the queue
-- ARGV[1..3] -> now (unused), job hash prefix, limit key prefix (unused) (the header,
--   lib.lua)
-- ARGV[4] -> most entries to take, >= 1
-- ARGV[5] -> this daemon's id
-- ARGV[6] -> the lease, ms
-- Returns false when another daemon holds the lock, else, per entry oldest first, three
-- entries: the entry, its score (when its job ended), and then either the job's ARCHIVED
-- fields (record.ARCHIVED; nil where the hash has none, all nil when it is gone), or for
-- a kept copy its JSON text (an array of field, value pairs), nil when gone.
local ARCHIVED = {'type', 'state', 'attempts', 'payload', 'result', 'error', 'priority',
  'idempotency_key', 'max_attempts', 'created_at', 'started_at', 'finished_at', 'daemon',
  'callback_url', 'history'}

local holder = redis.call('GET', KEYS[3])
if holder and holder ~= ARGV[5] then
  return false
end
-- A full Redis (maxmemory, noeviction) refuses the SET: the entries are taken all the same,
-- unlocked. Writing them (and removing them, which frees memory) is what a full Redis
-- needs; another daemon may write the same ones meanwhile, which is harmless.
redis.pcall('SET', KEYS[3], ARGV[5], 'PX', ARGV[6])
local entries = redis.call('ZRANGE', KEYS[1], 0, tonumber(ARGV[4]) - 1, 'WITHSCORES')
local taken = {}
for i = 1, #entries, 2 do
  local entry = entries[i]
  local found
  if string.find(entry, '@', 1, true) then
    found = redis.call('HGET', KEYS[2], entry)
  else
    found = redis.call('HMGET', JOB .. entry, unpack(ARCHIVED))
  end
  -- Three entries a row: a table per row to convert cost Redis more than the fields.
  taken[#taken + 1] = entry
  taken[#taken + 1] = entries[i + 1]
  taken[#taken + 1] = found
end
return taken
