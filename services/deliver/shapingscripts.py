"""The Lua scripts of traffic shaping (:mod:`services.deliver.shaping`), and the site's line
they keep.

Each runs in one Redis call, on Redis time (:data:`_NOW`: every pod compares expiries on the
same clock): :data:`ACQUIRE` takes a connection lease (dropping expired and released leases,
applying the back-off, the connection rate and the site's line), :data:`RENEW` renews a
process's leases, :data:`PACE` and :data:`REFUND` take and give back a cell of a site's message
rate (GCRA), :data:`BACKOFF` steps a site's connection limit down, :data:`ADMIT` asks the line
alone. :data:`JOIN_LINE` and :data:`LEAVE_LINE` are staged in the transactions that park and
record a job (:mod:`services.deliver.ledger`). Inputs: the keys and arguments listed above each
script (the keys named by :func:`services.common.spool.site_key`).

**The site's line** (review finding 8). Parked jobs come back when their wait is over, but a new
job to the site takes a connection the moment one is free, and a worker holding a session to the
site sends its next job over it: under a long saturation an old job kept missing its turn, and
could reach its queue lifetime untried while younger ones went. So, as Postfix's qmgr serves a
destination's queue in order (and KumoMTA a site's ready queue), a job parked for a limit of its
whole site (:data:`~services.deliver.shaping.LINE_REASONS`: not a suspension, which may name one
domain of the site and ends with ``resume``) waits in the site's line
``tlsrelay:shaping:line:<site>``, a sorted set of its deferred-set member scored by when its
message was accepted (its seniority), until its round is recorded or it is closed:

- a round goes only when fewer than :func:`~services.deliver.shaping.front_of` jobs of the line
  are older — the line's *front*, served together as Postfix's active queue is (a task's worth
  of jobs, ``delivery.batch_max``, or two per connection of the site's limit if that is more:
  enough to keep its connections busy over reused sessions for a scheduler pass); else it joins
  the line (parked as :data:`~services.deliver.shaping.LINE`, not an attempt). So once more jobs
  wait for the site than its front, younger mail no longer passes them; below that the site has
  room for all that wait and a line that is not full never turns new mail away (no convoy behind
  a brief limit);
- within the front, a connection that comes free goes to the oldest round asking for one: while
  a line stands, the site's ``waiting`` flag holds that round's seniority (set and refreshed by
  it alone, for :data:`~services.deliver.shaping.WAITING_TTL`) and the lease script turns
  younger rounds away (``connections``) until it has its lease or stops asking;
- jobs behind the front sleep (:data:`~services.deliver.shaping.PARK_LINE`, a safety net) and
  are called in (made due now) as the front moves: by the recording of a job of the line
  (:data:`LEAVE_LINE`), by a job parked behind others that finds itself in the front
  (:data:`JOIN_LINE`), and by a look over the front at most once a second per site (in
  :data:`_LINE`), which also drops leftovers — entries whose job is neither deferred nor being
  run (``waiting:deliver``): bounced by the operator, or rebuilt by the rescue sweep after its
  worker died.

The line is asked inside the lease script (a new connection: no command more than one ``EXISTS``
while a site has no line) and, for a round that would ride a session the worker already holds,
by :meth:`~services.deliver.shaping.Shaper.admit` — one call, made only by a job of the line or
in a process that saw a line at that site within :data:`~services.deliver.shaping.LINE_MEMORY`
(its lease replies and its tick tell it): a process that has not seen a new line yet lets
younger jobs pass on its own sessions for at most a tick. Holding no lease or claim, the line
never holds a connection: a worker killed while running a job of the line leaves its job in
``waiting:deliver`` (the rescue sweep queues it again) and its entry in the line, a place it
keeps until recorded. Served this way under saturation, the site's jobs go through the deferred
set and the scheduler (``delivery.scheduler_interval``) a front at a time: order is bought with
some throughput while a line stands (each job of it waits for a scheduler pass).

Failure: nothing here runs on its own. A script's error (Redis unavailable, or a script error)
propagates to its caller, which decides (:mod:`services.deliver.shaping`, "Failure"); Redis runs
each script with no other command in between, but does not undo the writes a script made before
an error.
"""

