-- Queue an item (AdmissionQueue.enqueue). Returns 1 when queued, 0 when already queued/held.
-- ARGV: channels, id, score, deadline, record JSON {t, r, m, f, c?}
local id = ARGV[2]
if redis.call('HEXISTS', K_ITEMS, id) == 1 or redis.call('HEXISTS', K_HOLDS, id) == 1 then
  return 0
end
local rec = cjson.decode(ARGV[5])
rec.q = redis.call('INCR', K_SEQ)
redis.call('ZADD', K_QUEUE, ARGV[3], member(rec.q, id))
redis.call('HSET', K_ITEMS, id, cjson.encode(rec))
redis.call('ZADD', K_DEADLINES, ARGV[4], id)
redis.call('HINCRBY', K_DEPTH, rec.t, 1)
redis.call('PUBLISH', CH_CAPACITY, 'enqueue')
return 1
