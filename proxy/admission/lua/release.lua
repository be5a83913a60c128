-- Free whatever an item holds, and dequeue it if still queued (AdmissionQueue.release).
-- ARGV: channels, id, correction (added to the tenant's counter when a hold was freed).
-- Returns 1 when something was freed.
local id = ARGV[2]
local freed = drop_hold(id, tonumber(ARGV[3]))
local raw = redis.call('HGET', K_ITEMS, id)
if raw then
  dequeue(id, cjson.decode(raw))
  freed = true
end
if freed then
  redis.call('PUBLISH', CH_CAPACITY, 'release')
  return 1
end
return 0
