-- Helpers prepended to every script. Bucket arithmetic repeats proxy/store/buckets.py
-- operation for operation, so both stores answer identically.
-- A bucket is a hash {tokens, last}; a missing bucket is full.

local function fmt(x)
  return string.format('%.17g', x)
end

-- Let `key` live at least `seconds` more (never shortens a longer TTL).
local function keep(key, seconds)
  if redis.call('TTL', key) < seconds then
    redis.call('EXPIRE', key, seconds)
  end
end

local function refill(key, cap, now)
  local raw = redis.call('HMGET', key, 'tokens', 'last')
  local tokens, last = tonumber(raw[1]), tonumber(raw[2])
  if tokens == nil or last == nil then
    return cap, now
  end
  if now > last then
    tokens = tokens + (now - last) * cap / 60
    last = now
  end
  if tokens > cap then
    tokens = cap
  end
  return tokens, last
end

-- Kept until a minute after the bucket would be full again (by then "missing" = full).
local function save(key, cap, tokens, last)
  redis.call('HSET', key, 'tokens', fmt(tokens), 'last', fmt(last))
  keep(key, math.ceil((cap - tokens) * 60 / cap) + 60)
end
