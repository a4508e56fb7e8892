//! The Redis-streams bus of the distributed mode.
//!
//! Each event is a stream entry with the field `p` (payload) and one `h:<name>` field per
//! header. Keys are `<redis.key_prefix><stream>`.
//!
//! Connections: a small pool serves ordinary commands. Blocking reads never use it: consumer
//! group reads borrow a dedicated connection from a free list, and the tails of this process
//! share a few *hub* connections — each stream always to the same one — each running `XREAD
//! BLOCK` over its tailed streams at once and fanning entries out. (A new tail joins its hub's
//! next read, interrupting the read under way only if none comes within `HUB_GRACE`; several
//! hubs keep one busy hub from delaying every stream.) A tail that falls behind the hub is
//! dropped from it and catches up from the stream itself (`XRANGE`), so a slow reader never
//! loses events and never stalls the others.

mod roster;

use std::{
    collections::{BTreeMap, HashMap},
    sync::{
        Arc, Mutex, MutexGuard, OnceLock,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use async_trait::async_trait;
use bytes::Bytes;
use fred::{
    prelude::{
        ClientInterface, ClientLike, Config, Error as RedisError, ErrorKind, EventInterface as _,
        KeysInterface, Pool, ReconnectPolicy, StreamsInterface,
    },
    types::{ClientUnblockFlag, Value},
};
use futures::stream::{self, BoxStream, StreamExt as _};
use secrecy::{ExposeSecret, SecretString};
use tokio::sync::{Notify, mpsc};

use crate::{
    Adjust, Append, Backlog, BusError, Claim, Counters, Delivery, Event, EventBus, EventId, GroupStart,
    Holder, NewEvent, PendingSummary, Rate, Reserved, Result, Throttled,
};

/// Payload field of an entry.
const PAYLOAD_FIELD: &str = "p";
/// Prefix of header fields.
const HEADER_PREFIX: &str = "h:";
/// Batch size of catch-up reads and of the hub's reads.
const BATCH: u64 = 256;
/// Longest a hub read blocks; bounds how late a newly tailed stream joins when the wake-up
/// races the read.
const HUB_BLOCK: Duration = Duration::from_millis(1000);
/// How long a new tail waits for its hub's next read to include it before interrupting the
/// read under way. Under load a hub reads again within a millisecond or two anyway, so most new
/// tails cost no interruption; when idle, a tail's first live event is late by this at most.
const HUB_GRACE: Duration = Duration::from_millis(2);
/// Hub connections per process.
const HUBS: usize = 4;
/// Events buffered per tail before the hub drops it to catch up on its own.
const TAIL_BUFFER: usize = 1024;

/// An [`EventBus`] on Redis streams. Clones share connections.
#[derive(Clone)]
pub struct RedisBus {
    inner: Arc<Inner>,
}

struct Inner {
    pool: Pool,
    prefix: String,
    location: String,
    /// Idle dedicated connections for blocking group reads.
    blocking: Mutex<Vec<fred::clients::Client>>,
    hubs: OnceLock<Vec<Arc<Hub>>>,
    /// Which hub a key goes to.
    spread: std::hash::RandomState,
}

impl std::fmt::Debug for RedisBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisBus").field("location", &self.inner.location).finish_non_exhaustive()
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    match mutex.lock() {
        Ok(guard) => guard,
        Err(poisoned) => poisoned.into_inner(),
    }
}

fn unavailable(error: RedisError) -> BusError {
    BusError::Unavailable(describe(&error))
}

/// A readable reason: fred renders I/O errors as their Debug form; keep just the message.
fn describe(error: &RedisError) -> String {
    let details = error.details();
    if let Some(start) = details.find("message: \"") {
        let rest = &details[start + 10..];
        if let Some(end) = rest.find('"') {
            return rest[..end].to_ascii_lowercase();
        }
    }
    error.to_string()
}

/// `redis://:secret@host:6379/0` → `redis://host:6379/0`.
fn redact(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut parsed) => {
            let _ = parsed.set_password(None);
            let _ = parsed.set_username("");
            parsed.to_string()
        }
        Err(_) => "<unparseable url>".into(),
    }
}

impl RedisBus {
    /// Connects to Redis; fails (rather than retrying forever) if the first connection fails.
    /// `prefix` is prepended to every key.
    pub async fn connect(url: &SecretString, prefix: &str, connect_timeout: Duration) -> Result<Self> {
        let location = redact(url.expose_secret());
        let failed = |reason: String| BusError::Connect { location: location.clone(), reason };
        let config = Config::from_url(url.expose_secret()).map_err(|e| failed(e.to_string()))?;
        let mut builder = fred::types::Builder::from_config(config);
        builder
            .with_connection_config(|c| {
                c.connection_timeout = connect_timeout;
                c.internal_command_timeout = connect_timeout;
            })
            .with_performance_config(|p| {
                p.default_command_timeout = Duration::from_secs(10);
            })
            .set_policy(ReconnectPolicy::new_exponential(0, 100, 5_000, 2));
        let pool = builder.build_pool(4).map_err(|e| failed(e.to_string()))?;
        match tokio::time::timeout(connect_timeout + Duration::from_secs(1), pool.init()).await {
            Ok(Ok(_)) => {}
            // A pool whose first connection failed is already stopped.
            Ok(Err(e)) => return Err(failed(describe(&e))),
            Err(_) => {
                let _ = pool.quit().await;
                return Err(failed(format!("no answer within {}s", connect_timeout.as_secs())));
            }
        }
        for client in pool.clients() {
            let location = location.clone();
            client.on_reconnect(move |server| {
                tracing::info!(location = %location, server = %server, "redis reconnected");
                async { Ok(()) }
            });
        }
        Ok(Self {
            inner: Arc::new(Inner {
                pool,
                prefix: prefix.to_owned(),
                location,
                blocking: Mutex::new(Vec::new()),
                hubs: OnceLock::new(),
                spread: std::hash::RandomState::new(),
            }),
        })
    }

    /// Where it is connected, without secrets.
    pub fn location(&self) -> &str {
        &self.inner.location
    }