# Redis time as seconds (a float): every pod compares expiries on the same clock. Writes after
# TIME need effects replication: the default since Redis 5 (always since 7); asked for on 3.2-4.
_NOW = (
    "if redis.replicate_commands then redis.replicate_commands() end\n"
    "local t = redis.call('TIME') local now = tonumber(t[1]) + tonumber(t[2]) / 1e6\n"
)

# The back-off steps still in force (recovering one per recover_after), written back.
# KEYS[2] = backoff hash; needs now, factor (ARGV[4]), recover (ARGV[5]), configured (ARGV[3]).
_STEPS = """
local function steps_now(key, recover)
  local b = redis.call('HMGET', key, 'steps', 'at')
  local steps, at = tonumber(b[1]) or 0, tonumber(b[2]) or now
  if steps > 0 then
    local back = math.floor((now - at) / recover)
    if back > 0 then
      steps = math.max(0, steps - back)
      if steps == 0 then redis.call('DEL', key)
      else redis.call('HSET', key, 'steps', steps, 'at', at + back * recover) end
    end
  end
  return steps
end
local function limit_of(configured, factor, steps)
  return math.max(1, math.floor(configured * factor ^ steps))
end
"""

# GCRA: allow when the theoretical arrival time is at most `tolerance` ahead; returns the wait
# in milliseconds (0: allowed, and the cell is taken).
_GCRA = """
local function gcra(key, interval, tolerance)
  local tat = tonumber(redis.call('GET', key) or now)
  if tat < now then tat = now end
  if tat - now > tolerance then return math.ceil((tat - now - tolerance) * 1000) end
  redis.call('SET', key, tat + interval, 'PX', math.ceil((tat + interval - now) * 1000) + 1000)
  return 0
end
"""

# The site's line: whether a round whose message was accepted at ``s`` may take the site's
# capacity: fewer than ``front`` jobs waiting in the line are older (always, with no line: one
# EXISTS; and with ``front`` 0, the line turned off, without looking).
# At most once per ``wake_ms`` per site the line's front is looked over: a job of it asleep in
# the deferred set behind others (parked as ``line``; a limit's own wait, a few seconds for a
# connection or exact for a rate, is kept) is made due now (``call``); one that is neither
# there nor being run (in waiting:deliver) is a leftover and leaves the line. Returns
# (admitted, whether the site has a line).
_LINE = """
local function call(deferred, m)
  local due = redis.call('ZSCORE', deferred, m)
  if not due then return false end
  if tonumber(due) > now then
    local ok, doc = pcall(cjson.decode, m)
    local why = ok and type(doc) == 'table' and type(doc['throttled']) == 'table'
      and doc['throttled']['reason']
    if why == 'line' then redis.call('ZADD', deferred, 'XX', now, m) end
  end
  return true
end
local function present(deferred, running, m)
  if call(deferred, m) then return true end
  local ok, doc = pcall(cjson.decode, m)
  local known = ok and type(doc) == 'table' and type(doc['id']) == 'string'
    and type(doc['domain']) == 'string'
  return known and redis.call('ZSCORE', running, doc['id'] .. ' ' .. doc['domain']) ~= false
end
local function look_over(line, deferred, running, members)
  for _, m in ipairs(members) do
    if not present(deferred, running, m) then redis.call('ZREM', line, m) end
  end
end
local function line_admits(line, deferred, running, gate, s, front, wake_ms)
  if front == 0 or redis.call('EXISTS', line) == 0 then return true, 0 end
  local looked = redis.call('SET', gate, '1', 'NX', 'PX', wake_ms)
  if looked then look_over(line, deferred, running, redis.call('ZRANGE', line, 0, front - 1)) end
  local older = redis.call('ZCOUNT', line, '-inf', '(' .. s)
  if older >= front and not looked and older <= front + 2 then
    -- a few leftovers (a rescued job's old entry) must not hold a round up until the next look
    look_over(line, deferred, running, redis.call('ZRANGEBYSCORE', line, '-inf', '(' .. s))
    older = redis.call('ZCOUNT', line, '-inf', '(' .. s)
  end
  return older < front, 1
end
"""

