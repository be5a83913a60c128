-- Admission-queue prelude, prepended to every queue script. It repeats
-- proxy/admission/core.py function for function (same names, same order of effects), so
-- both queues decide identically; tests/proxy/admission/test_differential.py checks it.
-- Every script gets one KEY, the queue's seq key: every other key shares its hash tag and slot,
-- so they are derived from it (a script call then packs one key, not 21). ARGV[1] = the
-- channel prefix; a script's own ARGV start at 2. Layout: proxy/admission/redis.py documents it.
local K_SEQ = KEYS[1]
local BASE = string.sub(K_SEQ, 1, -4)
local K_ITEMS, K_DEADLINES, K_DEPTH = BASE .. 'items', BASE .. 'deadlines', BASE .. 'depth'
local K_ENGINES, K_FRESH, K_HELD, K_SEQS = BASE .. 'engines', BASE .. 'fresh', BASE .. 'held',
  BASE .. 'seqs'
local K_HOLDS, K_LEASES, K_INFLIGHT, K_EXPIRED = BASE .. 'holds', BASE .. 'leases',
  BASE .. 'inflight', BASE .. 'expired'
local K_FHEAD, K_LIMITS, K_GRANTED = BASE .. 'fhead', BASE .. 'limits', BASE .. 'granted'
local K_VC, K_BACKLOG, K_QCHARGE, K_CONF = BASE .. 'vc', BASE .. 'backlog', BASE .. 'qcharge',
  BASE .. 'conf'
local K_ALIVE, K_LATE = BASE .. 'alive', BASE .. 'late'
local K_SINCE, K_BEAT_TTL = BASE .. 'since', BASE .. 'beat_ttl'
local CH_CAPACITY = ARGV[1] .. 'capacity'
local CH_REPLICA = ARGV[1] .. 'replica:'

-- added to a demoted item's score (base.py: DEMOTED)
local DEMOTED = 2 ^ 50

local function fmt(x)
  return string.format('%.17g', x)
end

-- A flow's name: the model length-prefixed, so any model and tenant strings are unambiguous.
local function flow_name(tenant, model)
  return #model .. ':' .. model .. ':' .. tenant
end
local function flow_key(tenant, model)
  return BASE .. 'flow:' .. flow_name(tenant, model)
end
local function ready_key(model)
  return BASE .. 'ready:' .. model
end
local function tmodels_key(tenant)
  return BASE .. 'tmodels:' .. tenant
end

-- The member of an item in its flow, and of a flow head in its model's ready zset: the
-- sequence number first, so equal scores keep enqueue order.
local function member(seq, id)
  return string.format('%016d', seq) .. ':' .. id
end

-- HINCRBY that deletes the field when it reaches 0 or below; returns the new value.
local function count(key, field, delta)
  local n = redis.call('HINCRBY', key, field, delta)
  if n <= 0 then
    redis.call('HDEL', key, field)
    return 0
  end
  return n
end

-- The queue's order (core.py: AdmissionCore.order), read once per script.
local COUNTER_ORDER = nil
local function counter_order()
  if COUNTER_ORDER == nil then
    COUNTER_ORDER = redis.call('HGET', K_CONF, 'order') == 'counter'
  end
  return COUNTER_ORDER
end

local function vc_of(tenant)
  return tonumber(redis.call('HGET', K_VC, tenant) or '0')
end

local function limited(tenant)
  local limit = redis.call('HGET', K_LIMITS, tenant)
  if not limit then
    return false
  end
  return tonumber(redis.call('HGET', K_INFLIGHT, tenant) or '0') >= tonumber(limit)
end

-- List the flow's head in its model's ready zset iff it has one and its tenant is under
-- its limit; forget the flow once empty (core.py: _flow_sync).
local function flow_sync(tenant, model)
  local fkey = flow_key(tenant, model)
  local name = flow_name(tenant, model)
  local head = redis.call('ZRANGE', fkey, 0, 0, 'WITHSCORES')
  local want, rank = nil, nil
  if head[1] and not limited(tenant) then
    want = string.sub(head[1], 1, 16) .. ':' .. tenant
    rank = head[2]
    if counter_order() then -- core.py: _rank
      rank = fmt(vc_of(tenant) + tonumber(head[2]))
    end
  end
  local cur = redis.call('HGET', K_FHEAD, name) or nil -- a missing field is false
  if cur ~= want then
    if cur then
      redis.call('ZREM', ready_key(model), cur)
    end
    if want then
      redis.call('ZADD', ready_key(model), rank, want)
      redis.call('HSET', K_FHEAD, name, want)
    else
      redis.call('HDEL', K_FHEAD, name)
    end
  elseif want and counter_order() then
    redis.call('ZADD', ready_key(model), rank, want) -- same head, the counter moved
  end
  if not head[1] then
    redis.call('SREM', tmodels_key(tenant), model)
  end
end

local function tenant_sync(tenant)
  local models = redis.call('SMEMBERS', tmodels_key(tenant))
  table.sort(models)
  for _, model in ipairs(models) do
    flow_sync(tenant, model)
  end
end