    /// Deletes every key under this bus's prefix (test teardown, or resetting a deployment).
    pub async fn purge(&self) -> Result<u64> {
        let pattern = format!("{}*", escape_glob(&self.inner.prefix));
        let keys: Vec<fred::types::Key> = self
            .inner
            .pool
            .next()
            .scan_buffered(pattern, Some(500), None)
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .collect::<std::result::Result<_, _>>()
            .map_err(unavailable)?;
        let mut deleted = 0;
        for chunk in keys.chunks(500) {
            let n: u64 = self.inner.pool.unlink(chunk.to_vec()).await.map_err(unavailable)?;
            deleted += n;
        }
        Ok(deleted)
    }

    fn key(&self, stream: &str) -> String {
        format!("{}{stream}", self.inner.prefix)
    }

    /// A dedicated, connected client for a blocking command; give it back with `give_back`.
    async fn borrow_blocking(&self) -> Result<fred::clients::Client> {
        if let Some(client) = lock(&self.inner.blocking).pop() {
            return Ok(client);
        }
        let client = self.inner.pool.next().clone_new();
        client.init().await.map_err(unavailable)?;
        Ok(client)
    }

    fn give_back(&self, client: fred::clients::Client) {
        let mut idle = lock(&self.inner.blocking);
        if idle.len() < 16 {
            idle.push(client);
        } else {
            drop(idle);
            tokio::spawn(async move {
                let _ = client.quit().await;
            });
        }
    }

    /// The hub that reads `key`.
    fn hub(&self, key: &str) -> Arc<Hub> {
        use std::hash::BuildHasher as _;
        let hubs = self.inner.hubs.get_or_init(|| {
            (0..HUBS)
                .map(|_| {
                    let hub = Arc::new(Hub {
                        reader: self.inner.pool.next().clone_new(),
                        keys: Mutex::new(HashMap::new()),
                        wake: Notify::new(),
                        added: AtomicU64::new(0),
                        covered: AtomicU64::new(0),
                        reading: Notify::new(),
                    });
                    tokio::spawn(hub.clone().run());
                    hub
                })
                .collect()
        });
        hubs[(self.inner.spread.hash_one(key) % hubs.len() as u64) as usize].clone()
    }
}

/// INCRBY that starts a fixed window (PEXPIRE) when it creates the key.
fn hit_script() -> &'static fred::types::scripts::Script {
    static SCRIPT: OnceLock<fred::types::scripts::Script> = OnceLock::new();
    SCRIPT.get_or_init(|| {
        fred::types::scripts::Script::from_lua(
            r#"
local n = redis.call('INCRBY', KEYS[1], ARGV[1])
if n == tonumber(ARGV[1]) or redis.call('PTTL', KEYS[1]) < 0 then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return n
"#,
        )
    })
}

#[async_trait]
impl Counters for RedisBus {
    async fn hit(&self, key: &str, window: Duration) -> Result<u64> {
        self.add(key, 1, window).await
    }

    async fn add(&self, key: &str, amount: u64, window: Duration) -> Result<u64> {
        let args = vec![Value::Integer(amount as i64), Value::Integer(window.as_millis().max(1) as i64)];
        hit_script()
            .evalsha_with_reload(self.inner.pool.next(), vec![self.key(key)], args)
            .await
            .map_err(unavailable)
    }

    async fn count(&self, key: &str) -> Result<u64> {
        let value: Option<u64> = self.inner.pool.get(self.key(key)).await.map_err(unavailable)?;
        Ok(value.unwrap_or(0))
    }

    async fn ttl(&self, key: &str) -> Result<Option<Duration>> {
        let millis: i64 = self.inner.pool.pttl(self.key(key)).await.map_err(unavailable)?;
        Ok((millis >= 0).then(|| Duration::from_millis(millis as u64)))
    }

    async fn set(&self, key: &str, value: u64, ttl: Duration) -> Result<()> {
        let expiry = fred::types::Expiration::PX(ttl.as_millis().max(1) as i64);
        let _: Value = self
            .inner
            .pool
            .set(self.key(key), value, Some(expiry), None, false)
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn reset(&self, key: &str) -> Result<()> {
        let _: i64 = self.inner.pool.del(self.key(key)).await.map_err(unavailable)?;
        Ok(())
    }

    async fn reserve(&self, claims: &[Claim]) -> Result<Reserved> {
        if claims.is_empty() {
            return Ok(Reserved::Granted);
        }
        let keys: Vec<String> = claims.iter().map(|c| self.key(&c.key)).collect();
        let mut args = Vec::with_capacity(claims.len() * 3);
        for claim in claims {
            args.push(Value::Integer(claim.amount.min(i64::MAX as u64) as i64));
            args.push(Value::Integer(claim.limit.min(i64::MAX as u64) as i64));
            args.push(Value::Integer(claim.ttl.as_millis().max(1) as i64));
        }
        let refused: i64 = reserve_script()
            .evalsha_with_reload(self.inner.pool.next(), keys, args)
            .await
            .map_err(unavailable)?;
        Ok(if refused == 0 { Reserved::Granted } else { Reserved::Refused(refused as usize - 1) })
    }

    async fn adjust(&self, changes: &[Adjust]) -> Result<()> {
        if changes.is_empty() {
            return Ok(());
        }
        let keys: Vec<String> = changes.iter().map(|c| self.key(&c.key)).collect();
        let mut args = Vec::with_capacity(changes.len() * 2);
        for change in changes {
            args.push(Value::Integer(change.delta));
            args.push(Value::Integer(change.ttl.as_millis().max(1) as i64));
        }
        let _: Value = adjust_script()
            .evalsha_with_reload(self.inner.pool.next(), keys, args)
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn throttle(&self, key: &str, rate: Rate) -> Result<Throttled> {
        let (interval, tolerance) = rate.gcra();
        let args = vec![Value::from(format!("{interval:.6}")), Value::from(format!("{tolerance:.6}"))];
        let wait_us: i64 = throttle_script()
            .evalsha_with_reload(self.inner.pool.next(), vec![self.key(key)], args)
            .await
            .map_err(unavailable)?;
        Ok(if wait_us < 0 {
            Throttled::Allowed
        } else {
            Throttled::Wait(Duration::from_micros(wait_us as u64))
        })
    }
}

/// The generic cell rate algorithm (see [`crate::gcra`]) on Redis's clock: KEYS[1] holds when
/// the bucket will next be full (ms), ARGV the interval between tokens and the tolerance
/// (ms). Returns -1 when a token was taken, else the wait for the next one in microseconds.
fn throttle_script() -> &'static fred::types::scripts::Script {
    static SCRIPT: OnceLock<fred::types::scripts::Script> = OnceLock::new();
    SCRIPT.get_or_init(|| {
        fred::types::scripts::Script::from_lua(
            r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local interval = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
local allow_at = tat + interval - tolerance
if now >= allow_at then
  local full_at = tat + interval
  redis.call('SET', KEYS[1], string.format('%.3f', full_at), 'PX', math.max(1, math.ceil(full_at - now)))
  return -1
end
return math.ceil((allow_at - now) * 1000)
"#,
        )
    })
}

/// Checks every key against its limit (ARGV: amount, limit, ttl per key), then takes every
/// amount; returns 0, or the 1-based index of the first key that would pass its limit.
fn reserve_script() -> &'static fred::types::scripts::Script {
    static SCRIPT: OnceLock<fred::types::scripts::Script> = OnceLock::new();
    SCRIPT.get_or_init(|| {
        fred::types::scripts::Script::from_lua(
            r#"
for i = 1, #KEYS do
  local current = tonumber(redis.call('GET', KEYS[i]) or '0')
  if current + tonumber(ARGV[3 * i - 2]) > tonumber(ARGV[3 * i - 1]) then
    return i
  end
end
for i = 1, #KEYS do
  redis.call('INCRBY', KEYS[i], ARGV[3 * i - 2])
  if redis.call('PTTL', KEYS[i]) < 0 then
    redis.call('PEXPIRE', KEYS[i], ARGV[3 * i])
  end
end
return 0
"#,
        )
    })
}

