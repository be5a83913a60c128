-- Move a hold to another engine (AdmissionQueue.move; core.py: move).
-- ARGV: channels, id, engine. Returns 1 when moved.
local raw = redis.call('HGET', K_HOLDS, ARGV[2])
if not raw then
  return 0
end
local h = cjson.decode(raw)
if h.e == ARGV[3] then
  return 0
end
unhold(h.e, h.f)
redis.call('HINCRBY', K_SEQS, ARGV[3], 1)
redis.call('HINCRBY', K_HELD, ARGV[3], h.f)
h.e = ARGV[3]
redis.call('HSET', K_HOLDS, ARGV[2], cjson.encode(h))
redis.call('PUBLISH', CH_CAPACITY, 'move')
return 1
