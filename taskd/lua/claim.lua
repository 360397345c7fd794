-- Claim up to ARGV[1] ready jobs of one queue for one daemon, the highest priority first
-- (lib.lua tells where ready jobs wait): the ids its blocking fetch landed and the
-- inbox's are sorted by priority, then each priority's list follows its inbox ids. Each
-- claimed id enters the daemon's active set in the same step as it leaves its list, so a
-- job is never only in a daemon's memory, and the daemon's lease on the queue is renewed,
-- so a reaper knows to look at its set. A job over its type's limits does not start and
-- keeps its attempts: over global_concurrency it is held until a job of its type ends;
-- over rate_limit it is scheduled for when the rate allows it. A paused queue gives
-- nothing, and a landed id goes back to the front of the inbox.
-- KEYS[1] -> the queue's inbox (its ready list)
-- KEYS[2] -> this daemon's landing list for the queue
-- KEYS[3] -> this daemon's active set for the queue
-- KEYS[4] -> the queue's owners (daemon leases)
-- KEYS[5] -> the queue's paused flag
-- KEYS[6] -> the queue's list of recent wait times
-- KEYS[7] -> the queue's scheduled set (rate-limited jobs wait there)
-- KEYS[8] -> the queue's totals hash
-- KEYS[9] -> the queue's hash of limit waits per type
-- ARGV[1] -> most jobs to claim, >= 1
-- ARGV[2] -> now, epoch ms
-- ARGV[3] -> the queue's job hash prefix
-- ARGV[4] -> this daemon's id, recorded on the job
-- ARGV[5] -> how many recent wait times to keep
-- ARGV[6] -> the queue's limit key prefix
-- ARGV[7..] -> 4 entries per configured job type: type, global_concurrency (0: none),
--   rate_limit count (0: none), rate_limit window in ms
-- Returns {status, due, rate-limited, held, then 9 entries per claimed job: id, type,
--   payload, attempts,
--   created_at, max_attempts, started_at, ms waited since due, callback URL (or '')}.
--   status: 'ok'; 'more' when it stopped at its budget of ids examined with ready jobs
--   left (claim again rather than block); 'paused'. due: when the earliest job it
--   scheduled for its rate limit is due (epoch ms), or 0. rate-limited, held: how many
--   jobs it put back for their rate_limit and held for their global_concurrency.
local limit = tonumber(ARGV[1])
local now = tonumber(ARGV[2])
local prefix = ARGV[3]
-- Ids examined at most: held and rate-limited ones do not count against `limit`.
local budget = limit + INBOX_MAX
-- Leftover ids kept in the inbox, so that daemons blocked on it still wake up.
local KEEP = 16
local out = {'ok', 0, 0, 0}
local waits = {}
local examined = 0

redis.call('ZADD', KEYS[4], now, ARGV[4])
if redis.call('EXISTS', KEYS[5]) == 1 then
  move_to_front(KEYS[2], KEYS[1], INBOX_MAX)
  return {'paused', 0, 0, 0}
end

local limits = {}
for i = 7, #ARGV, 4 do
  limits[ARGV[i]] = {concurrency = tonumber(ARGV[i + 1]), count = tonumber(ARGV[i + 2]),
    window = tonumber(ARGV[i + 3]), base = ARGV[6] .. ARGV[i]}
end

-- A held job waits for a job of its type to end. Should none run (its limit removed, or
-- a release missed), nothing would ever free it: free some here, to the front of the
-- ready jobs, where this claim looks next (pushed last to first, to keep their order).
for _, l in pairs(limits) do
  if l.concurrency == 0 or redis.call('ZCARD', l.base .. ':running') == 0 then
    -- As many as may run: a job an ack just freed may still be on its way to a claim.
    free_held(KEYS[1], l.base, prefix, l.concurrency > 0 and l.concurrency or INBOX_MAX)
  end
end

