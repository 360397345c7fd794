-- Claim up to ARGV[4] ready jobs of one queue for one daemon: only jobs it can start at
-- once, the highest priority first (lib.lua tells where ready jobs wait). The ids its
-- blocking fetch landed and the inbox's are sorted by priority; then, for each priority
-- from 9 down, the held jobs of that priority come first, then the inbox's, then the
-- priority's list. Each claimed id enters the daemon's active set in the same step as it
-- leaves its list, so a job is never only in a daemon's memory, and the daemon's lease on
-- the queue is renewed, so a reaper knows to look at its set.
--
-- A job this daemon cannot start now is skipped: it goes back where it was, in order,
-- for any daemon that can take it. That is a job of a type it has no handler for (the
-- first such job of each type is noted in the queue's unhandled hash, over what an
-- earlier claim noted, for /stats), or of a type whose handler `concurrency` has no free
-- slot here. Skipped ids count against
-- the budget of ids examined, so a long run of them at the head of a priority hides the
-- jobs behind it from this daemon (status 'ok' with skipped > 0: the daemon waits for a
-- slot of its own to free, or looks again a little later, and never spins).
--
-- A job over its type's global limits does not start and keeps its attempts: it waits
-- (limits.lua, which the store puts in front of this script). Held jobs start before
-- ready ones of their priority whenever a slot is free. A paused queue gives nothing, and
-- a landed id goes back to the front of the inbox.
-- KEYS[1] -> <prefix>:{<queue>}:ready, the inbox (keys.inbox)
-- KEYS[2] -> <prefix>:{<queue>}:landing:<daemon>
-- KEYS[3] -> <prefix>:{<queue>}:active:<daemon>
-- KEYS[4] -> <prefix>:{<queue>}:owners, the leases (keys.leases)
-- KEYS[5] -> <prefix>:{<queue>}:paused
-- KEYS[6] -> <prefix>:{<queue>}:waits, recent wait times
-- KEYS[7] -> <prefix>:{<queue>}:scheduled, where rate-limited jobs wait
-- KEYS[8] -> <prefix>:{<queue>}:totals
-- KEYS[9] -> <prefix>:{<queue>}:limit_waits
-- KEYS[10] -> <prefix>:{<queue>}:unhandled (type -> 'id due' of a ready job no handler took)
-- ARGV[1..3] -> now, job hash prefix, limit key prefix (the header, lib.lua)
-- ARGV[4] -> most jobs to claim, >= 1
-- ARGV[5] -> this daemon's id, recorded on the job
-- ARGV[6] -> how many recent wait times to keep
-- ARGV[7..] -> 5 entries per job type this daemon has a handler for (record.TYPE_LIMITS):
--   type, its free slots here (-1: the handler has no concurrency), global_concurrency
--   (0: none), rate_limit count (0: none), rate_limit window in ms
-- Returns {status, due, rate-limited, held, skipped, then 11 entries per claimed job
--   (record.CLAIMED_JOB): id, type, payload, attempts, created_at, max_attempts,
--   started_at, ms waited since due, callback URL (or ''), earlier attempts, trace
--   context (or '')}.
--   status: 'ok'; 'more' when it stopped at its budget of ids examined with ready jobs
--   left that it did not skip (claim again rather than block); 'paused'. due: when the
--   earliest job it scheduled for its rate limit is due (epoch ms), or 0. rate-limited,
--   held, skipped: how many jobs it put back for their rate_limit, held for their
--   global_concurrency, and skipped as not startable here.
local most = tonumber(ARGV[4])
local daemon = ARGV[5]
-- Ids examined at most: held, rate-limited and skipped ones do not count against `most`.
local budget = most + INBOX_MAX
-- Leftover ids kept in the inbox, so that daemons blocked on it still wake up.
local KEEP = 16
-- The answer: its five leading entries are set last, the claimed jobs' entries follow.
local out = {'ok', 0, 0, 0, 0}
local skipped = 0
local waits = {}
-- Score, id pairs of the jobs started, for the daemon's active set.
local claimed = {}
local examined = 0
-- Per priority, the ids examined but not taken, in the order they were found.
local back = {}
local function put_back(id, p)
  local ids = back[p]
  if not ids then
    ids = {}
    back[p] = ids
  end
  ids[#ids + 1] = id
end

redis.call('ZADD', KEYS[4], NOW, daemon)
if redis.call('EXISTS', KEYS[5]) == 1 then
  move_to_front(KEYS[2], KEYS[1], INBOX_MAX)
  return {'paused', 0, 0, 0, 0}
end

-- The fields of a queued job, or nil for a stray id (a deleted or cancelled job).
local function examine(id)
  examined = examined + 1
  local f = read_job(JOB .. id)
  if f[STATE] == 'queued' then
    return f
  end
  return nil
end

local types, limited = read_type_limits(7, {scheduled = KEYS[7], totals = KEYS[8],
  limit_waits = KEYS[9]})

-- Types some job of which this claim noted as having no handler here.
local noted = {}

local function start(id, f, t)
  -- Waiting starts when the job is due. The claim's time is read before the call waits
  -- for a connection, so a job can be newer than it: such a job starts when it was due.
  local due = due_of(f)
  local started = admit(id, f, t, math.max(NOW, due))
  if not started then
    return
  end
  local key = JOB .. id
  local attempts = tonumber(f[ATTEMPTS] or 0) + 1
  redis.call('HSET', key, 'state', 'active', 'started_at', started, 'daemon', daemon,
    'attempts', attempts)
  if f[RUN_AT] or f[WAITING_FOR] then
    redis.call('HDEL', key, 'run_at', 'waiting_for')
  end
  -- Into the active set at the end of the call, all at once (the script is one step).
  claimed[#claimed + 1] = NOW
  claimed[#claimed + 1] = id
  waits[#waits + 1] = started - due
  -- Appended in place: a table per job to loop over cost more than the entries.
  local n = #out
  out[n + 1], out[n + 2], out[n + 3], out[n + 4], out[n + 5] =
    id, f[TYPE], f[PAYLOAD], attempts, f[CREATED_AT]
  out[n + 6], out[n + 7], out[n + 8], out[n + 9], out[n + 10], out[n + 11] =
    f[MAX_ATTEMPTS], started, started - due, f[CALLBACK_URL] or '', f[EARLIER_ATTEMPTS] or 0,
    f[TRACE] or ''
  most = most - 1
  t.free = t.free - 1
end

local function skip(id, f, p, t)
  put_back(id, p)
  skipped = skipped + 1
  if not t and not noted[f[TYPE]] then
    redis.call('HSET', KEYS[10], f[TYPE], id .. ' ' .. due_of(f))
    noted[f[TYPE]] = true
  end
end

-- A ready job of priority p: started, held, rate-limited, or skipped.
local function take(id, f, p)
  local t = types[f[TYPE]]
  if f[WAITING_FOR] == 'concurrency' then
    -- A held job's id among the ready ones only wakes a daemon (lib.lua release_slot):
    -- the job waits in its type's line, which a claim that can start it walks itself.
    if not (t and t.free > 0) then
      skip(id, f, p, t)
    end
    return
  end
  if t and t.free > 0 then
    start(id, f, t)
  else
    skip(id, f, p, t)
  end
end

local function room()
  return most > 0
end

local function start_one_held(id, t)
  local f = examine(id)
  if f then
    start(id, f, t)
  end
end

-- Whether a priority list may hold ready jobs still: one this claim did not empty.
local backlog = false

-- Landed and inbox ids, sorted by priority (each priority keeps their order).
local incoming = {}
for p = 0, 9 do
  incoming[p] = {}
end
for _, source in ipairs({KEYS[2], KEYS[1]}) do
  for _, id in ipairs(redis.call('RPOP', source, INBOX_MAX) or {}) do
    local f = examine(id)
    if f then
      local same = incoming[priority_of(f)]
      same[#same + 1] = {id, f}
    end
  end
end

for p = 9, 0, -1 do
  start_held(limited, p, room, start_one_held)
  for _, entry in ipairs(incoming[p]) do
    if most > 0 then
      take(entry[1], entry[2], p)
    else
      put_back(entry[1], p)
    end
  end
  local list = priority_list(KEYS[1], p)
  local emptied = false
  while most > 0 and examined < budget do
    local want = math.min(most, budget - examined)
    local ids = redis.call('RPOP', list, want)
    if not ids then
      emptied = true
      break
    end
    for _, id in ipairs(ids) do
      local f = examine(id)
      if f then
        take(id, f, p)
      end
    end
    if #ids < want then
      emptied = true
      break
    end
  end
  backlog = backlog or not emptied
end

-- What was not taken goes back in front of its lists, the best KEEP of it to the inbox;
-- pushed last to first, so that the first is taken first.
local returning = {}
for p = 9, 0, -1 do
  for _, id in ipairs(back[p] or {}) do
    returning[#returning + 1] = {id, p}
  end
end
for i = #returning, 1, -1 do
  local id, p = returning[i][1], returning[i][2]
  redis.call('RPUSH', i <= KEEP and KEYS[1] or priority_list(KEYS[1], p), id)
end
-- Nor may this claim leave the inbox empty with ready jobs in the priority lists (having
-- taken the inbox's and a part of a list): jobs that arrive then join the lists, and a
-- daemon blocked on the empty inbox would not wake for them. The oldest of the highest
-- priorities move to it, as a put-back's best do; they stay older than their lists.
if backlog and redis.call('LLEN', KEYS[1]) == 0 then
  local front = {}
  for p = 9, 0, -1 do
    if #front >= KEEP then
      break
    end
    for _, id in ipairs(redis.call('RPOP', priority_list(KEYS[1], p), KEEP - #front) or {}) do
      front[#front + 1] = id
    end
  end
  for i = #front, 1, -1 do
    redis.call('RPUSH', KEYS[1], front[i])
  end
end
-- Claiming again helps only if this claim moved some ids on; skipped ones stay in front.
if most > 0 and examined >= budget and examined > skipped then
  out[1] = 'more'
end
call_chunked('ZADD', KEYS[3], claimed)
push_samples(KEYS[6], waits, ARGV[6])
out[2], out[3], out[4], out[5] = waited.due, waited.rate_limit, waited.concurrency, skipped
return out
