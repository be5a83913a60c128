-- The dispatch step (core.py: dispatch, step for step), shared by dispatch.lua and by the
-- scripts that dispatch right after their own change (enqueue.lua, release.lua), so that a
-- request's enqueue and grant, or a release and the grants it makes room for, are one round
-- trip. Returns {{id, tenant, replica, engine, footprint}..., {expired id of the caller}...}
-- and whether max_grants was reached (then more may fit: the caller wakes the replicas).
-- Outcomes for the caller are returned, not published; other replicas get a message.
local function dispatch_now(now_arg, ttl_arg, max_grants, me, memory_arg)
  local now = tonumber(now_arg)
  local expiry = fmt(now + tonumber(ttl_arg))
  local grants, mine_expired = {}, {}

  reclaim(now_arg)
  reap(now_arg, me)

  -- drop a queued item as expired; its replica is told (the caller's, in the reply)
  local function drop_expired(id, rec)
    dequeue(id, rec)
    redis.call('ZADD', K_EXPIRED, now_arg, id)
    if rec.r == me then
      mine_expired[#mine_expired + 1] = id
    else
      redis.call('PUBLISH', CH_REPLICA .. rec.r, cjson.encode({k = 'x', id = id}))
    end
  end

  -- drop every item past its deadline, wherever it stands
  for _, id in ipairs(redis.call('ZRANGEBYSCORE', K_DEADLINES, '-inf', '(' .. now_arg)) do
    local raw = redis.call('HGET', K_ITEMS, id)
    if raw then
      drop_expired(id, cjson.decode(raw))
    else
      redis.call('ZREM', K_DEADLINES, id)
    end
  end
  -- items past their late_at: demoted behind every item on time, or shed (core.py: _overdue)
  local shed = redis.call('HGET', K_CONF, 'late') == 'shed'
  for _, id in ipairs(redis.call('ZRANGEBYSCORE', K_LATE, '-inf', '(' .. now_arg)) do
    local raw = redis.call('HGET', K_ITEMS, id)
    local rec = cjson.decode(raw)
    if shed and not limited(rec.t) then -- a tenant at its own limit: demoted instead
      drop_expired(id, rec)
    else
      redis.call('ZREM', K_LATE, id)
      local fkey = flow_key(rec.t, rec.m)
      local old = member(rec.q, id)
      local score = tonumber(redis.call('ZSCORE', fkey, old)) + DEMOTED
      redis.call('ZREM', fkey, old)
      rec.q = redis.call('INCR', K_SEQ)
      rec.l = nil
      redis.call('ZADD', fkey, fmt(score), member(rec.q, id))
      redis.call('HSET', K_ITEMS, id, cjson.encode(rec))
      flow_sync(rec.t, rec.m)
    end
  end
  redis.call('ZREMRANGEBYSCORE', K_EXPIRED, '-inf', fmt(now - tonumber(memory_arg)))

  -- no flow head is listed ready: nothing to grant, so no engine to read (core.py: dispatch)
  if redis.call('HLEN', K_FHEAD) == 0 then
    return {grants, mine_expired}, #grants >= max_grants
  end

  -- the usable engines (routable and fresh), by name, and the ones serving each model
  local names = redis.call('HKEYS', K_ENGINES)
  table.sort(names)
  local by_model, models = {}, {}
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
      for _, model in ipairs(cap.models) do
        local list = by_model[model]
        if list == nil then
          list = {}
          by_model[model] = list
          models[#models + 1] = model
        end
        list[#list + 1] = e
      end
    end
  end

  -- what `footprint` holds on engine e: never more than its whole budget
  local function charge(e, footprint)
    if e.budget ~= nil and footprint > e.budget then
      return e.budget
    end
    return footprint
  end

  local function fits(e, footprint, exempt)
    if e.max_seqs and e.seqs >= e.max_seqs then
      return false
    end
    if not exempt and e.soft_seqs and e.seqs >= e.soft_seqs then
      return false
    end
    return e.budget == nil or e.held + charge(e, footprint) <= e.budget
  end

  local function free(e)
    if e.budget == nil then
      return math.huge
    end
    return e.budget - e.held
  end

  local function grant(id, rec, e)
    local f = charge(e, rec.f)
    redis.call('HSET', K_HOLDS, id, cjson.encode({e = e.name, t = rec.t, r = rec.r, f = f, g = f}))
    redis.call('ZADD', K_LEASES, expiry, id)
    if f ~= 0 then
      redis.call('HINCRBY', K_HELD, e.name, f)
    end
    redis.call('HINCRBY', K_SEQS, e.name, 1)
    redis.call('HINCRBY', K_INFLIGHT, rec.t, 1)
    redis.call('HINCRBY', K_GRANTED, rec.t, 1)
    redis.call('HINCRBY', K_GRANTED, '', 1)
    e.held = e.held + f
    e.seqs = e.seqs + 1
    local g = tonumber(rec.g or '0')
    if g ~= 0 then
      redis.call('HSET', K_VC, rec.t, fmt(vc_of(rec.t) + g))
    end
    dequeue(id, rec) -- also re-lists the flow's next head
    redis.call('SADD', owned_key(rec.r), id) -- now as a hold
    if g ~= 0 and redis.call('HEXISTS', K_DEPTH, rec.t) == 1 then
      redis.call('ZADD', K_BACKLOG, fmt(vc_of(rec.t)), rec.t)
      if counter_order() then
        tenant_sync(rec.t)
      end
    end
    if limited(rec.t) then
      tenant_sync(rec.t)
    end
    if rec.r ~= me then
      local msg = {k = 'g', id = id, t = rec.t, e = e.name, f = f}
      redis.call('PUBLISH', CH_REPLICA .. rec.r, cjson.encode(msg))
    end
    grants[#grants + 1] = {id, rec.t, rec.r, e.name, tostring(f)}
  end

  -- each model's first ready flow head: {score, seq, member}, false when none
  local function ready_top(model)
    local top = redis.call('ZRANGE', ready_key(model), 0, 0, 'WITHSCORES')
    if not top[1] then
      return false
    end
    return {tonumber(top[2]), tonumber(string.sub(top[1], 1, 16)), top[1]}
  end

  local blocked, dead = {}, {}
  while #grants < max_grants do
    local best, best_model = nil, nil
    for _, model in ipairs(models) do
      if not dead[model] then
        local open = false
        for _, e in ipairs(by_model[model]) do
          if not blocked[e.name] then
            open = true
            break
          end
        end
        local top = open and ready_top(model)
        if not top then
          dead[model] = true
        elseif best == nil or top[1] < best[1] or (top[1] == best[1] and top[2] < best[2]) then
          best, best_model = top, model
        end
      end
    end
    if best == nil then
      break
    end
    local tenant = string.sub(best[3], 18)
    local head = redis.call('ZRANGE', flow_key(tenant, best_model), 0, 0)
    local id = string.sub(head[1], 18)
    local rec = cjson.decode(redis.call('HGET', K_ITEMS, id))
    local engine = nil
    for _, e in ipairs(by_model[best_model]) do
      if not blocked[e.name] and fits(e, rec.f, rec.x) and (engine == nil
          or free(e) > free(engine) or (free(e) == free(engine) and e.seqs < engine.seqs)) then
        engine = e
      end
    end
    if engine then
      grant(id, rec, engine)
    else
      for _, e in ipairs(by_model[best_model]) do
        blocked[e.name] = true
      end
    end
  end
  return {grants, mine_expired}, #grants >= max_grants
end
