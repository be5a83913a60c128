-- Charge a hold's engine delta more tokens, never below 0 (AdmissionQueue.grow).
-- ARGV: channels, id, delta. Returns the new footprint, or -1 when not held.
local raw = redis.call('HGET', K_HOLDS, ARGV[2])
if not raw then
  return -1
end
local h = cjson.decode(raw)
local f = h.f + tonumber(ARGV[3])
if f < 0 then
  f = 0
end
if f ~= h.f then
  redis.call('HINCRBY', K_HELD, h.e, f - h.f)
  local shrunk = f < h.f
  h.f = f
  redis.call('HSET', K_HOLDS, ARGV[2], cjson.encode(h))
  if shrunk then
    redis.call('PUBLISH', CH_CAPACITY, 'grow')
  end
end
return f
