-- Free whatever an item holds, and dequeue it if still queued (AdmissionQueue.release);
-- with dispatch arguments, dispatch at once into the room it made (dispatching.lua), in the
-- same atomic step. ARGV: channels, id, correction (added to the tenant's counter when a hold
-- was freed); optionally now, lease_ttl_s, max_grants, the calling replica, expired memory.
-- With a store step (the request's token settlement; dispatch arguments then required): its
-- keys are KEYS[2..], its script ARGV[9], its arguments ARGV[10..]; it runs first, whatever
-- the release finds.
-- Returns {1 when something was freed else 0, grants, expired} (dispatch.lua's shapes).
local id = ARGV[2]
if #KEYS > 1 then
  store_step(ARGV[9], {unpack(KEYS, 2)}, {unpack(ARGV, 10)})
end
local freed = drop_hold(id, tonumber(ARGV[3]))
local raw = redis.call('HGET', K_ITEMS, id)
if raw then
  dequeue(id, cjson.decode(raw))
  freed = true
end
if not freed then
  return {0, {}, {}}
end
if ARGV[4] == nil then
  redis.call('PUBLISH', CH_CAPACITY, 'release')
  return {1, {}, {}}
end
local out, more = dispatch_now(ARGV[4], ARGV[5], tonumber(ARGV[6]), ARGV[7], ARGV[8])
if more then
  redis.call('PUBLISH', CH_CAPACITY, 'release')
end
return {1, out[1], out[2]}