# KEYS: 1 leases, 2 backoff, 3 connection-rate cell, 4 waiting flag, 5 sites registry, 6 line,
# 7 deferred set, 8 waiting:deliver, 9 the line's wake gate.
# ARGV: 1 lease id, 2 ttl, 3 configured limit, 4 factor, 5 recover_after, 6 rate interval (0:
# none), 7 rate tolerance, 8 site id, 9 site document ("": not written again now), 10 waiting
# ttl (0: a look that will not wait — a successor session's — never raises the flag, and gets
# no lease while it stands), 11
# seniority, 12 front, 13 wake ms, 14.. leases to drop.
# Returns {1, limit, used, line} or {0, reason, wait ms, line} (line: 1 when the site has one).
ACQUIRE = (
    _NOW
    + _STEPS
    + _GCRA
    + _LINE
    + """
for i = 14, #ARGV do redis.call('ZREM', KEYS[1], ARGV[i]) end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local admitted, queued = line_admits(
  KEYS[6], KEYS[7], KEYS[8], KEYS[9], ARGV[11], tonumber(ARGV[12]), ARGV[13])
if not admitted then return {0, 'line', 0, queued} end
local configured = tonumber(ARGV[3])
local steps = steps_now(KEYS[2], tonumber(ARGV[5]))
local limit = limit_of(configured, tonumber(ARGV[4]), steps)
local used = redis.call('ZCARD', KEYS[1])
-- While the site has a line, the waiting flag holds the seniority of the oldest round asking
-- for a connection (set by it, refreshed by it alone): a younger round leaves it the next one.
-- A look that will not wait (a successor session's) leaves a connection to any round that waits
-- for one (its flag stands, line or not): that round has a message, the successor none yet.
if tonumber(ARGV[10]) == 0 and redis.call('EXISTS', KEYS[4]) == 1 then
  return {0, 'connections', 0, queued}
end
local s, oldest = tonumber(ARGV[11]), nil
if queued == 1 then oldest = tonumber(redis.call('GET', KEYS[4]) or '') end
if used >= limit or (oldest ~= nil and s > oldest) then
  if tonumber(ARGV[10]) > 0 and (oldest == nil or s <= oldest) then
    redis.call('SET', KEYS[4], ARGV[11], 'PX', math.floor(tonumber(ARGV[10]) * 1000))
  end
  if used < limit then return {0, 'connections', 0, queued} end
  if used < configured then return {0, 'backoff', 0, queued} end
  return {0, 'connections', 0, queued}
end
if oldest ~= nil then redis.call('DEL', KEYS[4]) end
if tonumber(ARGV[6]) > 0 then
  local wait = gcra(KEYS[3], tonumber(ARGV[6]), tonumber(ARGV[7]))
  if wait > 0 then return {0, 'connection_rate', wait, queued} end
end
local ttl = tonumber(ARGV[2])
redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
redis.call('PEXPIRE', KEYS[1], math.floor(ttl * 2000))
if ARGV[9] ~= '' then redis.call('HSET', KEYS[5], ARGV[8], ARGV[9]) end
return {1, limit, used + 1, queued}
"""
)

# KEYS: 1 line, 2 deferred set, 3 waiting:deliver, 4 wake gate. ARGV: 1 seniority, 2 front,
# 3 wake ms. Returns {admitted (1/0), line (1/0)}.
ADMIT = (
    _NOW
    + _LINE
    + """
local admitted, queued = line_admits(
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], ARGV[1], tonumber(ARGV[2]), ARGV[3])
return {admitted and 1 or 0, queued}
"""
)

