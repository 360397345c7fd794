-- Read a run of a queue's paged index (index.lua) at one moment, for GET /jobs
-- (Inspector): the directory's members from a mark down, and each one's page. It writes
-- nothing. Read in two round trips, a page split in between could move ids to a page the
-- first read did not list, and a listing would pass them for good; here nothing changes
-- in between.
-- KEYS[1] -> <prefix>:{<queue>}:pages, the paged index's directory
-- ARGV[1] -> where to start, as ZREVRANGEBYLEX takes it: '+' for the newest page, else
--   '(' and a member (the pages below it) or '(<id>;' (from the page of that id down)
-- ARGV[2] -> most pages
-- No header (lib.lua): it uses none of now, job prefix and limit prefix.
-- Returns {members, then the ids (as bytes) of each member's page, in the same order}.
local members = redis.call('ZREVRANGEBYLEX', KEYS[1], ARGV[1], '-', 'LIMIT', 0, tonumber(ARGV[2]))
local out = {members}
for i, member in ipairs(members) do
  out[i + 1] = redis.call('HKEYS', page_key(KEYS[1], member))
end
return out