/// INCRBY each key by its delta (ARGV: delta, ttl per key), clamped at zero.
fn adjust_script() -> &'static fred::types::scripts::Script {
    static SCRIPT: OnceLock<fred::types::scripts::Script> = OnceLock::new();
    SCRIPT.get_or_init(|| {
        fred::types::scripts::Script::from_lua(
            r#"
for i = 1, #KEYS do
  local n = redis.call('INCRBY', KEYS[i], ARGV[2 * i - 1])
  if n < 0 then
    redis.call('SET', KEYS[i], 0, 'KEEPTTL')
  end
  if redis.call('PTTL', KEYS[i]) < 0 then
    redis.call('PEXPIRE', KEYS[i], ARGV[2 * i])
  end
end
return 0
"#,
        )
    })
}

#[async_trait]
impl EventBus for RedisBus {
    fn backend(&self) -> &'static str {
        "redis"
    }

    async fn append(&self, stream: &str, event: NewEvent, cap: Option<u64>) -> Result<EventId> {
        let mut fields: Vec<(String, Value)> = Vec::with_capacity(1 + event.headers.len());
        fields.push((PAYLOAD_FIELD.to_owned(), Value::Bytes(event.payload)));
        for (name, value) in event.headers {
            fields.push((format!("{HEADER_PREFIX}{name}"), Value::from(value)));
        }
        let id: String = match cap {
            None => self.inner.pool.xadd(self.key(stream), false, None, "*", fields).await,
            Some(cap) => {
                let mut args = Vec::with_capacity(2 * fields.len() + 1);
                args.push(Value::Integer(cap.max(1) as i64));
                for (name, value) in fields {
                    args.push(Value::from(name));
                    args.push(value);
                }
                capped_append_script()
                    .evalsha_with_reload(self.inner.pool.next(), vec![self.key(stream)], args)
                    .await
            }
        }
        .map_err(unavailable)?;
        id.parse()
    }

    async fn append_all(
        &self,
        stream: &str,
        events: Vec<NewEvent>,
        cap: Option<u64>,
    ) -> Result<Vec<EventId>> {
        if events.is_empty() {
            return Ok(Vec::new());
        }
        let mut ids = self.append_many(vec![Append::new(stream, events, cap)]).await?;
        Ok(ids.pop().unwrap_or_default())
    }

    async fn append_many(&self, appends: Vec<Append>) -> Result<Vec<Vec<EventId>>> {
        self.append_checked(None, appends).await
    }

    async fn append_held(&self, holder: &Holder, appends: Vec<Append>) -> Result<Vec<Vec<EventId>>> {
        self.append_checked(Some(holder), appends).await
    }

    async fn read(&self, stream: &str, after: Option<EventId>, limit: usize) -> Result<Vec<Event>> {
        let key = self.key(stream);
        let Some(after) = after else {
            let reply: Value =
                self.inner.pool.xrange(key, "-", "+", Some(limit as u64)).await.map_err(unavailable)?;
            return parse_entries(reply);
        };
        // One round trip: what was trimmed, and what follows `after`.
        let args = vec![Value::from(format!("({after}")), Value::Integer(limit as i64)];
        let reply: Value = read_after_script()
            .evalsha_with_reload(self.inner.pool.next(), vec![key], args)
            .await
            .map_err(unavailable)?;
        let Value::Array(mut parts) = reply else {
            return Err(bad_reply("read"));
        };
        if parts.len() != 2 {
            return Err(bad_reply("read shape"));
        }
        let entries = parts.pop().unwrap_or(Value::Null);
        let trimmed_up_to: EventId = text(&parts[0]).ok_or_else(|| bad_reply("trimmed id"))?.parse()?;
        if after < trimmed_up_to {
            return Err(BusError::Truncated { stream: stream.to_owned(), after, trimmed_up_to });
        }
        parse_entries(entries)
    }

    async fn last_id(&self, stream: &str) -> Result<Option<EventId>> {
        let reply: Value =
            self.inner.pool.xrevrange(self.key(stream), "+", "-", Some(1)).await.map_err(unavailable)?;
        Ok(parse_entries(reply)?.first().map(|e| e.id))
    }

    async fn len(&self, stream: &str) -> Result<u64> {
        self.inner.pool.xlen(self.key(stream)).await.map_err(unavailable)
    }

    async fn delete(&self, stream: &str) -> Result<()> {
        let _: i64 = self.inner.pool.del(self.key(stream)).await.map_err(unavailable)?;
        Ok(())
    }

    async fn tail(&self, stream: &str, after: Option<EventId>) -> Result<BoxStream<'static, Result<Event>>> {
        let cursor = match after {
            Some(after) => after,
            None => self.last_id(stream).await?.unwrap_or(EventId::ZERO),
        };
        let mut tail = Tail {
            bus: self.clone(),
            stream: stream.to_owned(),
            key: self.key(stream),
            cursor,
            live: None,
            catching_up: true,
            ready: Vec::new(),
        };
        tail.start().await?;
        Ok(stream::unfold(Some(tail), |state| async move {
            let mut tail = state?;
            match tail.next_batch().await {
                Ok(events) => {
                    let items: Vec<Result<Event>> = events.into_iter().map(Ok).collect();
                    Some((stream::iter(items), Some(tail)))
                }
                Err(e) => Some((stream::iter(vec![Err(e)]), None)),
            }
        })
        .flatten()
        .boxed())
    }

    async fn create_group(&self, stream: &str, group: &str, start: GroupStart) -> Result<()> {
        let id = match start {
            GroupStart::Beginning => "0",
            GroupStart::End => "$",
        };
        match self.inner.pool.xgroup_create::<Value, _, _, _>(self.key(stream), group, id, true).await {
            Ok(_) => Ok(()),
            Err(e) if e.details().contains("BUSYGROUP") => Ok(()),
            Err(e) => Err(unavailable(e)),
        }
    }

    async fn read_group(
        &self,
        stream: &str,
        group: &str,
        consumer: &str,
        limit: usize,
        block: Duration,
    ) -> Result<Vec<Delivery>> {
        let key = self.key(stream);
        let client = self.borrow_blocking().await?;
        let block_ms = (!block.is_zero()).then(|| block.as_millis().max(1) as u64);
        let options = fred::types::config::Options {
            timeout: Some(block + Duration::from_secs(10)),
            ..Default::default()
        };
        let reply = client
            .with_options(&options)
            .xreadgroup::<Value, _, _, _, _>(group, consumer, Some(limit as u64), block_ms, false, key, ">")
            .await;
        self.give_back(client);
        let reply = match reply {
            Ok(reply) => reply,
            Err(e) if e.details().contains("NOGROUP") => {
                return Err(BusError::NoGroup { stream: stream.to_owned(), group: group.to_owned() });
            }
            Err(e) => return Err(unavailable(e)),
        };
        Ok(parse_read_reply(reply)?
            .into_iter()
            .flat_map(|(_, events)| events)
            .map(|event| Delivery { event, deliveries: 1 })
            .collect())
    }

    async fn ack(&self, stream: &str, group: &str, ids: &[EventId]) -> Result<u64> {
        if ids.is_empty() {
            return Ok(0);
        }
        let ids: Vec<String> = ids.iter().map(ToString::to_string).collect();
        self.inner.pool.xack(self.key(stream), group, ids).await.map_err(unavailable)
    }

    async fn claim_idle(
        &self,
        stream: &str,
        group: &str,
        consumer: &str,
        min_idle: Duration,
        limit: usize,
    ) -> Result<Vec<Delivery>> {
        let key = self.key(stream);
        let mut claimed: Vec<Event> = Vec::new();
        let mut cursor = "0-0".to_owned();
        // XAUTOCLAIM examines a bounded slice of the pending list per call: follow its cursor.
        loop {
            let want = (limit - claimed.len()) as u64;
            let reply = self
                .inner
                .pool
                .xautoclaim::<Value, _, _, _, _>(
                    key.as_str(),
                    group,
                    consumer,
                    min_idle.as_millis() as u64,
                    cursor.as_str(),
                    Some(want),
                    false,
                )
                .await;
            let reply = match reply {
                Ok(reply) => reply,
                Err(e) if e.details().contains("NOGROUP") => {
                    return Err(BusError::NoGroup { stream: stream.to_owned(), group: group.to_owned() });
                }
                Err(e) => return Err(unavailable(e)),
            };
            let Value::Array(mut parts) = reply else {
                return Err(BusError::Unavailable("unexpected XAUTOCLAIM reply".into()));
            };
            if parts.len() < 2 {
                return Err(BusError::Unavailable("unexpected XAUTOCLAIM reply".into()));
            }
            let entries = parts.swap_remove(1);
            let next = text(&parts[0]).unwrap_or_else(|| "0-0".to_owned());
            claimed.extend(parse_entries(entries)?);
            if next == "0-0" || claimed.len() >= limit {
                break;
            }
            cursor = next;
        }
        if claimed.is_empty() {
            return Ok(Vec::new());
        }
        // XAUTOCLAIM does not say how often each entry was delivered; XPENDING does.
        let first = claimed.iter().map(|e| e.id).min().unwrap_or_default().to_string();
        let last = claimed.iter().map(|e| e.id).max().unwrap_or_default().to_string();
        let detail: Value = self
            .inner
            .pool
            .xpending(key.as_str(), group, (first, last, claimed.len() as u64 * 4 + 16, consumer.to_owned()))
            .await
            .map_err(unavailable)?;
        let mut counts: HashMap<EventId, u64> = HashMap::new();
        if let Value::Array(rows) = detail {
            for row in rows {
                if let Value::Array(cols) = row
                    && let (Some(id), Some(count)) = (
                        cols.first().and_then(text).and_then(|t| t.parse().ok()),
                        cols.get(3).and_then(integer),
                    )
                {
                    counts.insert(id, count as u64);
                }
            }
        }
        Ok(claimed
            .into_iter()
            .map(|event| Delivery { deliveries: counts.get(&event.id).copied().unwrap_or(2), event })
            .collect())
    }

    async fn touch(
        &self,
        stream: &str,
        group: &str,
        consumer: &str,
        ids: &[EventId],
    ) -> Result<Vec<EventId>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let held: Value = self.entries_script(touch_script(), stream, group, consumer, ids, None).await?;
        match held {
            Value::Array(ids) => ids.iter().filter_map(text).map(|id| id.parse()).collect(),
            _ => Ok(Vec::new()),
        }
    }

    async fn ack_held(&self, stream: &str, group: &str, consumer: &str, ids: &[EventId]) -> Result<u64> {
        if ids.is_empty() {
            return Ok(0);
        }
        match self.entries_script(ack_held_script(), stream, group, consumer, ids, None).await {
            Ok(acked) => Ok(integer(&acked).unwrap_or(0).max(0) as u64),
            Err(BusError::NoGroup { .. }) => Ok(0),
            Err(e) => Err(e),
        }
    }

    async fn release(&self, stream: &str, group: &str, consumer: &str, ids: &[EventId]) -> Result<u64> {
        if ids.is_empty() {
            return Ok(0);
        }
        let idle = Value::Integer(RELEASED_IDLE.as_millis() as i64);
        let released =
            self.entries_script(release_script(), stream, group, consumer, ids, Some(idle)).await?;
        Ok(integer(&released).unwrap_or(0).max(0) as u64)
    }

    async fn pending(&self, stream: &str, group: &str) -> Result<PendingSummary> {
        let reply: Value = match self.inner.pool.xpending(self.key(stream), group, ()).await {
            Ok(reply) => reply,
            Err(e) if e.details().contains("NOGROUP") => {
                return Err(BusError::NoGroup { stream: stream.to_owned(), group: group.to_owned() });
            }
            Err(e) => return Err(unavailable(e)),
        };
        let mut summary = PendingSummary::default();
        if let Value::Array(parts) = reply {
            summary.count = parts.first().and_then(integer).unwrap_or(0) as u64;
            if let Some(Value::Array(consumers)) = parts.get(3) {
                for pair in consumers {
                    if let Value::Array(pair) = pair
                        && let (Some(name), Some(count)) =
                            (pair.first().and_then(text), pair.get(1).and_then(integer))
                    {
                        summary.consumers.insert(name, count as u64);
                    }
                }
            }
        }
        Ok(summary)
    }

    async fn backlog(&self, stream: &str, group: &str) -> Result<Backlog> {
        let reply: Value = backlog_script()
            .evalsha_with_reload(self.inner.pool.next(), vec![self.key(stream)], vec![Value::from(group)])
            .await
            .map_err(|e| no_group_or_unavailable(e, stream, group))?;
        let Value::Array(parts) = reply else {
            return Err(bad_reply("backlog"));
        };
        let count = |i: usize| parts.get(i).and_then(integer).unwrap_or(0).max(0) as u64;
        Ok(Backlog { waiting: count(0), pending: count(1) })
    }

    async fn compact(&self, stream: &str, group: &str, idle: Duration) -> Result<u64> {
        let args = vec![Value::from(group), Value::Integer(idle.as_millis() as i64)];
        let removed: Value = compact_script()
            .evalsha_with_reload(self.inner.pool.next(), vec![self.key(stream)], args)
            .await
            .map_err(|e| no_group_or_unavailable(e, stream, group))?;
        Ok(integer(&removed).unwrap_or(0).max(0) as u64)
    }

    async fn ping(&self) -> Result<()> {
        let _: Value = self.inner.pool.ping(None).await.map_err(unavailable)?;
        Ok(())
    }
}

