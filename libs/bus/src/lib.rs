//! The event bus: append-only, capped streams of events, with resumable readers and consumer
//! groups.
//!
//! Execution events, design changes and collaboration presence travel on named streams; the
//! executor's job queue is a stream read by a consumer group. [`EventBus`] has two backends
//! with the same semantics (one conformance suite runs against both):
//!
//! - [`RedisBus`]: Redis streams (XADD / XRANGE / XREAD / XREADGROUP / XACK / XAUTOCLAIM) —
//!   the distributed mode, shared by every replica;
//! - [`MemoryBus`]: in-process — the embedded default, shared by the services of one
//!   `csp serve --target all`.
//!
//! Semantics:
//! - [`EventId`]s are `<milliseconds>-<sequence>` and strictly increase within a stream.
//! - `append` with a cap trims the oldest entries so at most `cap` remain. A reader resuming
//!   from an id whose successors were trimmed gets [`BusError::Truncated`] instead of silently
//!   missing events.
//! - `read` and `tail` return the events strictly after an id, in order, each once.
//! - A consumer group delivers each new entry to exactly one consumer; entries stay pending
//!   until acknowledged, and `claim_idle` hands entries pending longer than an idle time (a
//!   consumer that died) to another consumer, counting deliveries.
//!
//! The same backends hold [`Counters`]: integers with a time to live, for lockouts and rate
//! limits (Redis `INCR` + `PEXPIRE` in one script; a map in memory), and [`roster`]s: a stream
//! with a table of leased members changed together with it (who is in a collaboration
//! session), and relay marks for copying another stream's events in exactly once.

use std::{collections::BTreeMap, fmt, str::FromStr, sync::Arc, time::Duration};

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;

mod memory;
mod redis;
pub mod revocations;
pub mod roster;

pub use memory::MemoryBus;
pub use redis::RedisBus;
pub use roster::Rosters;

/// The position of an event in its stream: `<milliseconds>-<sequence>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct EventId {
    /// Milliseconds since the Unix epoch when the event was appended (monotonic per stream).
    pub ms: u64,
    /// Sequence within the millisecond.
    pub seq: u64,
}

impl EventId {
    /// Before every event: reading after it reads from the beginning.
    pub const ZERO: EventId = EventId { ms: 0, seq: 0 };

    /// An id from its parts.
    pub const fn new(ms: u64, seq: u64) -> Self {
        Self { ms, seq }
    }
}

impl fmt::Display for EventId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.ms, self.seq)
    }
}

impl FromStr for EventId {
    type Err = BusError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || BusError::InvalidId(s.to_owned());
        let (ms, seq) = match s.split_once('-') {
            Some((ms, seq)) => (ms, seq),
            None => (s, "0"),
        };
        Ok(EventId { ms: ms.parse().map_err(|_| bad())?, seq: seq.parse().map_err(|_| bad())? })
    }
}

/// An event to append.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NewEvent {
    /// Small string attributes: the event kind, trace context (`traceparent`), ...
    pub headers: BTreeMap<String, String>,
    /// The body, usually an encoded protobuf message.
    pub payload: Bytes,
}

impl NewEvent {
    /// An event with this payload and no headers.
    pub fn new(payload: impl Into<Bytes>) -> Self {
        Self { headers: BTreeMap::new(), payload: payload.into() }
    }

    /// Adds a header.
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.insert(name.into(), value.into());
        self
    }

    /// Adds the current span's W3C trace context (`traceparent`, `tracestate`).
    pub fn with_trace_context(mut self) -> Self {
        csp_platform::telemetry::inject_context(&mut csp_platform::telemetry::MapCarrier(&mut self.headers));
        self
    }
}

/// The header that seals a stream (see [`NewEvent::sealing`]).
pub const SEALED_HEADER: &str = "sealed";

impl NewEvent {
    /// Marks this event as its stream's last: while it is the newest event of its stream,
    /// guarded appends ([`Append::unless_sealed`]) to the stream are refused with
    /// [`BusError::Sealed`]. An execution's final status seals its stream, so that however
    /// many replicas believe they finished it, one final status lands.
    pub fn sealing(self) -> Self {
        self.header(SEALED_HEADER, "1")
    }