-- The lowest counter of the backlogged tenants, else the last drained one's (core.py: _floor).
local function floor()
  local top = redis.call('ZRANGE', K_BACKLOG, 0, 0, 'WITHSCORES')
  if top[1] then
    return tonumber(top[2])
  end
  return tonumber(redis.call('HGET', K_CONF, 'drained') or '0')
end

-- Add `delta` to the tenant's counter; a backlogged tenant's flows re-rank (core.py: _count).
local function add_counter(tenant, delta)
  if delta == 0 then
    return
  end
  local vc = fmt(vc_of(tenant) + delta)
  redis.call('HSET', K_VC, tenant, vc)
  if redis.call('HEXISTS', K_DEPTH, tenant) == 1 then
    redis.call('ZADD', K_BACKLOG, vc, tenant)
    if counter_order() then
      tenant_sync(tenant)
    end
  end
end

-- ids queued or held for a replica (core.py: _owned)
local function owned_key(replica)
  return BASE .. 'owned:' .. replica
end

-- Remove a queued item (its record decoded as `rec`) from every queue structure.
local function dequeue(id, rec)
  redis.call('SREM', owned_key(rec.r), id)
  if rec.l then
    redis.call('ZREM', K_LATE, id)
  end
  redis.call('ZREM', flow_key(rec.t, rec.m), member(rec.q, id))
  redis.call('HDEL', K_ITEMS, id)
  redis.call('ZREM', K_DEADLINES, id)
  if count(K_DEPTH, rec.t, -1) > 0 then
    local g = tonumber(rec.g or '0')
    if g ~= 0 then
      redis.call('HSET', K_QCHARGE, rec.t, fmt(tonumber(redis.call('HGET', K_QCHARGE, rec.t)) - g))
    end
  else -- drained: its counter is the floor while nobody is backlogged
    redis.call('HDEL', K_QCHARGE, rec.t)
    redis.call('ZREM', K_BACKLOG, rec.t)
    redis.call('HSET', K_CONF, 'drained', fmt(vc_of(rec.t)))
  end
  flow_sync(rec.t, rec.m)
end

-- Take one sequence and `f` tokens off engine `e`, forgotten at zero (core.py: _unhold).
local function unhold(e, f)
  if count(K_SEQS, e, -1) > 0 then
    if f ~= 0 then
      redis.call('HINCRBY', K_HELD, e, -f)
    end
  else
    redis.call('HDEL', K_HELD, e)
  end
end

-- Free a hold: its engine's tokens and seq, its tenant's in-flight slot. True when held.
local function drop_hold(id, correction)
  local raw = redis.call('HGET', K_HOLDS, id)
  redis.call('ZREM', K_LEASES, id)
  if not raw then
    return false
  end
  local h = cjson.decode(raw)
  redis.call('HDEL', K_HOLDS, id)
  redis.call('SREM', owned_key(h.r), id)
  add_counter(h.t, correction)
  unhold(h.e, h.f)
  local n = count(K_INFLIGHT, h.t, -1)
  local limit = redis.call('HGET', K_LIMITS, h.t)
  if limit and n == tonumber(limit) - 1 then
    tenant_sync(h.t) -- just fell under its limit: un-park
  end
  return true
end

-- Reclaim every hold whose lease lapsed at `now` (expiry <= now).
local function reclaim(now_arg)
  local lapsed = redis.call('ZRANGEBYSCORE', K_LEASES, '-inf', now_arg)
  for _, id in ipairs(lapsed) do
    drop_hold(id, 0)
  end
end

-- `me` is alive at now and has beaten without a break for its ttl (core.py: _may_reap)
local function may_reap(now_arg, me)
  local alive = redis.call('ZSCORE', K_ALIVE, me)
  if not alive or tonumber(alive) < tonumber(now_arg) then
    return false
  end
  local since = tonumber(redis.call('HGET', K_SINCE, me))
  return tonumber(now_arg) - since >= tonumber(redis.call('HGET', K_BEAT_TTL, me))
end

-- Forget every replica but `me` whose heartbeat lapsed before now: drop its queued items
-- (as expired: nobody waits for them), free its holds (core.py: _reap). Only once `me` has
-- beaten without a break for its ttl: after a store outage every beat lapsed at once.
local function reap(now_arg, me)
  if not may_reap(now_arg, me) then
    return
  end
  for _, r in ipairs(redis.call('ZRANGEBYSCORE', K_ALIVE, '-inf', '(' .. now_arg)) do
    if r ~= me then
      redis.call('ZREM', K_ALIVE, r)
      redis.call('HDEL', K_SINCE, r)
      redis.call('HDEL', K_BEAT_TTL, r)
      local key = owned_key(r)
      local ids = redis.call('SMEMBERS', key)
      table.sort(ids)
      for _, id in ipairs(ids) do
        local raw = redis.call('HGET', K_ITEMS, id)
        if raw then
          dequeue(id, cjson.decode(raw))
          redis.call('ZADD', K_EXPIRED, now_arg, id)
        else
          drop_hold(id, 0)
        end
      end
      redis.call('DEL', key)
    end
  end
end
