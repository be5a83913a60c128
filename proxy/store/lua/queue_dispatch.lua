-- Admit what fits now, in (score, seq) order (AdmissionQueue.dispatch; queue_memory.py
-- repeats this step for step).
-- ARGV: channels, now, lease_ttl_s, max_grants, the calling replica, expired memory (s)
-- Returns {{id, tenant, replica, engine, footprint}..., {expired id of the caller}...}:
-- outcomes for the caller are returned, not published; other replicas get a message.
local now = tonumber(ARGV[2])
local expiry = fmt(now + tonumber(ARGV[3]))
local max_grants = tonumber(ARGV[4])
local me = ARGV[5]
local grants, mine_expired = {}, {}

reclaim(ARGV[2])

-- drop every item past its deadline, wherever it stands
for _, id in ipairs(redis.call('ZRANGEBYSCORE', K_DEADLINES, '-inf', '(' .. ARGV[2])) do
  local raw = redis.call('HGET', K_ITEMS, id)
  if raw then
    local rec = cjson.decode(raw)
    dequeue(id, rec)
    redis.call('ZADD', K_EXPIRED, ARGV[2], id)
    if rec.r == me then
      mine_expired[#mine_expired + 1] = id
    else
      redis.call('PUBLISH', CH_REPLICA .. rec.r, cjson.encode({k = 'x', id = id}))
    end
  else
    redis.call('ZREM', K_DEADLINES, id)
  end
end
redis.call('ZREMRANGEBYSCORE', K_EXPIRED, '-inf', fmt(now - tonumber(ARGV[6])))

-- the usable engines (routable and fresh), by name, and the ones serving each model
local names = redis.call('HKEYS', K_ENGINES)
table.sort(names)
local usable, by_model = 0, {}
for _, name in ipairs(names) do
  local cap = cjson.decode(redis.call('HGET', K_ENGINES, name))
  local fresh = tonumber(redis.call('HGET', K_FRESH, name)) or 0
  if cap.routable and now < fresh then
    local e = {
      name = name,
      budget = cap.budget_tokens ~= cjson.null and cap.budget_tokens or nil,
      max_seqs = cap.max_seqs ~= cjson.null and cap.max_seqs or nil,
      soft_seqs = cap.soft_seqs,
      held = tonumber(redis.call('HGET', K_HELD, name) or '0'),
      seqs = tonumber(redis.call('HGET', K_SEQS, name) or '0'),
    }
    usable = usable + 1
    for _, model in ipairs(cap.models) do
      local list = by_model[model]
      if list == nil then
        list = {}
        by_model[model] = list
      end
      list[#list + 1] = e
    end
  end
end

local function fits(e, footprint, exempt)
  if e.max_seqs and e.seqs >= e.max_seqs then
    return false
  end
  if not exempt and e.soft_seqs and e.seqs >= e.soft_seqs then
    return false
  end
  return e.budget == nil or e.held + footprint <= e.budget or e.seqs == 0
end

local function free(e)
  if e.budget == nil then
    return math.huge
  end
  return e.budget - e.held
end

local function grant(id, rec, e)
  dequeue(id, rec)
  redis.call('HSET', K_HOLDS, id, cjson.encode({e = e.name, t = rec.t, r = rec.r, f = rec.f, g = rec.f}))
  redis.call('ZADD', K_LEASES, expiry, id)
  if rec.f ~= 0 then
    redis.call('HINCRBY', K_HELD, e.name, rec.f)
  end
  redis.call('HINCRBY', K_SEQS, e.name, 1)
  redis.call('HINCRBY', K_INFLIGHT, rec.t, 1)
  e.held = e.held + rec.f
  e.seqs = e.seqs + 1
  if rec.r ~= me then
    local msg = {k = 'g', id = id, t = rec.t, e = e.name, f = rec.f}
    redis.call('PUBLISH', CH_REPLICA .. rec.r, cjson.encode(msg))
  end
  grants[#grants + 1] = {id, rec.t, rec.r, e.name, tostring(rec.f)}
end

local blocked, n_blocked = {}, 0
local inflight = {}
-- read the queue in growing chunks: most dispatches stop within the first few items
local start, chunk = 0, 8
local done = usable == 0 or max_grants <= 0
while not done do
  local members = redis.call('ZRANGE', K_QUEUE, start, start + chunk - 1)
  if #members == 0 then
    break
  end
  local ids = {}
  for i, m in ipairs(members) do
    ids[i] = string.sub(m, 18)
  end
  local raws = redis.call('HMGET', K_ITEMS, unpack(ids))
  local removed = 0
  for i, id in ipairs(ids) do
    local raw = raws[i]
    if raw then
      local rec = cjson.decode(raw)
      local n = inflight[rec.t]
      if n == nil then
        n = tonumber(redis.call('HGET', K_INFLIGHT, rec.t) or '0')
        inflight[rec.t] = n
      end
      local cands = by_model[rec.m]
      if cands and (rec.c == nil or n < rec.c) then
        local best, open = nil, false
        for _, e in ipairs(cands) do
          if not blocked[e.name] then
            open = true
            if fits(e, rec.f, rec.x) and (best == nil or free(e) > free(best)
                or (free(e) == free(best) and e.seqs < best.seqs)) then
              best = e
            end
          end
        end
        if best then
          grant(id, rec, best)
          inflight[rec.t] = n + 1
          removed = removed + 1
          if #grants >= max_grants then
            done = true
          end
        elseif open then
          for _, e in ipairs(cands) do
            if not blocked[e.name] then
              blocked[e.name] = true
              n_blocked = n_blocked + 1
            end
          end
          if n_blocked >= usable then
            done = true
          end
        end
      end
    end
    if done then
      break
    end
  end
  start = start + #members - removed
  chunk = math.min(chunk * 2, 256)
end
return {grants, mine_expired}
