-- Helpers prepended to every script. Bucket arithmetic repeats proxy/store/buckets.py
-- operation for operation, so both stores answer identically.
-- A bucket is a hash {tokens, last}; a missing bucket is full.
-- Bounds (buckets.py): numbers are doubles, exact for integers up to 2^53, so a charge is
-- at most MAX_CHARGE (more is refused as too_large), a correction at most +-MAX_DELTA and a
-- token counter stays in 0..MAX_COUNTER, whatever the caller passes.

local MAX_CHARGE = 2 ^ 40
local MAX_DELTA = 2 * MAX_CHARGE
local MAX_COUNTER = 2 ^ 53 - 1

-- A number argument; nil when missing (""), and nil for NaN too.
local function arg_num(s)
  local x = tonumber(s)
  if x ~= x then
    return nil
  end
  return x
end

local function clamp(x, lo, hi)
  if x < lo then
    return lo
  end
  if x > hi then
    return hi
  end
  return x
end

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