/// How idle a released entry is made: longer than any lease.
const RELEASED_IDLE: Duration = Duration::from_secs(365 * 24 * 3600);

fn no_group_or_unavailable(e: RedisError, stream: &str, group: &str) -> BusError {
    let details = e.details();
    if details.contains("NOGROUP") || details.contains("no such key") {
        BusError::NoGroup { stream: stream.to_owned(), group: group.to_owned() }
    } else {
        unavailable(e)
    }
}

impl RedisBus {
    /// Appends (one script) after checking that `holder` holds its entry and that no guarded
    /// stream is sealed.
    async fn append_checked(
        &self,
        holder: Option<&Holder>,
        appends: Vec<Append>,
    ) -> Result<Vec<Vec<EventId>>> {
        if holder.is_none() && appends.iter().all(|a| a.events.is_empty()) {
            return Ok(appends.iter().map(|_| Vec::new()).collect());
        }
        let mut keys: Vec<String> = appends.iter().map(|a| self.key(&a.stream)).collect();
        let streams: Vec<String> = appends.iter().map(|a| a.stream.clone()).collect();
        let mut args = Vec::with_capacity(5 + appends.iter().map(|a| 3 + a.events.len() * 4).sum::<usize>());
        args.push(Value::Integer(appends.len() as i64));
        if let Some(holder) = holder {
            keys.push(self.key(&holder.stream));
            args.push(Value::from(holder.group.as_str()));
            args.push(Value::from(holder.consumer.as_str()));
            args.push(Value::from(holder.id.to_string()));
        }
        args.extend(appends.iter().map(|a| Value::Integer(i64::from(a.guarded))));
        for append in appends {
            args.push(Value::Integer(append.cap.map_or(0, |cap| cap.max(1) as i64)));
            args.push(Value::Integer(append.events.len() as i64));
            for event in append.events {
                push_fields(event, &mut args);
            }
        }
        let reply: Value = append_many_script()
            .evalsha_with_reload(self.inner.pool.next(), keys, args)
            .await
            .map_err(|e| {
                let details = e.details();
                if let Some((_, index)) = details.split_once("SEALED ") {
                    let index: usize = index.trim().parse().unwrap_or(1);
                    BusError::Sealed {
                        stream: streams.get(index.saturating_sub(1)).cloned().unwrap_or_default(),
                    }
                } else if let Some(holder) = holder.filter(|_| details.contains("NOTHELD")) {
                    BusError::NotHeld { stream: holder.stream.clone(), id: holder.id }
                } else {
                    unavailable(e)
                }
            })?;
        let Value::Array(per_stream) = reply else {
            return Err(bad_reply("append"));
        };
        per_stream
            .iter()
            .map(|ids| match ids {
                Value::Array(ids) => {
                    ids.iter().map(|id| text(id).ok_or_else(|| bad_reply("id"))?.parse()).collect()
                }
                // An empty Lua table comes back as an empty reply.
                _ => Ok(Vec::new()),
            })
            .collect()
    }