local function wait_for(key, id, kind, why)
  redis.call('HSET', key, 'waiting_for', why)
  redis.call('HINCRBY', KEYS[8], why == 'rate_limit' and 'rate_limited' or 'concurrency_limited', 1)
  redis.call('HINCRBY', KEYS[9], kind .. ':' .. why, 1)
  local slot = why == 'rate_limit' and 3 or 4
  out[slot] = out[slot] + 1
end

local function rate_due(l)
  if l.used == nil then
    redis.call('ZREMRANGEBYSCORE', l.base .. ':starts', '-inf', now - l.window)
    l.used = redis.call('ZCARD', l.base .. ':starts')
    l.late = 0
  end
  if l.used < l.count then
    return nil
  end
  if l.free == nil then
    local oldest = redis.call('ZRANGE', l.base .. ':starts', 0, 0, 'WITHSCORES')
    l.free = tonumber(oldest[2]) + l.window
  end
  -- Later ones in this claim are spread at the rate, so they do not all return at once.
  l.late = l.late + 1
  return l.free + math.floor((l.late - 1) * l.window / l.count)
end

-- Whether a job may start under its type's limits; if not, it is put where it waits.
local function admit(id, key, kind, attempt)
  local l = limits[kind]
  if not l then
    return true
  end
  if l.concurrency > 0 then
    l.running = l.running or redis.call('ZCARD', l.base .. ':running')
    if l.running >= l.concurrency then
      redis.call('LPUSH', l.base .. ':held', id)
      wait_for(key, id, kind, 'concurrency')
      return false
    end
  end
  if l.count > 0 then
    local due = rate_due(l)
    if due then
      redis.call('HSET', key, 'state', 'scheduled', 'run_at', due)
      redis.call('ZADD', KEYS[7], due, id)
      wait_for(key, id, kind, 'rate_limit')
      if out[2] == 0 or due < out[2] then
        out[2] = due
      end
      return false
    end
    redis.call('ZADD', l.base .. ':starts', now, id .. ':' .. attempt)
    redis.call('PEXPIRE', l.base .. ':starts', l.window)
    l.used = l.used + 1
  end
  if l.concurrency > 0 then
    redis.call('ZADD', l.base .. ':running', now, id)
    l.running = l.running + 1
  end
  return true
end

-- The fields of a queued job, or nil for a stray id (a deleted or cancelled job).
local function examine(id)
  examined = examined + 1
  local f = redis.call('HMGET', prefix .. id, 'state', 'type', 'payload', 'created_at',
    'max_attempts', 'run_at', 'callback_url', 'priority', 'attempts')
  if f[1] == 'queued' then
    return f
  end
  return nil
end

local function start(id, f)
  local key = prefix .. id
  if not admit(id, key, f[2], tonumber(f[9] or 0) + 1) then
    return
  end
  -- Waiting starts when the job is due: at its run_at, else when it was created. The
  -- claim's time is read before the call waits for a connection, so a job can be newer
  -- than it: such a job starts when it was due, not before.
  local due = tonumber(f[6] or f[4])
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
      local same = incoming[tonumber(f[8] or 5)]
      same[#same + 1] = {id, f}
    end
  end
end

local leftovers = {}
for p = 9, 0, -1 do
  for _, entry in ipairs(incoming[p]) do
    if limit > 0 then
      start(entry[1], entry[2])
    else
      leftovers[#leftovers + 1] = {entry[1], p}
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
        start(id, f)
      end
    end
  end
end

-- Leftovers go back in front of their lists, the best KEEP of them to the inbox; pushed
-- last to first, so that the first is taken first.
for i = #leftovers, 1, -1 do
  local id, p = leftovers[i][1], leftovers[i][2]
  redis.call('RPUSH', i <= KEEP and KEYS[1] or priority_list(KEYS[1], p), id)
end
if limit > 0 and examined >= budget then
  out[1] = 'more'
end
if #waits > 0 then
  redis.call('LPUSH', KEYS[6], unpack(waits))
  redis.call('LTRIM', KEYS[6], 0, tonumber(ARGV[5]) - 1)
end
return out
