-- Claim up to ARGV[1] ready jobs of one queue for one daemon: only jobs it can start at
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
-- A job over its type's global limits does not start and keeps its attempts: over
-- global_concurrency it is held in its type's line (a sorted set, best first: priority,
-- then the time it became due), and held jobs start before ready ones of their priority
-- whenever a slot is free; over rate_limit it is scheduled for when the rate allows it. A
-- paused queue gives nothing, and a landed id goes back to the front of the inbox.
-- KEYS[1] -> {prefix}:{queue}:ready, the inbox
-- KEYS[2] -> {prefix}:{queue}:landing:<daemon>
-- KEYS[3] -> {prefix}:{queue}:active:<daemon>
-- KEYS[4] -> {prefix}:{queue}:owners (daemon leases)
-- KEYS[5] -> {prefix}:{queue}:paused
-- KEYS[6] -> {prefix}:{queue}:waits (recent wait times)
-- KEYS[7] -> {prefix}:{queue}:scheduled (rate-limited jobs wait there)
-- KEYS[8] -> {prefix}:{queue}:totals
-- KEYS[9] -> {prefix}:{queue}:limit_waits
-- KEYS[10] -> {prefix}:{queue}:unhandled (type -> 'id due' of a ready job no handler took)
-- ARGV[1] -> most jobs to claim, >= 1
-- ARGV[2] -> now, epoch ms
-- ARGV[3] -> the queue's job hash prefix
-- ARGV[4] -> this daemon's id, recorded on the job
-- ARGV[5] -> how many recent wait times to keep
-- ARGV[6] -> the queue's limit key prefix
-- ARGV[7..] -> 5 entries per job type this daemon has a handler for: type, its free
--   slots here (-1: the handler has no concurrency), global_concurrency (0: none),
--   rate_limit count (0: none), rate_limit window in ms
-- Returns {status, due, rate-limited, held, skipped, then 9 entries per claimed job: id,
--   type, payload, attempts, created_at, max_attempts, started_at, ms waited since due,
--   callback URL (or '')}.
--   status: 'ok'; 'more' when it stopped at its budget of ids examined with ready jobs
--   left that it did not skip (claim again rather than block); 'paused'. due: when the
--   earliest job it scheduled for its rate limit is due (epoch ms), or 0. rate-limited,
--   held, skipped: how many jobs it put back for their rate_limit, held for their
--   global_concurrency, and skipped as not startable here.
local limit = tonumber(ARGV[1])
local now = tonumber(ARGV[2])
local prefix = ARGV[3]
-- Ids examined at most: held, rate-limited and skipped ones do not count against `limit`.
local budget = limit + INBOX_MAX
-- Leftover ids kept in the inbox, so that daemons blocked on it still wake up.
local KEEP = 16
-- A held job's score: (9 - priority) steps, plus the time it became due (epoch ms, below
-- one step), so the line pops the highest priority first, the oldest first within one.
local PRIORITY_STEP = 1e13
local out = {'ok', 0, 0, 0, 0}
local waits = {}
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

redis.call('ZADD', KEYS[4], now, ARGV[4])
if redis.call('EXISTS', KEYS[5]) == 1 then
  move_to_front(KEYS[2], KEYS[1], INBOX_MAX)
  return {'paused', 0, 0, 0, 0}
end

local function read(id)
  return redis.call('HMGET', prefix .. id, 'state', 'type', 'payload', 'created_at',
    'max_attempts', 'run_at', 'callback_url', 'priority', 'attempts', 'waiting_for')
end

-- The fields of a queued job, or nil for a stray id (a deleted or cancelled job).
local function examine(id)
  examined = examined + 1
  local f = read(id)
  if f[1] == 'queued' then
    return f
  end
  return nil
end

-- When a job became due: at its run_at (promoted, retried, returned), else its creation.
local function due_of(f)
  return tonumber(f[6] or f[4])
end

local function hold_score(f)
  return (9 - tonumber(f[8] or DEFAULT_PRIORITY)) * PRIORITY_STEP + due_of(f)
end

-- The priority of a type's best held job, or -1 when none is held.
local function best_held(t)
  local top = redis.call('ZRANGE', t.base .. ':line', 0, 0, 'WITHSCORES')
  t.best = top[2] and 9 - math.floor(tonumber(top[2]) / PRIORITY_STEP) or -1
end