    /// Runs a script over pending entries of one consumer (ARGV: group, consumer, `extra`
    /// when given, then the ids).
    async fn entries_script(
        &self,
        script: &fred::types::scripts::Script,
        stream: &str,
        group: &str,
        consumer: &str,
        ids: &[EventId],
        extra: Option<Value>,
    ) -> Result<Value> {
        let mut args = vec![Value::from(group), Value::from(consumer)];
        args.extend(extra);
        args.extend(ids.iter().map(|id| Value::from(id.to_string())));
        script
            .evalsha_with_reload(self.inner.pool.next(), vec![self.key(stream)], args)
            .await
            .map_err(|e| no_group_or_unavailable(e, stream, group))
    }
}

/// One tail: catches up from the stream, then takes live entries from the hub.
struct Tail {
    bus: RedisBus,
    stream: String,
    key: String,
    /// Last id delivered (or to start after).
    cursor: EventId,
    /// Entries from the hub, when registered with it.
    live: Option<mpsc::Receiver<Event>>,
    /// Reading the stream itself until it has nothing newer than the cursor.
    catching_up: bool,
    /// Events read by `start`, not yet handed out.
    ready: Vec<Event>,
}

impl Tail {
    /// Joins the hub and reads the first events, so what is wrong with the cursor (trimmed
    /// away) is known before the tail is handed out.
    async fn start(&mut self) -> Result<()> {
        self.live = Some(self.bus.hub(&self.key).subscribe(&self.key, self.cursor).await);
        let events = self.bus.read(&self.stream, Some(self.cursor), BATCH as usize).await?;
        self.catching_up = events.len() >= BATCH as usize;
        if let Some(last) = events.last() {
            self.cursor = last.id;
        }
        self.ready = events;
        Ok(())
    }