# KEYS: 1 line, 2 deferred set. ARGV: 1 the member leaving it, 2 front. A job of the line is
# recorded (or gone): it leaves, and the job that enters the front by it, if asleep behind
# others, is made due now. Staged in the transaction that records a job that was throttled
# (services/deliver/ledger.py).
LEAVE_LINE = (
    _NOW
    + _LINE
    + """
if redis.call('ZREM', KEYS[1], ARGV[1]) == 0 then return 0 end
local front = tonumber(ARGV[2])
local next = redis.call('ZRANGE', KEYS[1], front - 1, front - 1)
if next[1] then call(KEYS[2], next[1]) end
return 1
"""
)

# KEYS: 1 line, 2 deferred set. ARGV: 1 member, 2 seniority, 3 front, 4 ttl. A job parked for a
# limit of its site takes its place in the line (after its deferred entry, in the same
# transaction); one parked behind others (``line``) that is in the front by now (one of it was
# recorded meanwhile) is made due at once rather than wait for a call.
JOIN_LINE = (
    _NOW
    + _LINE
    + """
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[4])
if redis.call('ZCOUNT', KEYS[1], '-inf', '(' .. ARGV[2]) < tonumber(ARGV[3]) then
  call(KEYS[2], ARGV[1])
end
return 1
"""
)

# KEYS: 1 rate cell, 2 this minute's message count. ARGV: interval, tolerance. Returns wait ms.
PACE = (
    _NOW
    + _GCRA
    + """
local wait = gcra(KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2]))
if wait == 0 then
  redis.call('INCR', KEYS[2])
  redis.call('EXPIRE', KEYS[2], 120)
end
return wait
"""
)

# KEYS: 1 rate cell, 2 the minute's message count. ARGV: interval. The cell a round took and
# did not use (a connection limit stopped it after its rate allowed it) goes back.
REFUND = (
    _NOW
    + """
local tat = tonumber(redis.call('GET', KEYS[1]) or 0)
if tat > 0 then
  local back = tat - tonumber(ARGV[1])
  if back <= now then redis.call('DEL', KEYS[1])
  else redis.call('SET', KEYS[1], back, 'PX', math.ceil((back - now) * 1000) + 1000) end
end
if tonumber(redis.call('GET', KEYS[2]) or 0) > 0 then redis.call('DECR', KEYS[2]) end
return 1
"""
)

# KEYS: 1 backoff hash. ARGV: 3 configured, 4 factor, 5 recover_after (1, 2 unused).
# One step down (at most one per second, never below a limit of 1). Returns {steps, limit}.
BACKOFF = (
    _NOW
    + _STEPS
    + """
local configured, factor, recover = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local steps = steps_now(KEYS[1], recover)
local last = tonumber(redis.call('HGET', KEYS[1], 'stepped') or 0)
if limit_of(configured, factor, steps) > 1 and now - last >= 1 then
  steps = steps + 1
  redis.call('HSET', KEYS[1], 'steps', steps, 'at', now, 'stepped', now, 'recover', recover)
  redis.call('EXPIRE', KEYS[1], math.ceil(recover * (steps + 1)) + 60)
end
return {steps, limit_of(configured, factor, steps)}
"""
)


# KEYS: leases sets (one per lease), then per site with parked sessions its waiting flag and its
# line. ARGV: 1 number of leases n, 2 number of those keys m, 3 ttl, 4.. the n lease ids, then
# "key|id" of leases to drop. Returns n renewal flags (1: renewed, 0: gone) then m existences.
RENEW = (
    _NOW
    + """
local n, m, ttl = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
for i = 4 + n, #ARGV do
  local sep = string.find(ARGV[i], '|', 1, true)
  redis.call('ZREM', string.sub(ARGV[i], 1, sep - 1), string.sub(ARGV[i], sep + 1))
end
local out = {}
for i = 1, n do
  if redis.call('ZSCORE', KEYS[i], ARGV[3 + i]) then
    redis.call('ZADD', KEYS[i], now + ttl, ARGV[3 + i])
    redis.call('PEXPIRE', KEYS[i], math.floor(ttl * 2000))
    out[i] = 1
  else
    out[i] = 0
  end
end
for j = 1, m do out[n + j] = redis.call('EXISTS', KEYS[n + j]) end
return out
"""
)