    /// Whether this event seals its stream.
    pub fn seals(&self) -> bool {
        self.headers.contains_key(SEALED_HEADER)
    }
}

/// Events to append to one stream, for [`EventBus::append_many`].
#[derive(Debug, Clone)]
pub struct Append {
    /// The stream.
    pub stream: String,
    /// The events, in order.
    pub events: Vec<NewEvent>,
    /// Trim the stream to at most this many events afterwards.
    pub cap: Option<u64>,
    /// Refuse the whole call if the stream is sealed (its newest event seals it).
    pub guarded: bool,
}

impl Append {
    /// `events` for `stream`, trimmed to `cap` when given.
    pub fn new(stream: impl Into<String>, events: Vec<NewEvent>, cap: Option<u64>) -> Self {
        Self { stream: stream.into(), events, cap, guarded: false }
    }

    /// Refuses the whole [`EventBus::append_many`] call, appending nothing anywhere, when
    /// this stream is sealed: it fails with [`BusError::Sealed`].
    pub fn unless_sealed(mut self) -> Self {
        self.guarded = true;
        self
    }
}

/// An entry of a consumer group held by one consumer: appends made on condition that it
/// still is ([`EventBus::append_held`]). A job's events are published this way, so that a
/// replica that lost the job (paused past its lease while another took it over) cannot
/// publish any more of them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    /// The group's stream.
    pub stream: String,
    /// The group.
    pub group: String,
    /// The consumer that must hold the entry.
    pub consumer: String,
    /// The entry.
    pub id: EventId,
}

/// An event read from a stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// Its position.
    pub id: EventId,
    /// Its headers.
    pub headers: BTreeMap<String, String>,
    /// Its body.
    pub payload: Bytes,
}

impl Event {
    /// Makes `span` a child of the trace context the event carries.
    pub fn follow_trace(&self, span: &tracing::Span) {
        csp_platform::telemetry::set_parent_from(span, &csp_platform::telemetry::MapExtractor(&self.headers));
    }
}

/// An event delivered to a consumer of a group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    /// The event.
    pub event: Event,
    /// How many times it has been delivered (1 the first time; more after claims).
    pub deliveries: u64,
}

/// Where a new consumer group starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupStart {
    /// With the first event of the stream.
    Beginning,
    /// With the next event appended.
    End,
}

/// How much work a consumer group has: entries not delivered yet, and delivered but not
/// acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Backlog {
    /// Entries never delivered to the group.
    pub waiting: u64,
    /// Entries delivered and not acknowledged.
    pub pending: u64,
}

/// Summary of a consumer group's pending entries.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PendingSummary {
    /// Entries delivered but not acknowledged.
    pub count: u64,
    /// Pending entries per consumer.
    pub consumers: BTreeMap<String, u64>,
}

/// Why a bus operation failed.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// The text is not an event id.
    #[error("`{0}` is not an event id (expected <milliseconds>-<sequence>)")]
    InvalidId(String),
    /// Events after the requested id were trimmed away by the stream's cap.
    #[error("events of {stream} after {after} are no longer kept (oldest kept follows {trimmed_up_to})")]
    Truncated {
        /// The stream.
        stream: String,
        /// The id the reader asked to resume after.
        after: EventId,
        /// The last id trimmed away.
        trimmed_up_to: EventId,
    },
    /// The consumer group does not exist.
    #[error("consumer group {group} of {stream} does not exist")]
    NoGroup {
        /// The stream.
        stream: String,
        /// The group.
        group: String,
    },
    /// The entry an append was conditioned on is no longer held by the consumer (see
    /// [`EventBus::append_held`]); nothing was appended.
    #[error("entry {id} of {stream} is no longer held by this consumer")]
    NotHeld {
        /// The group's stream.
        stream: String,
        /// The entry.
        id: EventId,
    },
    /// A guarded append met a sealed stream (see [`NewEvent::sealing`]); nothing was appended.
    #[error("{stream} is sealed: it takes no more events")]
    Sealed {
        /// The sealed stream.
        stream: String,
    },
    /// The bus could not be reached or answered wrongly.
    #[error("event bus unavailable: {0}")]
    Unavailable(String),
    /// The bus could not be set up.
    #[error("cannot connect to the event bus ({location}): {reason}")]
    Connect {
        /// Where, without secrets.
        location: String,
        /// Why.
        reason: String,
    },
}