    async fn next_batch(&mut self) -> Result<Vec<Event>> {
        if !self.ready.is_empty() {
            return Ok(std::mem::take(&mut self.ready));
        }
        loop {
            let cursor = self.cursor;
            if self.live.is_none() {
                // Register first, so nothing appended from here on can be missed; the catch-up
                // reads cover what came before, and the cursor drops duplicates.
                self.live = Some(self.bus.hub(&self.key).subscribe(&self.key, cursor).await);
                self.catching_up = true;
            }
            if self.catching_up {
                let events = self.bus.read(&self.stream, Some(cursor), BATCH as usize).await?;
                if events.len() < BATCH as usize {
                    self.catching_up = false;
                }
                if let Some(last) = events.last() {
                    self.cursor = last.id;
                    return Ok(events);
                }
                continue;
            }
            let Some(live) = &mut self.live else { continue };
            match live.recv().await {
                Some(event) if event.id > cursor => {
                    let mut events = vec![event];
                    while events.len() < BATCH as usize {
                        let Ok(more) = live.try_recv() else { break };
                        if more.id > events.last().map_or(cursor, |e| e.id) {
                            events.push(more);
                        }
                    }
                    self.cursor = events.last().map_or(cursor, |e| e.id);
                    return Ok(events);
                }
                Some(_) => {}
                // Dropped by the hub (this tail fell behind): catch up from the stream.
                None => self.live = None,
            }
        }
    }
}

/// The process-wide reader behind every tail.
struct Hub {
    reader: fred::clients::Client,
    keys: Mutex<HashMap<String, Subscribers>>,
    wake: Notify,
    /// Counts keys added to `keys`.
    added: AtomicU64,
    /// How many of those the read under way (or about to be sent) covers.
    covered: AtomicU64,
    /// Notified each time a read is about to be sent.
    reading: Notify,
}

struct Subscribers {
    cursor: EventId,
    senders: Vec<mpsc::Sender<Event>>,
}

