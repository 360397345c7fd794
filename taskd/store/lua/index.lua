-- The paged index (record.RECORD_VERSION 3). The store puts this text after lib.lua, in
-- front of only the scripts that add ids to a queue's index or take them out (scripts.py):
-- a script call runs its preludes' definitions first, which would cost every other call
-- some 1.5 µs.
--
-- Every stored id of a queue, newest first for GET /jobs, in about 23 bytes an id where
-- a sorted set of the ids took 120 to 144. Pages are hashes of ids as their 16 bytes
-- (field: the id's bytes; value: ''), so small that each stays in Redis's compact
-- encoding (128 fields by default). Each page holds a range of ids: from its first id up
-- to the next page's. The directory (keys.pages) is a sorted set, all scored 0, of
-- '<first id>:<page number>', the id as text, so its lexicographic order is the ids'
-- order and one ZREVRANGEBYLEX finds the page of an id. A page's hash is
-- '<directory>:<number>'; '<directory>:seq' hands out numbers, '<directory>:top' holds
-- the greatest id ever indexed (keys.page, page_counters).
--
-- New ids mostly come in order. The newest page takes them until it holds PAGE_FILL,
-- then a new page starts at the next id greater than any indexed, so pages fill with no
-- sorting. An id older than that (a late submission) goes to its page, whatever it
-- holds; a page past PAGE_MAX is cut into pages of at most PAGE_FILL.
--
-- Ids are never compared with Lua's < on strings: it uses strcoll, in the locale Redis
-- runs in, which need not be byte order (under da_DK.UTF-8 'aa' sorts after 'z'), while
-- the directory's lexicographic ranges are. They are compared by id_key.
local PAGE_FILL = 100
local PAGE_MAX = 120

-- Hex pairs to their byte: by a function (2.7 µs an id), or by a table of the 256 pairs
-- (1.1 µs an id, but some 40 µs to make, once per script call that converts many ids).
local function pair_byte(pair)
  return string.char(tonumber(pair, 16))
end
local PAIR_BYTES
local MANY_IDS = 32

-- A job id's 16 bytes (record.id_bytes). `many`: the call converts many ids.
local function id_bytes(id, many)
  local with = pair_byte
  if many then
    if not PAIR_BYTES then
      PAIR_BYTES = {}
      for i = 0, 255 do
        PAIR_BYTES[string.format('%02x', i)] = string.char(i)
      end
    end
    with = PAIR_BYTES
  end
  -- Each pair with the dash after it, if any: the dashes fall between pairs.
  return (string.gsub(id, '(%x%x)%-?', with))
end

-- A job id from its 16 bytes (record.id_text).
local function id_text(raw)
  local h = string.gsub(raw, '.', function(c)
    return string.format('%02x', string.byte(c))
  end)
  return string.sub(h, 1, 8) .. '-' .. string.sub(h, 9, 12) .. '-' .. string.sub(h, 13, 16) ..
    '-' .. string.sub(h, 17, 20) .. '-' .. string.sub(h, 21)
end

-- An id's order, whatever the locale: its 32 hex digits as three numbers of 12, 12 and
-- 8 digits, each exact in a double (an id not in hex sorts first).
local function id_key(id)
  local h = string.gsub(id, '-', '')
  return {tonumber(string.sub(h, 1, 12), 16) or -1, tonumber(string.sub(h, 13, 24), 16) or -1,
    tonumber(string.sub(h, 25), 16) or -1}
end

-- The same key from an id's 16 bytes (6, 6 and 4 bytes), at 0.25 µs against 0.64.
local function raw_key(b)
  local x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11, x12, x13, x14, x15, x16 =
    string.byte(b, 1, 16)
  return {((((x1 * 256 + x2) * 256 + x3) * 256 + x4) * 256 + x5) * 256 + x6,
    ((((x7 * 256 + x8) * 256 + x9) * 256 + x10) * 256 + x11) * 256 + x12,
    ((x13 * 256 + x14) * 256 + x15) * 256 + x16}
end

-- Whether the id of key a comes before the id of key b.
local function before(a, b)
  if a[1] ~= b[1] then
    return a[1] < b[1]
  end
  if a[2] ~= b[2] then
    return a[2] < b[2]
  end
  return a[3] < b[3]
end

-- A directory member's first id, its page's number, and its page's key.
local function page_start(member)
  return string.match(member, '^(.*):')
end

local function page_number(member)
  return string.match(member, ':(%d+)$')
end

local function page_key(pages, member)
  return pages .. ':' .. page_number(member)
end

-- The key of a directory member's first id, or nil for no member.
local function start_key(member)
  return member and id_key(page_start(member))
end

-- The page whose range holds `id` (its directory member, or nil when the id is below
-- every page), and the key of the next page's first id (nil: it is the last).
local function page_of(pages, id)
  -- ';' follows ':' : a page starting at the id itself is found too.
  local member = redis.call('ZREVRANGEBYLEX', pages, '(' .. id .. ';', '-', 'LIMIT', 0, 1)[1]
  if not member then
    return nil, nil
  end
  local after = redis.call('ZRANGEBYLEX', pages, '(' .. member, '+', 'LIMIT', 0, 1)[1]
  return member, start_key(after)
end

-- A new page starting at `id`: its directory member.
local function new_page(pages, id)
  local member = id .. ':' .. redis.call('INCR', pages .. ':seq')
  redis.call('ZADD', pages, 0, member)
  return member
end

-- The page a new id (text, and its key) goes to, and the key of the next page's first id
-- (nil: it is the last). An id below every page lowers the first page's start to it.
local function page_to_add(pages, id, key)
  local last = redis.call('ZRANGE', pages, -1, -1)[1]
  if not last then
    return new_page(pages, id), nil
  end
  if not before(key, start_key(last)) then
    return last, nil
  end
  local member, after = page_of(pages, id)
  if member then
    return member, after
  end
  local first = redis.call('ZRANGE', pages, 0, 0)[1]
  redis.call('ZREM', pages, first)
  member = id .. ':' .. page_number(first)
  redis.call('ZADD', pages, 0, member)
  return member, start_key(redis.call('ZRANGE', pages, 1, 1)[1])
end

-- Cut a page past PAGE_MAX ids into pages of at most PAGE_FILL, in order: the first part
-- stays in it, each other one becomes a page starting at its first id.
local function split_page(pages, key)
  if redis.call('HLEN', key) <= PAGE_MAX then
    return
  end
  local raw = redis.call('HKEYS', key)
  local ids = {}
  for i, b in ipairs(raw) do
    local id = id_text(b)
    ids[i] = {raw_key(b), id, b}
  end
  table.sort(ids, function(x, y) return before(x[1], y[1]) end)
  local parts = math.ceil(#ids / PAGE_FILL)
  local size = math.ceil(#ids / parts)
  -- Every part written anew, the first too: a hash that outgrew the compact encoding
  -- keeps its table when it shrinks.
  redis.call('DEL', key)
  for first = 1, #ids, size do
    local fields = {}
    for i = first, math.min(first + size - 1, #ids) do
      fields[#fields + 1] = ids[i][3]
      fields[#fields + 1] = ''
    end
    local part = first == 1 and key or page_key(pages, new_page(pages, ids[first][2]))
    redis.call('HSET', part, unpack(fields))
  end
end

-- Index new ids (text, in `ids`; their bytes in `raw`, by position) in the paged index
-- `pages`: each run of ids that falls in one page in one HSET.
local function index_add(pages, ids, raw)
  local was = redis.call('GET', pages .. ':top')
  local top = was and id_key(was)
  local newest = was
  local i = 1
  local key = raw[1] and raw_key(raw[1])
  while i <= #ids do
    local member, after = page_to_add(pages, ids[i], key)
    local page = page_key(pages, member)
    local start = start_key(member)
    -- The newest page's fill counts for the roll-over to a new page.
    local held = after == nil and redis.call('HLEN', page) or 0
    local fields = {}
    while i <= #ids and not before(key, start) and (after == nil or before(key, after)) do
      local above = not top or before(top, key)
      if after == nil and held >= PAGE_FILL and above then
        break
      end
      fields[#fields + 1] = raw[i]
      fields[#fields + 1] = ''
      held = held + 1
      if above then
        top, newest = key, ids[i]
      end
      i = i + 1
      key = raw[i] and raw_key(raw[i])
    end
    if #fields > 0 then
      call_chunked('HSET', page, fields)
      split_page(pages, page)
    elseif after == nil and i <= #ids then
      -- The newest page is full and the id is above every indexed: a page of its own.
      new_page(pages, ids[i])
    else
      error('paged index: id ' .. ids[i] .. ' fits no page')
    end
  end
  if newest ~= was then
    redis.call('SET', pages .. ':top', newest)
  end
end

-- Take ids (text) out of the paged index `pages`, each run of ids of one page in one HDEL;
-- a page left empty leaves the directory.
local function index_remove(pages, ids)
  local many = #ids >= MANY_IDS
  local member, start, after, fields
  local function flush()
    if member and #fields > 0 then
      local page = page_key(pages, member)
      call_chunked('HDEL', page, fields)
      if redis.call('EXISTS', page) == 0 then
        redis.call('ZREM', pages, member)
      end
    end
  end
  for _, id in ipairs(ids) do
    local b = id_bytes(id, many)
    local key = raw_key(b)
    if not member or before(key, start) or (after and not before(key, after)) then
      flush()
      fields = {}
      member, after = page_of(pages, id)
      start = start_key(member)
    end
    if member then
      fields[#fields + 1] = b
    end
  end
  flush()
end

-- Take ids (text) out of a queue's index: the sorted set (`index`, keys.index) and the
-- pages (`pages`, keys.pages), wherever the layout that stored them put them.
local function unindex(index, pages, ids)
  if #ids > 0 then
    -- Once no daemon writes the sorted set and its jobs are gone, it is gone too.
    if redis.call('EXISTS', index) == 1 then
      call_chunked('ZREM', index, ids)
    end
    index_remove(pages, ids)
  end
end
