-- Reclaim lapsed leases, then every known engine's load (AdmissionQueue.loads).
-- ARGV: channels, now. Returns {name, held, seqs, capacity JSON or "", fresh_until or ""}...
reclaim(ARGV[2])
local names = {}
for _, name in ipairs(redis.call('HKEYS', K_ENGINES)) do
  names[name] = true
end
for _, name in ipairs(redis.call('HKEYS', K_SEQS)) do
  names[name] = true
end
local out = {}
for name in pairs(names) do
  out[#out + 1] = {
    name,
    redis.call('HGET', K_HELD, name) or '0',
    redis.call('HGET', K_SEQS, name) or '0',
    redis.call('HGET', K_ENGINES, name) or '',
    redis.call('HGET', K_FRESH, name) or '',
  }
end
return out
