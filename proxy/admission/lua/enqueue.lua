-- Queue an item in its flow (AdmissionQueue.enqueue; core.py: enqueue), and with dispatch
-- arguments dispatch at once (dispatching.lua), in the same atomic step.
-- ARGV: channels, id, score, deadline, record JSON {t, r, m, f, x?, g?, l?}, max queued per
-- tenant ('' = none), max queued ('' = none); optionally now, lease_ttl_s, max_grants, the
-- calling replica, expired memory (s). `g`: the charge, `l`: late_at, as strings (exact).
-- With a store step (the request's shaping; dispatch arguments then required): its keys are
-- KEYS[2..], its script ARGV[13] and its arguments ARGV[14..]; it runs first, and when it
-- refuses (its reply's first field is not 1) nothing is queued (code -3).
-- Returns {code, grants, expired, store reply}: code 1 queued, 0 duplicate, -1 tenant full,
-- -2 full, -3 refused; grants and expired as dispatch.lua returns them (empty without
-- dispatch arguments); the store step's reply ({} without one).
local id = ARGV[2]
local stored = {}
if #KEYS > 1 then
  stored = store_step(ARGV[13], {unpack(KEYS, 2)}, {unpack(ARGV, 14)})
  if stored[1] ~= 1 then
    return {-3, {}, {}, stored}
  end
end
local function result(code)
  if code ~= 1 or ARGV[8] == nil then
    if code == 1 then
      redis.call('PUBLISH', CH_CAPACITY, 'enqueue')
    end
    return {code, {}, {}, stored}
  end
  local out, more = dispatch_now(ARGV[8], ARGV[9], tonumber(ARGV[10]), ARGV[11], ARGV[12])
  if more then
    redis.call('PUBLISH', CH_CAPACITY, 'enqueue')
  end
  return {code, out[1], out[2], stored}
end
if redis.call('HEXISTS', K_ITEMS, id) == 1 or redis.call('HEXISTS', K_HOLDS, id) == 1 then
  return result(0)
end
local rec = cjson.decode(ARGV[5])
local cap_t, cap = tonumber(ARGV[6]), tonumber(ARGV[7])
if cap_t and tonumber(redis.call('HGET', K_DEPTH, rec.t) or '0') >= cap_t then
  return result(-1)
end
if cap and redis.call('HLEN', K_ITEMS) >= cap then
  return result(-2)
end
rec.q = redis.call('INCR', K_SEQ)
if redis.call('HEXISTS', K_DEPTH, rec.t) == 0 then -- becomes backlogged: lifted to the floor
  local fl = floor()
  if vc_of(rec.t) < fl then
    redis.call('HSET', K_VC, rec.t, fmt(fl))
  end
  redis.call('ZADD', K_BACKLOG, fmt(vc_of(rec.t)), rec.t)
end
local g = tonumber(rec.g or '0')
if g ~= 0 then
  local qc = tonumber(redis.call('HGET', K_QCHARGE, rec.t) or '0')
  redis.call('HSET', K_QCHARGE, rec.t, fmt(qc + g))
end
redis.call('HSET', K_ITEMS, id, cjson.encode(rec))
redis.call('SADD', owned_key(rec.r), id)
redis.call('SADD', tmodels_key(rec.t), rec.m)
redis.call('ZADD', flow_key(rec.t, rec.m), ARGV[3], member(rec.q, id))
redis.call('ZADD', K_DEADLINES, ARGV[4], id)
if rec.l then
  redis.call('ZADD', K_LATE, rec.l, id)
end
redis.call('HINCRBY', K_DEPTH, rec.t, 1)
flow_sync(rec.t, rec.m)
return result(1)