/// Result of bus operations.
pub type Result<T, E = BusError> = std::result::Result<T, E>;

/// Counters with a time to live, shared by every replica (lockouts, rate limits).
#[async_trait]
pub trait Counters: Send + Sync + 'static {
    /// Adds one to `key` and returns the new count. A key that did not exist starts at 1 and
    /// lives for `window` (later hits do not extend it): a fixed window.
    async fn hit(&self, key: &str, window: Duration) -> Result<u64>;

    /// Adds `amount` to `key` like [`hit`](Self::hit).
    async fn add(&self, key: &str, amount: u64, window: Duration) -> Result<u64>;

    /// The count of `key`, 0 when absent or expired.
    async fn count(&self, key: &str) -> Result<u64>;

    /// How long `key` still lives, `None` when absent or expired.
    async fn ttl(&self, key: &str) -> Result<Option<Duration>>;

    /// Sets `key` to `value` for `ttl`.
    async fn set(&self, key: &str, value: u64, ttl: Duration) -> Result<()>;

    /// Removes `key`.
    async fn reset(&self, key: &str) -> Result<()>;

    /// Takes `amount` from every claim's counter at once, or from none: refused (with the
    /// index of the first claim whose limit it would pass) when any would pass its limit. A
    /// counter created here lives for its claim's `ttl`. Atomic across every process sharing
    /// the bus, so processes together never pass a limit (reserve-then-settle).
    async fn reserve(&self, claims: &[Claim]) -> Result<Reserved>;

    /// Moves counters by signed amounts (settling reservations: the real amount minus the
    /// reserved one), never below zero. A counter created here lives for its `ttl`.
    async fn adjust(&self, changes: &[Adjust]) -> Result<()>;

    /// Takes one token from the bucket `key`, which holds up to `rate.burst` tokens and gains
    /// `rate.per_second` a second; an empty bucket says how long until its next token. Kept as
    /// one time (the generic cell rate algorithm: when the bucket will next be full), so a
    /// bucket costs one key that expires when full. Atomic across every process sharing the
    /// bus, timed by one clock (Redis's on Redis).
    async fn throttle(&self, key: &str, rate: Rate) -> Result<Throttled>;
}

/// A token bucket's size and refill, for [`Counters::throttle`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    /// Tokens gained per second (above zero).
    pub per_second: f64,
    /// Tokens held at most (at least one).
    pub burst: u32,
}

impl Rate {
    /// Milliseconds between two tokens, and the most a bucket can be behind (in ms).
    fn gcra(self) -> (f64, f64) {
        let interval = 1000.0 / self.per_second.max(1e-6);
        (interval, interval * f64::from(self.burst.max(1)))
    }
}

/// The outcome of [`Counters::throttle`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Throttled {
    /// A token was taken.
    Allowed,
    /// The bucket is empty; its next token comes after this long.
    Wait(Duration),
}

/// The generic cell rate algorithm at `now` (ms) for a bucket whose theoretical arrival time
/// is `tat` (ms; 0 when new): the new `tat` when a token is taken, else the wait in ms.
pub(crate) fn gcra(rate: Rate, tat: f64, now: f64) -> std::result::Result<f64, f64> {
    let (interval, tolerance) = rate.gcra();
    let tat = tat.max(now);
    let allow_at = tat + interval - tolerance;
    if now >= allow_at { Ok(tat + interval) } else { Err(allow_at - now) }
}

/// A share of a limited counter, for [`Counters::reserve`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    /// The counter.
    pub key: String,
    /// How much to take.
    pub amount: u64,
    /// The counter may not go above this.
    pub limit: u64,
    /// How long a counter created by this claim lives.
    pub ttl: Duration,
}

