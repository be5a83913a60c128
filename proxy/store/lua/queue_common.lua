-- Admission-queue prelude, after common.lua (fmt, keep). Every queue script gets the same
-- KEYS, all under one hash tag, and ARGV[1] = the channel prefix; its own ARGV start at 2.
-- Layout (proxy/store/queue_redis.py documents it):
local K_SEQ, K_QUEUE, K_ITEMS, K_DEADLINES = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local K_DEPTH, K_ENGINES, K_FRESH, K_HELD = KEYS[5], KEYS[6], KEYS[7], KEYS[8]
local K_SEQS, K_HOLDS, K_LEASES, K_INFLIGHT = KEYS[9], KEYS[10], KEYS[11], KEYS[12]
local K_EXPIRED = KEYS[13]
local CH_CAPACITY = ARGV[1] .. 'capacity'
local CH_REPLICA = ARGV[1] .. 'replica:'

-- The queue member of an item: its sequence number first, so equal scores keep enqueue order.
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

-- Remove a queued item (its record decoded as `rec`) from every queue structure.
local function dequeue(id, rec)
  redis.call('ZREM', K_QUEUE, member(rec.q, id))
  redis.call('HDEL', K_ITEMS, id)
  redis.call('ZREM', K_DEADLINES, id)
  count(K_DEPTH, rec.t, -1)
end

-- Free a hold: its engine's tokens and seq, its tenant's in-flight slot. True when held.
local function drop_hold(id)
  local raw = redis.call('HGET', K_HOLDS, id)
  redis.call('ZREM', K_LEASES, id)
  if not raw then
    return false
  end
  local h = cjson.decode(raw)
  if count(K_SEQS, h.e, -1) > 0 then
    if h.f ~= 0 then
      redis.call('HINCRBY', K_HELD, h.e, -h.f)
    end
  else
    redis.call('HDEL', K_HELD, h.e)
  end
  count(K_INFLIGHT, h.t, -1)
  redis.call('HDEL', K_HOLDS, id)
  return true
end

-- Reclaim every hold whose lease lapsed at `now` (expiry <= now).
local function reclaim(now_arg)
  local lapsed = redis.call('ZRANGEBYSCORE', K_LEASES, '-inf', now_arg)
  for _, id in ipairs(lapsed) do
    drop_hold(id)
  end
end