impl Hub {
    async fn subscribe(&self, key: &str, cursor: EventId) -> mpsc::Receiver<Event> {
        let (tx, rx) = mpsc::channel(TAIL_BUFFER);
        let added = {
            let mut keys = lock(&self.keys);
            match keys.get_mut(key) {
                Some(subscribers) => {
                    subscribers.senders.push(tx);
                    None
                }
                None => {
                    keys.insert(key.to_owned(), Subscribers { cursor, senders: vec![tx] });
                    Some(self.added.fetch_add(1, Ordering::SeqCst) + 1)
                }
            }
        };
        if let Some(added) = added {
            self.wake.notify_one();
            let covered = || self.covered.load(Ordering::SeqCst) >= added;
            let grace = tokio::time::Instant::now() + HUB_GRACE;
            while !covered() {
                let next_read = self.reading.notified();
                if covered() || tokio::time::timeout_at(grace, next_read).await.is_err() {
                    break;
                }
            }
            // Interrupt the read under way until one that includes this key replaces it: an
            // interruption that lands between two reads does nothing, and the next read may
            // have been put together before the key was added.
            for _ in 0..100 {
                if self.covered.load(Ordering::SeqCst) >= added {
                    break;
                }
                let _ = self.reader.unblock_self(Some(ClientUnblockFlag::Timeout)).await;
                if self.covered.load(Ordering::SeqCst) >= added {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
        rx
    }

    async fn run(self: Arc<Self>) {
        let mut backoff = Duration::from_millis(100);
        loop {
            if !self.reader.is_connected()
                && let Err(error) = self.reader.init().await
            {
                tracing::warn!(%error, "event bus tail reader cannot connect; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
            // Read before the keys: every key counted here is among them.
            let added = self.added.load(Ordering::SeqCst);
            let (keys, ids): (Vec<String>, Vec<String>) = {
                let mut keys = lock(&self.keys);
                keys.retain(|_, subs| {
                    subs.senders.retain(|tx| !tx.is_closed());
                    !subs.senders.is_empty()
                });
                keys.iter().map(|(k, s)| (k.clone(), s.cursor.to_string())).unzip()
            };
            if keys.is_empty() {
                self.wake.notified().await;
                continue;
            }
            self.covered.store(added, Ordering::SeqCst);
            self.reading.notify_waiters();
            let options = fred::types::config::Options {
                timeout: Some(HUB_BLOCK + Duration::from_secs(10)),
                ..Default::default()
            };
            let reply = self
                .reader
                .with_options(&options)
                .xread::<Value, _, _>(Some(BATCH), Some(HUB_BLOCK.as_millis() as u64), keys, ids)
                .await;
            let reply = match reply {
                Ok(reply) => {
                    backoff = Duration::from_millis(100);
                    reply
                }
                Err(e) if e.kind() == &ErrorKind::Unknown && e.details().contains("UNBLOCKED") => {
                    continue;
                }
                Err(error) => {
                    tracing::warn!(%error, "event bus tail read failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    continue;
                }
            };
            let batches = match parse_read_reply(reply) {
                Ok(batches) => batches,
                Err(error) => {
                    tracing::warn!(%error, "unexpected event bus reply");
                    continue;
                }
            };
            let mut keys = lock(&self.keys);
            for (key, events) in batches {
                let Some(subscribers) = keys.get_mut(&key) else {
                    continue;
                };
                for event in events {
                    if event.id <= subscribers.cursor {
                        continue;
                    }
                    subscribers.cursor = event.id;
                    // A full buffer means a slow reader: drop it; it catches up on its own.
                    subscribers.senders.retain(|tx| tx.try_send(event.clone()).is_ok());
                }
            }
        }
    }
}

/// The entries after an id (`ARGV[1]`, exclusive, at most `ARGV[2]`) and the stream's
/// `max-deleted-entry-id` (see [`capped_append_script`]), `0-0` for a stream never trimmed.
fn read_after_script() -> &'static fred::types::scripts::Script {
    static SCRIPT: OnceLock<fred::types::scripts::Script> = OnceLock::new();
    SCRIPT.get_or_init(|| {
        fred::types::scripts::Script::from_lua(
            r#"
if redis.call('EXISTS', KEYS[1]) == 0 then
  return {'0-0', {}}
end
local info = redis.call('XINFO', 'STREAM', KEYS[1])
local trimmed = '0-0'
for i = 1, #info, 2 do
  if info[i] == 'max-deleted-entry-id' then
    trimmed = info[i + 1]
  end
end
return {trimmed, redis.call('XRANGE', KEYS[1], ARGV[1], '+', 'COUNT', ARGV[2])}
"#,
        )
    })
}

/// XADD with an exact MAXLEN that also records the last trimmed id as the stream's
/// `max-deleted-entry-id` (Redis only tracks XDEL there), so readers resuming from before the
/// kept window are told instead of silently skipping events.
fn capped_append_script() -> &'static fred::types::scripts::Script {
    static SCRIPT: OnceLock<fred::types::scripts::Script> = OnceLock::new();
    SCRIPT.get_or_init(|| {
        fred::types::scripts::Script::from_lua(
            r#"
local cap = tonumber(ARGV[1])
local excess = redis.call('XLEN', KEYS[1]) + 1 - cap
local trimmed = nil
if excess > 0 then
  local old = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', excess)
  if #old > 0 then trimmed = old[#old][1] end
end
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '=', cap, '*', unpack(ARGV, 2))
if trimmed then
  redis.call('XSETID', KEYS[1], id, 'MAXDELETEDID', trimmed)
end
return id
"#,
        )
    })
}

/// XADDs to several streams in one call. Per key, ARGV holds its cap (0: none), its event
/// count, then per event its field count and fields; after a key's events, the trim of
/// `capped_append_script`. Returns the ids per key.
fn append_many_script() -> &'static fred::types::scripts::Script {
    static SCRIPT: OnceLock<fred::types::scripts::Script> = OnceLock::new();
    SCRIPT.get_or_init(|| {
        fred::types::scripts::Script::from_lua(
            r#"
-- ARGV: the number of appends n; with a holder (KEYS[n + 1]): its group, consumer and entry;
-- then a guard flag per append; then per append its cap, its event count and its events.
local n = tonumber(ARGV[1])
local i = 2
if #KEYS > n then
  local ok, entry = pcall(redis.call, 'XPENDING', KEYS[n + 1], ARGV[2], ARGV[4], ARGV[4], 1)
  if not ok or not entry[1] or entry[1][2] ~= ARGV[3] then
    return redis.error_reply('NOTHELD')
  end
  i = 5
end
for k = 1, n do
  if ARGV[i + k - 1] == '1' then
    local last = redis.call('XREVRANGE', KEYS[k], '+', '-', 'COUNT', 1)
    if last[1] then
      local fields = last[1][2]
      for f = 1, #fields, 2 do
        if fields[f] == 'h:sealed' then
          return redis.error_reply('SEALED ' .. k)
        end
      end
    end
  end
end
local result = {}
i = i + n
for k = 1, n do
  local cap = tonumber(ARGV[i])
  local count = tonumber(ARGV[i + 1])
  i = i + 2
  local ids = {}
  for _ = 1, count do
    local fields = tonumber(ARGV[i])
    ids[#ids + 1] = redis.call('XADD', KEYS[k], '*', unpack(ARGV, i + 1, i + fields))
    i = i + 1 + fields
  end
  if cap > 0 and #ids > 0 then
    local excess = redis.call('XLEN', KEYS[k]) - cap
    if excess > 0 then
      local old = redis.call('XRANGE', KEYS[k], '-', '+', 'COUNT', excess)
      redis.call('XTRIM', KEYS[k], 'MAXLEN', '=', cap)
      redis.call('XSETID', KEYS[k], ids[#ids], 'MAXDELETEDID', old[#old][1])
    end
  end
  result[k] = ids
end
return result
"#,
        )
    })
}

/// XCLAIM with no minimum idle time (which restarts the idle time) of the entries still
/// pending for the given consumer, atomically: an entry another consumer took over stays
/// theirs.
fn touch_script() -> &'static fred::types::scripts::Script {
    static SCRIPT: OnceLock<fred::types::scripts::Script> = OnceLock::new();
    SCRIPT.get_or_init(|| {
        fred::types::scripts::Script::from_lua(
            r#"
local held = {}
for i = 3, #ARGV do
  local entry = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)
  if entry[1] and entry[1][2] == ARGV[2] then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'JUSTID')
    held[#held + 1] = ARGV[i]
  end
end
return held
"#,
        )
    })
}

/// XACK of the entries still pending for the given consumer, atomically with the check.
fn ack_held_script() -> &'static fred::types::scripts::Script {
    static SCRIPT: OnceLock<fred::types::scripts::Script> = OnceLock::new();
    SCRIPT.get_or_init(|| {
        fred::types::scripts::Script::from_lua(
            r#"
local acked = 0
for i = 3, #ARGV do
  local entry = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)
  if entry[1] and entry[1][2] == ARGV[2] then
    acked = acked + redis.call('XACK', KEYS[1], ARGV[1], ARGV[i])
  end
end
return acked
"#,
        )
    })
}

/// Makes the entries still pending for the given consumer idle for ARGV[3] ms (claimable at
/// once), keeping their delivery counts.
fn release_script() -> &'static fred::types::scripts::Script {
    static SCRIPT: OnceLock<fred::types::scripts::Script> = OnceLock::new();
    SCRIPT.get_or_init(|| {
        fred::types::scripts::Script::from_lua(
            r#"
local released = 0
for i = 4, #ARGV do
  local entry = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)
  if entry[1] and entry[1][2] == ARGV[2] then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'IDLE', ARGV[3], 'RETRYCOUNT', entry[1][4], 'JUSTID')
    released = released + 1
  end
end
return released
"#,
        )
    })
}