/// A signed change of a counter, for [`Counters::adjust`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Adjust {
    /// The counter.
    pub key: String,
    /// How much to add (negative: give back).
    pub delta: i64,
    /// How long a counter created by this change lives.
    pub ttl: Duration,
}

/// The outcome of [`Counters::reserve`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reserved {
    /// Every counter took its amount.
    Granted,
    /// Nothing was taken: this claim (by index) would have passed its limit.
    Refused(usize),
}

/// A capped, resumable event log with consumer groups, and shared [`Counters`]. See the crate
/// docs for the semantics.
#[async_trait]
pub trait EventBus: Counters + Rosters {
    /// `redis` or `memory`.
    fn backend(&self) -> &'static str;

    /// Appends an event; with `cap`, trims the stream to at most `cap` events.
    async fn append(&self, stream: &str, event: NewEvent, cap: Option<u64>) -> Result<EventId>;

    /// Appends events in order, in one round trip where the backend allows; with `cap`, trims
    /// the stream to at most `cap` events afterwards. On Redis the batch runs as one script: no
    /// other command runs in between.
    async fn append_all(
        &self,
        stream: &str,
        events: Vec<NewEvent>,
        cap: Option<u64>,
    ) -> Result<Vec<EventId>> {
        let mut ids = Vec::with_capacity(events.len());
        for event in events {
            ids.push(self.append(stream, event, cap).await?);
        }
        Ok(ids)
    }

    /// Appends to several streams in one round trip where the backend allows: each
    /// [`Append`] lands (and is trimmed to its cap) before the next, so a reader of the later
    /// streams that looks at the earlier ones finds them written. On Redis they run as one
    /// script: no other command runs between them, but an append that fails (a key of another
    /// type) leaves those before it in place. Returns the ids per `Append`.
    async fn append_many(&self, appends: Vec<Append>) -> Result<Vec<Vec<EventId>>> {
        let mut ids = Vec::with_capacity(appends.len());
        for append in appends {
            ids.push(self.append_all(&append.stream, append.events, append.cap).await?);
        }
        Ok(ids)
    }

    /// Like [`append_many`](Self::append_many), on condition that `holder` still holds its
    /// entry, checked atomically with the appends: fails with [`BusError::NotHeld`] (and
    /// appends nothing) when another consumer has taken it over or it was acknowledged.
    async fn append_held(&self, holder: &Holder, appends: Vec<Append>) -> Result<Vec<Vec<EventId>>>;

    /// Up to `limit` events strictly after `after`; `None` reads from the oldest event kept.
    /// Fails with [`BusError::Truncated`] when events after `after` were trimmed away.
    async fn read(&self, stream: &str, after: Option<EventId>, limit: usize) -> Result<Vec<Event>>;

    /// The id of the last event, if the stream has any.
    async fn last_id(&self, stream: &str) -> Result<Option<EventId>>;

    /// Number of events kept.
    async fn len(&self, stream: &str) -> Result<u64>;

    /// Deletes a stream with its groups.
    async fn delete(&self, stream: &str) -> Result<()>;

    /// Events strictly after `after`, then live ones as they are appended, forever (drop the
    /// stream to stop). `None` means only events appended from now on. The first events are
    /// read before this returns, so a resume from before what is kept fails here with
    /// [`BusError::Truncated`] (a trim that overtakes the tail later ends the stream with it).
    async fn tail(&self, stream: &str, after: Option<EventId>) -> Result<BoxStream<'static, Result<Event>>>;

    /// Creates a consumer group (and the stream if needed); succeeds if it exists already.
    async fn create_group(&self, stream: &str, group: &str, start: GroupStart) -> Result<()>;

    /// Up to `limit` events never delivered to the group, now pending for `consumer`. Waits
    /// up to `block` for one when there are none.
    async fn read_group(
        &self,
        stream: &str,
        group: &str,
        consumer: &str,
        limit: usize,
        block: Duration,
    ) -> Result<Vec<Delivery>>;

