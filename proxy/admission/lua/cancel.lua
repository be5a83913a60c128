-- Remove a queued item (AdmissionQueue.cancel). Returns 1 when it was queued.
-- ARGV: channels, id
local raw = redis.call('HGET', K_ITEMS, ARGV[2])
if not raw then
  return 0
end
dequeue(ARGV[2], cjson.decode(raw))
redis.call('PUBLISH', CH_CAPACITY, 'cancel')
return 1