/// The group's info fields by name (RESP2 flat pairs in scripts).
const GROUP_INFO_LUA: &str = r#"
local function group_info(key, name)
  for _, g in ipairs(redis.call('XINFO', 'GROUPS', key)) do
    local info = {}
    for i = 1, #g, 2 do info[g[i]] = g[i + 1] end
    if info['name'] == name then return info end
  end
  return nil
end
"#;

/// {entries never delivered, entries pending} of a group.
fn backlog_script() -> &'static fred::types::scripts::Script {
    static SCRIPT: OnceLock<fred::types::scripts::Script> = OnceLock::new();
    SCRIPT.get_or_init(|| {
        fred::types::scripts::Script::from_lua(format!(
            "{GROUP_INFO_LUA}{}",
            r#"
local info = group_info(KEYS[1], ARGV[1])
if not info then return redis.error_reply('NOGROUP no such group') end
local lag = info['lag']
if type(lag) ~= 'number' then
  lag = #redis.call('XRANGE', KEYS[1], '(' .. info['last-delivered-id'], '+', 'COUNT', 100000)
end
return {lag, info['pending']}
"#
        ))
    })
}

/// Trims the entries older than the oldest pending or undelivered one, and deletes
/// consumers holding nothing that have been idle ARGV[2] ms. Returns how many were trimmed.
fn compact_script() -> &'static fred::types::scripts::Script {
    static SCRIPT: OnceLock<fred::types::scripts::Script> = OnceLock::new();
    SCRIPT.get_or_init(|| {
        fred::types::scripts::Script::from_lua(format!(
            "{GROUP_INFO_LUA}{}",
            r#"
local info = group_info(KEYS[1], ARGV[1])
if not info then return redis.error_reply('NOGROUP no such group') end
local bound = redis.call('XPENDING', KEYS[1], ARGV[1])[2]
if not bound then
  local ms, seq = string.match(info['last-delivered-id'], '(%d+)-(%d+)')
  bound = ms .. '-' .. (tonumber(seq) + 1)
end
local removed = redis.call('XTRIM', KEYS[1], 'MINID', bound)
for _, c in ipairs(redis.call('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])) do
  local consumer = {}
  for i = 1, #c, 2 do consumer[c[i]] = c[i + 1] end
  if consumer['pending'] == 0 and consumer['idle'] >= tonumber(ARGV[2]) then
    redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], consumer['name'])
  end
end
return removed
"#
        ))
    })
}

/// An event as script arguments: its field count, then its fields (payload, headers), ready
/// for `XADD ... unpack(ARGV, ...)`.
fn push_fields(event: NewEvent, args: &mut Vec<Value>) {
    args.push(Value::Integer(2 * (1 + event.headers.len() as i64)));
    args.push(Value::from(PAYLOAD_FIELD));
    args.push(Value::Bytes(event.payload));
    for (name, value) in event.headers {
        args.push(Value::from(format!("{HEADER_PREFIX}{name}")));
        args.push(Value::from(value));
    }
}

/// Escapes the glob characters of a key prefix for SCAN MATCH.
fn escape_glob(prefix: &str) -> String {
    let mut out = String::with_capacity(prefix.len());
    for c in prefix.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

// --- reply parsing (RESP2 shapes) ---

fn text(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s.to_string()),
        Value::Bytes(b) => std::str::from_utf8(b).ok().map(str::to_owned),
        Value::Integer(i) => Some(i.to_string()),
        _ => None,
    }
}

fn integer(value: &Value) -> Option<i64> {
    match value {
        Value::Integer(i) => Some(*i),
        other => text(other).and_then(|t| t.parse().ok()),
    }
}

fn bytes_of(value: Value) -> Bytes {
    match value {
        Value::Bytes(b) => b,
        Value::String(s) => s.into_inner(),
        Value::Integer(i) => Bytes::from(i.to_string()),
        _ => Bytes::new(),
    }
}

fn bad_reply(what: &str) -> BusError {
    BusError::Unavailable(format!("unexpected reply: {what}"))
}

/// `[[id, [field, value, ...]], ...]` → events.
fn parse_entries(reply: Value) -> Result<Vec<Event>> {
    let entries = match reply {
        Value::Null => return Ok(Vec::new()),
        Value::Array(entries) => entries,
        _ => return Err(bad_reply("entries")),
    };
    let mut events = Vec::with_capacity(entries.len());
    for entry in entries {
        let Value::Array(mut parts) = entry else {
            return Err(bad_reply("entry"));
        };
        if parts.len() != 2 {
            return Err(bad_reply("entry shape"));
        }
        let fields = parts.pop().unwrap_or(Value::Null);
        let id: EventId = text(&parts[0]).ok_or_else(|| bad_reply("entry id"))?.parse()?;
        let mut headers = BTreeMap::new();
        let mut payload = Bytes::new();
        if let Value::Array(fields) = fields {
            let mut iter = fields.into_iter();
            while let (Some(name), Some(value)) = (iter.next(), iter.next()) {
                let name = text(&name).unwrap_or_default();
                if name == PAYLOAD_FIELD {
                    payload = bytes_of(value);
                } else if let Some(header) = name.strip_prefix(HEADER_PREFIX) {
                    headers.insert(header.to_owned(), text(&value).unwrap_or_default());
                }
            }
        }
        events.push(Event { id, headers, payload });
    }
    Ok(events)
}

/// `[[key, entries], ...]` (XREAD / XREADGROUP) → (key, events) per stream.
fn parse_read_reply(reply: Value) -> Result<Vec<(String, Vec<Event>)>> {
    let streams = match reply {
        Value::Null => return Ok(Vec::new()),
        Value::Array(streams) => streams,
        Value::Map(map) => {
            let mut out = Vec::new();
            for (key, entries) in map.inner() {
                let key = key.as_str().map(|k| k.to_string()).ok_or_else(|| bad_reply("stream key"))?;
                out.push((key, parse_entries(entries)?));
            }
            return Ok(out);
        }
        _ => return Err(bad_reply("read")),
    };
    let mut out = Vec::with_capacity(streams.len());
    for stream in streams {
        let Value::Array(mut parts) = stream else {
            return Err(bad_reply("stream"));
        };
        if parts.len() != 2 {
            return Err(bad_reply("stream shape"));
        }
        let entries = parts.pop().unwrap_or(Value::Null);
        let key = text(&parts[0]).ok_or_else(|| bad_reply("stream key"))?;
        out.push((key, parse_entries(entries)?));
    }
    Ok(out)
}
