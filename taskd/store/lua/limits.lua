-- A job type's limits across all daemons, as a claim enforces them: global_concurrency
-- (jobs over it are held in the type's line) and rate_limit (jobs over it are scheduled
-- for when the rate allows). The store puts this text after lib.lua and in front of
-- claim.lua only (scripts.py).
--
-- A type's limit keys share the base LIMIT .. type (keys.Keys.limit_prefix):
--   <base>:running -> ids holding a global_concurrency slot (sorted set, by start)
--   <base>:line    -> ids held for a slot, best first (sorted set, by hold_score)
--   <base>:starts  -> recent starts, 'id:attempt' scored by start, for rate_limit
--   <base>:held    -> the plain list older daemons held jobs in; claims move it into the line
--
-- A held job's score: (9 - priority) steps, plus the time it became due (epoch ms, below
-- one step), so the line pops the highest priority first, the oldest first within one.
local PRIORITY_STEP = 1e13
-- How late a claim can reach Redis after its daemon read NOW: its wait for a connection
-- and the call, both within [redis] request_timeout (at most 60 s). The starts outlive
-- their window by that much: a key expired by Redis's clock would give a late claim an
-- empty window that its own NOW still says is full (5 starts in 999 ms, seen in CI).
local LATE_CLAIM_MS = 60000
-- What the limits made wait in this script call (the claim answers them): jobs held
-- ('concurrency'), jobs scheduled ('rate_limit'), and the earliest of those one's due
-- times (0: none).
local waited = {concurrency = 0, rate_limit = 0, due = 0}
-- The keys the limits write besides their own; set by read_type_limits.
local where = {}

local function hold_score(f)
  return (9 - priority_of(f)) * PRIORITY_STEP + due_of(f)
end

-- Note the priority of a type's best held job in t.best, or -1 when none is held.
local function best_held(t)
  local top = redis.call('ZRANGE', t.base .. ':line', 0, 0, 'WITHSCORES')
  t.best = top[2] and 9 - math.floor(tonumber(top[2]) / PRIORITY_STEP) or -1
end

-- The job types a daemon claims for, from ARGV[first..] (5 entries per type,
-- record.TYPE_LIMITS): type -> {free, concurrency, count, window, base}, and the list of
-- those with a global_concurrency (only they can have held jobs to start). `keys` names
-- the queue's scheduled set, totals and limit_waits hash, which waiting jobs count in.
local function read_type_limits(first, keys)
  where = keys
  local types, limited = {}, {}
  for i = first, #ARGV, 5 do
    local t = {free = tonumber(ARGV[i + 1]), concurrency = tonumber(ARGV[i + 2]),
      count = tonumber(ARGV[i + 3]), window = tonumber(ARGV[i + 4]), base = LIMIT .. ARGV[i]}
    if t.free < 0 then
      t.free = math.huge
    end
    types[ARGV[i]] = t
    if t.concurrency > 0 then
      limited[#limited + 1] = t
      -- Daemons of an older taskd hold jobs in a plain list, in hold order: into the line.
      local old = redis.call('RPOP', t.base .. ':held', INBOX_MAX) or {}
      for _, id in ipairs(old) do
        local f = read_job(JOB .. id)
        if f[STATE] == 'queued' then
          redis.call('ZADD', t.base .. ':line', hold_score(f), id)
        end
      end
      t.running = redis.call('ZCARD', t.base .. ':running')
      best_held(t)
    end
  end
  return types, limited
end

-- A job waits for a limit (why: 'rate_limit' or 'concurrency'): marked, and counted.
local function wait_for(id, f, why)
  redis.call('HSET', JOB .. id, 'waiting_for', why)
  local total = why == 'rate_limit' and 'rate_limited' or 'concurrency_limited'
  redis.call('HINCRBY', where.totals, total, 1)
  redis.call('HINCRBY', where.limit_waits, f[TYPE] .. ':' .. why, 1)
  waited[why] = waited[why] + 1
end

-- Read a type's rate window once per call: t.newest, the latest start recorded (a start
-- is never counted earlier than it), and t.used, the starts within the window before it.
-- Claims reach Redis out of the order of their times (each daemon reads its time before
-- it waits for a connection), and a claim with a later time may already have dropped
-- starts that an earlier time's window still holds. Counting from the newest start
-- keeps the starts in the order the calls run, so a dropped start is out of every later
-- start's window.
local function read_rate_window(t)
  local newest = redis.call('ZRANGE', t.base .. ':starts', -1, -1, 'WITHSCORES')[2]
  t.newest = math.max(NOW, tonumber(newest) or NOW)
  redis.call('ZREMRANGEBYSCORE', t.base .. ':starts', '-inf', t.newest - t.window)
  t.used = redis.call('ZCARD', t.base .. ':starts')
  t.late = 0
end

-- When a job over its type's rate may start, or nil when the rate has room now.
local function rate_due(t)
  if t.used == nil then
    read_rate_window(t)
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

-- When a job may start under its type's global limits, at `at` (epoch ms) or later, or
-- nil when it may not; if it may not, it is put where it waits. A rate-limited start is
-- counted at the time the job's started_at will say, which can be later than NOW (and
-- than `at`, read_rate_window), so no window of started_at values ever holds more starts
-- than the rate.
local function admit(id, f, t, at)
  if t.concurrency > 0 and t.running >= t.concurrency then
    redis.call('ZADD', t.base .. ':line', hold_score(f), id)
    t.best = math.max(t.best, priority_of(f))
    wait_for(id, f, 'concurrency')
    return nil
  end
  if t.count > 0 then
    local due = rate_due(t)
    if due then
      redis.call('HSET', JOB .. id, 'state', 'scheduled', 'run_at', due)
      redis.call('ZADD', where.scheduled, due, id)
      wait_for(id, f, 'rate_limit')
      if waited.due == 0 or due < waited.due then
        waited.due = due
      end
      return nil
    end
    at = math.max(at, t.newest)
    t.newest = at
    redis.call('ZADD', t.base .. ':starts', at, id .. ':' .. (tonumber(f[ATTEMPTS] or 0) + 1))
    redis.call('PEXPIRE', t.base .. ':starts', at - NOW + t.window + LATE_CLAIM_MS)
    t.used = t.used + 1
  end
  if t.concurrency > 0 then
    redis.call('ZADD', t.base .. ':running', NOW, id)
    t.running = t.running + 1
  end
  return at
end

-- Hand the held jobs of priority p, best first, to start(id, t), while their type has a
-- free slot here and globally and room() says the claim takes more.
local function start_held(limited, p, room, start)
  for _, t in ipairs(limited) do
    while t.best == p and room() and t.free > 0 and t.running < t.concurrency do
      start(redis.call('ZPOPMIN', t.base .. ':line')[1], t)
      best_held(t)
    end
  end
end