    /// Acknowledges events: they are no longer pending. Returns how many were pending.
    async fn ack(&self, stream: &str, group: &str, ids: &[EventId]) -> Result<u64>;

    /// Acknowledges those of `ids` still pending for `consumer`, atomically with the check:
    /// an entry another consumer has taken over stays pending for it. Returns how many were
    /// acknowledged.
    async fn ack_held(&self, stream: &str, group: &str, consumer: &str, ids: &[EventId]) -> Result<u64>;

    /// Gives back those of `ids` still pending for `consumer`: they stay pending, but are
    /// idle from now on, so the next [`claim_idle`](Self::claim_idle) of any consumer takes
    /// them whatever its idle time. Their delivery counts are kept (the next claim adds one).
    /// Returns how many were given back.
    async fn release(&self, stream: &str, group: &str, consumer: &str, ids: &[EventId]) -> Result<u64>;

    /// Takes over up to `limit` events pending (for any consumer) for at least `min_idle`,
    /// making them pending for `consumer`. Entries trimmed from the stream are dropped.
    async fn claim_idle(
        &self,
        stream: &str,
        group: &str,
        consumer: &str,
        min_idle: Duration,
        limit: usize,
    ) -> Result<Vec<Delivery>>;

    /// Renews `consumer`'s hold on pending entries: their idle time restarts, so
    /// [`claim_idle`](Self::claim_idle) leaves them alone. Entries another consumer has taken
    /// over are not taken back. Returns those of `ids` `consumer` still holds.
    async fn touch(&self, stream: &str, group: &str, consumer: &str, ids: &[EventId])
    -> Result<Vec<EventId>>;

    /// The group's pending entries, per consumer.
    async fn pending(&self, stream: &str, group: &str) -> Result<PendingSummary>;

    /// The group's backlog: entries not delivered yet and entries pending.
    async fn backlog(&self, stream: &str, group: &str) -> Result<Backlog>;

    /// Housekeeping of a queue read by one group: removes the entries every consumer is done
    /// with (older than the oldest pending or undelivered one), and forgets consumers that
    /// hold nothing and have not read for `idle`. Returns how many entries were removed.
    async fn compact(&self, stream: &str, group: &str, idle: Duration) -> Result<u64>;

    /// Checks the bus answers.
    async fn ping(&self) -> Result<()>;
}

/// A shared bus handle.
pub type SharedBus = Arc<dyn EventBus>;

/// The bus the settings ask for: Redis when `redis.url` (or `redis.host`) is set, else a new
/// in-process bus.
pub async fn connect(settings: &csp_platform::Settings) -> Result<SharedBus> {
    let url = settings
        .redis
        .resolved_url()
        .map_err(|e| BusError::Connect { location: "redis".into(), reason: e.to_string() })?;
    match url {
        Some(url) => Ok(Arc::new(
            RedisBus::connect(&url, &settings.redis.key_prefix, settings.redis.connect_timeout).await?,
        )),
        None => Ok(Arc::new(MemoryBus::new())),
    }
}

/// A health probe of a bus.
pub fn probe(bus: SharedBus) -> Arc<dyn csp_platform::health::Probe> {
    Arc::new(BusProbe(bus))
}

struct BusProbe(SharedBus);

#[async_trait]
impl csp_platform::health::Probe for BusProbe {
    fn name(&self) -> &'static str {
        "bus"
    }

    async fn probe(&self) -> std::result::Result<String, String> {
        self.0.ping().await.map_err(|e| e.to_string())?;
        Ok(self.0.backend().to_owned())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn ids_parse_print_and_order() {
        let id: EventId = "1526919030474-55".parse().unwrap();
        assert_eq!(id, EventId::new(1_526_919_030_474, 55));
        assert_eq!(id.to_string(), "1526919030474-55");
        assert_eq!("0".parse::<EventId>().unwrap(), EventId::ZERO);
        assert!(EventId::new(5, 9) < EventId::new(6, 0));
        assert!(EventId::new(5, 1) < EventId::new(5, 2));
        assert!("abc".parse::<EventId>().is_err());
        assert!("1-x".parse::<EventId>().is_err());
    }
}