local types = {}
-- The types with a global_concurrency: only they can have held jobs to start.
local limited = {}
for i = 7, #ARGV, 5 do
  local t = {free = tonumber(ARGV[i + 1]), concurrency = tonumber(ARGV[i + 2]),
    count = tonumber(ARGV[i + 3]), window = tonumber(ARGV[i + 4]), base = ARGV[6] .. ARGV[i]}
  if t.free < 0 then
    t.free = math.huge
  end
  types[ARGV[i]] = t
  if t.concurrency > 0 then
    limited[#limited + 1] = t
    -- Daemons of an older taskd hold jobs in a plain list, in hold order: into the line.
    local old = redis.call('RPOP', t.base .. ':held', INBOX_MAX) or {}
    for _, id in ipairs(old) do
      local f = read(id)
      if f[1] == 'queued' then
        redis.call('ZADD', t.base .. ':line', hold_score(f), id)
      end
    end
    t.running = redis.call('ZCARD', t.base .. ':running')
    best_held(t)
  end
end

-- Types some job of which this claim noted as having no handler here.
local noted = {}

local function wait_for(key, kind, why)
  redis.call('HSET', key, 'waiting_for', why)
  redis.call('HINCRBY', KEYS[8], why == 'rate_limit' and 'rate_limited' or 'concurrency_limited', 1)
  redis.call('HINCRBY', KEYS[9], kind .. ':' .. why, 1)
  local slot = why == 'rate_limit' and 3 or 4
  out[slot] = out[slot] + 1
end

local function rate_due(t)
  if t.used == nil then
    redis.call('ZREMRANGEBYSCORE', t.base .. ':starts', '-inf', now - t.window)
    t.used = redis.call('ZCARD', t.base .. ':starts')
    t.late = 0
  end
  if t.used < t.count then
    return nil
  end
  if t.free_at == nil then
    local oldest = redis.call('ZRANGE', t.base .. ':starts', 0, 0, 'WITHSCORES')
    t.free_at = tonumber(oldest[2]) + t.window
  end
  -- Later ones in this claim are spread at the rate, so they do not all return at once.
  t.late = t.late + 1
  return t.free_at + math.floor((t.late - 1) * t.window / t.count)
end

-- Whether a job may start under its type's global limits; if not, it is put where it waits.
local function admit(id, f, t)
  local key = prefix .. id
  if t.concurrency > 0 and t.running >= t.concurrency then
    redis.call('ZADD', t.base .. ':line', hold_score(f), id)
    t.best = math.max(t.best, tonumber(f[8] or DEFAULT_PRIORITY))
    wait_for(key, f[2], 'concurrency')
    return false
  end
  if t.count > 0 then
    local due = rate_due(t)
    if due then
      redis.call('HSET', key, 'state', 'scheduled', 'run_at', due)
      redis.call('ZADD', KEYS[7], due, id)
      wait_for(key, f[2], 'rate_limit')
      if out[2] == 0 or due < out[2] then
        out[2] = due
      end
      return false
    end
    redis.call('ZADD', t.base .. ':starts', now, id .. ':' .. (tonumber(f[9] or 0) + 1))
    redis.call('PEXPIRE', t.base .. ':starts', t.window)
    t.used = t.used + 1
  end
  if t.concurrency > 0 then
    redis.call('ZADD', t.base .. ':running', now, id)
    t.running = t.running + 1
  end
  return true
end

local function start(id, f, t)
  if not admit(id, f, t) then
    return
  end
  local key = prefix .. id
  -- Waiting starts when the job is due. The claim's time is read before the call waits
  -- for a connection, so a job can be newer than it: such a job starts when it was due.
  local due = due_of(f)
  local started = math.max(now, due)
  redis.call('ZADD', KEYS[3], now, id)
  local attempts = redis.call('HINCRBY', key, 'attempts', 1)
  redis.call('HSET', key, 'state', 'active', 'started_at', started, 'daemon', ARGV[4])
  redis.call('HDEL', key, 'run_at', 'waiting_for')
  waits[#waits + 1] = started - due
  for _, v in ipairs({id, f[2], f[3], attempts, f[4], f[5], started, started - due, f[7] or ''}) do
    out[#out + 1] = v
  end
  limit = limit - 1
  t.free = t.free - 1
end

local function skip(id, f, p, t)
  put_back(id, p)
  out[5] = out[5] + 1
  if not t and not noted[f[2]] then
    redis.call('HSET', KEYS[10], f[2], id .. ' ' .. due_of(f))
    noted[f[2]] = true
  end
end

-- A ready job of priority p: started, held, rate-limited, or skipped.
local function take(id, f, p)
  local t = types[f[2]]
  if f[10] == 'concurrency' then
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

-- The held jobs of priority p, while their type has a free slot here and globally.
local function start_held(p)
  for _, t in ipairs(limited) do
    while t.best == p and limit > 0 and t.free > 0 and t.running < t.concurrency do
      local id = redis.call('ZPOPMIN', t.base .. ':line')[1]
      local f = examine(id)
      if f then
        start(id, f, t)
      end
      best_held(t)
    end
  end
end

-- Landed and inbox ids, sorted by priority (each priority keeps their order).
local incoming = {}
for p = 0, 9 do
  incoming[p] = {}
end
for _, source in ipairs({KEYS[2], KEYS[1]}) do
  for _, id in ipairs(redis.call('RPOP', source, INBOX_MAX) or {}) do
    local f = examine(id)
    if f then
      local same = incoming[tonumber(f[8] or DEFAULT_PRIORITY)]
      same[#same + 1] = {id, f}
    end
  end
end

for p = 9, 0, -1 do
  start_held(p)
  for _, entry in ipairs(incoming[p]) do
    if limit > 0 then
      take(entry[1], entry[2], p)
    else
      put_back(entry[1], p)
    end
  end
  local list = priority_list(KEYS[1], p)
  while limit > 0 and examined < budget do
    local ids = redis.call('RPOP', list, math.min(limit, budget - examined))
    if not ids then
      break
    end
    for _, id in ipairs(ids) do
      local f = examine(id)
      if f then
        take(id, f, p)
      end
    end
  end
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
-- Claiming again helps only if this claim moved some ids on; skipped ones stay in front.
if limit > 0 and examined >= budget and examined > out[5] then
  out[1] = 'more'
end
if #waits > 0 then
  redis.call('LPUSH', KEYS[6], unpack(waits))
  redis.call('LTRIM', KEYS[6], 0, tonumber(ARGV[5]) - 1)
end
return out
