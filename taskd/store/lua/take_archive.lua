-- Take the oldest entries of a queue's archive hand-off (lib.lua, keep_for_archive) for
-- one daemon to write to the archive, with what each names. One daemon at a time
-- archives a queue: it holds the queue's archive lock for a lease it renews with every
-- take, so that daemons do not write the same entries over one another; should it die,
-- the lease lapses and another takes over. Entries stay in the hand-off until written
-- (archive_done.lua), so the janitor keeps their jobs (trim.lua) and no crash loses one.
-- KEYS[1] -> <prefix>:{<queue>}:archive, the hand-off
-- KEYS[2] -> <prefix>:{<queue>}:archive:kept, copies of records that left their final
--   state before they were archived
-- KEYS[3] -> <prefix>:{<queue>}:archive:lock, the daemon archiving the queue
-- ARGV[1..3] -> now (unused), job hash prefix, limit key prefix (unused) (the header,
--   lib.lua)
-- ARGV[4] -> most entries to take, >= 1
-- ARGV[5] -> this daemon's id
-- ARGV[6] -> the lease, ms
-- Returns false when another daemon holds the lock, else, per entry oldest first: the
-- entry, its score (when its job ended), then the job's ARCHIVED fields (record.ARCHIVED),
-- absent ones at their default or nil, its history with the final attempt's entry written
-- in (lib.lua, settled); or only the entry and score when the record is gone or not final
-- (written by a taskd that kept no copy), for the archiver to drop.
local ARCHIVED = {'type', 'state', 'attempts', 'payload', 'result', 'error', 'priority',
  'idempotency_key', 'max_attempts', 'created_at', 'started_at', 'finished_at', 'daemon',
  'callback_url', 'history'}
local FINAL = {completed = true, failed = true, cancelled = true}
-- The values of fields absent at their default (record.JOB_FIELDS): the archive stores them.
local DEFAULTS = {[3] = '0', [7] = tostring(DEFAULT_PRIORITY), [9] = '1', [15] = '[]'}

-- The ARCHIVED fields of a kept copy (a JSON array of field, value pairs).
local function from_copy(copy)
  local pairs_ = cjson.decode(copy)
  local named = {}
  for i = 1, #pairs_, 2 do
    named[pairs_[i]] = pairs_[i + 1]
  end
  local f = {}
  for i, name in ipairs(ARCHIVED) do
    f[i] = named[name] or false
  end
  return f
end

-- The fields, by SETTLE's names, of a job's ARCHIVED fields.
local function settle_fields(f)
  local at = {}
  for i, name in ipairs(ARCHIVED) do
    at[name] = f[i]
  end
  local picked = {}
  for i, name in ipairs(SETTLE) do
    picked[i] = at[name]
  end
  return picked
end

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
  local f
  if string.find(entry, '@', 1, true) then
    local copy = redis.call('HGET', KEYS[2], entry)
    f = copy and from_copy(copy)
  else
    f = redis.call('HMGET', JOB .. entry, unpack(ARCHIVED))
  end
  local row = {entry, entries[i + 1]}
  if f and FINAL[f[2]] then
    f[#ARCHIVED] = settled(settle_fields(f))
    for j = 1, #ARCHIVED do
      row[j + 2] = f[j] or DEFAULTS[j] or false
    end
  end
  taken[#taken + 1] = row
end
return taken
