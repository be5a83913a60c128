-- Upsert engines' capacity view (AdmissionQueue.set_engines).
-- ARGV: channels, now, fresh_until, then (name, capacity JSON) pairs.
local now = tonumber(ARGV[2])
local listed = {}
local changed = false
for i = 4, #ARGV, 2 do
  local name, cap = ARGV[i], ARGV[i + 1]
  listed[name] = true
  local fresh = tonumber(redis.call('HGET', K_FRESH, name))
  if fresh == nil or fresh <= now or redis.call('HGET', K_ENGINES, name) ~= cap then
    changed = true
  end
  redis.call('HSET', K_ENGINES, name, cap)
  redis.call('HSET', K_FRESH, name, ARGV[3])
end
-- forget engines that are stale, unlisted and hold nothing
for _, name in ipairs(redis.call('HKEYS', K_ENGINES)) do
  if not listed[name] and (tonumber(redis.call('HGET', K_FRESH, name)) or 0) <= now
      and redis.call('HEXISTS', K_SEQS, name) == 0 then
    redis.call('HDEL', K_ENGINES, name)
    redis.call('HDEL', K_FRESH, name)
  end
end
if changed then
  redis.call('PUBLISH', CH_CAPACITY, 'engines')
end
return changed and 1 or 0
