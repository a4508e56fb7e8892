//! The in-process bus of the embedded default: the semantics of Redis streams, in memory.

mod roster;

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::{self, BoxStream, StreamExt as _};
use tokio::sync::watch;

use crate::{
    Adjust, Append, Backlog, BusError, Claim, Counters, Delivery, Event, EventBus, EventId, GroupStart,
    Holder, NewEvent, PendingSummary, Rate, Reserved, Result, Throttled,
};

/// Batch size of a tail's reads.
const TAIL_BATCH: usize = 256;

/// An in-process [`EventBus`]. Clones share the same streams.
#[derive(Clone, Default)]
pub struct MemoryBus {
    streams: Arc<Mutex<HashMap<String, StreamState>>>,
    counters: Arc<Mutex<HashMap<String, (u64, Instant)>>>,
    /// Token buckets: when each will next be full (ms since the Unix epoch, fractional).
    buckets: Arc<Mutex<HashMap<String, f64>>>,
    /// Lease index per roster kind: `(roster, member)` → expiry (ms since the epoch). Locked
    /// after `streams` when both are needed.
    leases: Arc<Mutex<roster::Leases>>,
}

impl std::fmt::Debug for MemoryBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryBus").finish_non_exhaustive()
    }
}

struct StreamState {
    entries: VecDeque<Event>,
    last_id: EventId,
    /// The greatest id trimmed away by a cap (ZERO if none).
    max_deleted: EventId,
    groups: HashMap<String, GroupState>,
    /// Publishes the last id, waking tails and blocked group readers.
    notify: watch::Sender<EventId>,
    /// The roster table of the stream's name (see [`crate::roster`]).
    members: HashMap<String, Bytes>,
    /// The roster's relay marks.
    marks: BTreeMap<String, crate::roster::Mark>,
}

impl StreamState {
    fn new() -> Self {
        Self {
            entries: VecDeque::new(),
            last_id: EventId::ZERO,
            max_deleted: EventId::ZERO,
            groups: HashMap::new(),
            notify: watch::channel(EventId::ZERO).0,
            members: HashMap::new(),
            marks: BTreeMap::new(),
        }
    }

    /// Index of the first entry with an id greater than `after`.
    fn first_after(&self, after: EventId) -> usize {
        self.entries.partition_point(|e| e.id <= after)
    }

    fn get(&self, id: EventId) -> Option<&Event> {
        let index = self.entries.partition_point(|e| e.id < id);
        self.entries.get(index).filter(|e| e.id == id)
    }

    fn check_not_truncated(&self, stream: &str, after: EventId) -> Result<()> {
        if after < self.max_deleted {
            return Err(BusError::Truncated {
                stream: stream.to_owned(),
                after,
                trimmed_up_to: self.max_deleted,
            });
        }
        Ok(())
    }
}

struct GroupState {
    last_delivered: EventId,
    pending: BTreeMap<EventId, PendingEntry>,
}

struct PendingEntry {
    consumer: String,
    /// When it was last delivered or renewed; `None` once given back (idle for ever).
    delivered_at: Option<Instant>,
    deliveries: u64,
}

impl PendingEntry {
    fn idle_for(&self, now: Instant, min_idle: Duration) -> bool {
        self.delivered_at.is_none_or(|at| now.duration_since(at) >= min_idle)
    }
}

impl MemoryBus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, StreamState>> {
        match self.streams.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// A receiver that changes whenever `stream` gets an event (creating the stream if needed).
    fn subscribe(&self, stream: &str) -> watch::Receiver<EventId> {
        self.lock().entry(stream.to_owned()).or_insert_with(StreamState::new).notify.subscribe()
    }

    fn read_now(&self, stream: &str, after: Option<EventId>, limit: usize) -> Result<Vec<Event>> {
        let streams = self.lock();
        let Some(state) = streams.get(stream) else {
            return Ok(Vec::new());
        };
        let start = match after {
            Some(after) => {
                state.check_not_truncated(stream, after)?;
                state.first_after(after)
            }
            None => 0,
        };
        Ok(state.entries.iter().skip(start).take(limit).cloned().collect())
    }

    fn read_group_now(
        &self,
        stream: &str,
        group: &str,
        consumer: &str,
        limit: usize,
    ) -> Result<Vec<Delivery>> {
        let mut streams = self.lock();
        let no_group = || BusError::NoGroup { stream: stream.to_owned(), group: group.to_owned() };
        let state = streams.get_mut(stream).ok_or_else(no_group)?;
        let start = state.first_after(state.groups.get(group).ok_or_else(no_group)?.last_delivered);
        let events: Vec<Event> = state.entries.iter().skip(start).take(limit).cloned().collect();
        let group_state = state.groups.get_mut(group).ok_or_else(no_group)?;
        let now = Instant::now();
        let mut out = Vec::with_capacity(events.len());
        for event in events {
            group_state.last_delivered = event.id;
            group_state.pending.insert(
                event.id,
                PendingEntry { consumer: consumer.to_owned(), delivered_at: Some(now), deliveries: 1 },
            );
            out.push(Delivery { event, deliveries: 1 });
        }
        Ok(out)
    }
}

impl MemoryBus {
    fn counters(&self) -> MutexGuard<'_, HashMap<String, (u64, Instant)>> {
        let mut guard = match self.counters.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        // Expired keys go on the way in; the map stays as small as the live keys.
        if guard.len() > 1024 {
            let now = Instant::now();
            guard.retain(|_, (_, expires)| *expires > now);
        }
        guard
    }

    fn live(&self, key: &str) -> Option<(u64, Instant)> {
        let mut counters = self.counters();
        match counters.get(key) {
            Some((_, expires)) if *expires <= Instant::now() => {
                counters.remove(key);
                None
            }
            other => other.copied(),
        }
    }
}

#[async_trait]
impl Counters for MemoryBus {
    async fn hit(&self, key: &str, window: Duration) -> Result<u64> {
        self.add(key, 1, window).await
    }

    async fn add(&self, key: &str, amount: u64, window: Duration) -> Result<u64> {
        let now = Instant::now();
        let mut counters = self.counters();
        let entry = counters.entry(key.to_owned()).or_insert((0, now + window));
        if entry.1 <= now {
            *entry = (0, now + window);
        }
        entry.0 += amount;
        Ok(entry.0)
    }

    async fn count(&self, key: &str) -> Result<u64> {
        Ok(self.live(key).map_or(0, |(n, _)| n))
    }

    async fn ttl(&self, key: &str) -> Result<Option<Duration>> {
        Ok(self.live(key).map(|(_, expires)| expires.saturating_duration_since(Instant::now())))
    }

    async fn set(&self, key: &str, value: u64, ttl: Duration) -> Result<()> {
        self.counters().insert(key.to_owned(), (value, Instant::now() + ttl));
        Ok(())
    }

    async fn reset(&self, key: &str) -> Result<()> {
        self.counters().remove(key);
        Ok(())
    }

    async fn reserve(&self, claims: &[Claim]) -> Result<Reserved> {
        let now = Instant::now();
        let mut counters = self.counters();
        let current = |counters: &HashMap<String, (u64, Instant)>, key: &str| match counters.get(key) {
            Some((n, expires)) if *expires > now => *n,
            _ => 0,
        };
        if let Some(refused) =
            claims.iter().position(|c| current(&counters, &c.key).saturating_add(c.amount) > c.limit)
        {
            return Ok(Reserved::Refused(refused));
        }
        for claim in claims {
            let entry = counters.entry(claim.key.clone()).or_insert((0, now + claim.ttl));
            if entry.1 <= now {
                *entry = (0, now + claim.ttl);
            }
            entry.0 += claim.amount;
        }
        Ok(Reserved::Granted)
    }

    async fn adjust(&self, changes: &[Adjust]) -> Result<()> {
        let now = Instant::now();
        let mut counters = self.counters();
        for change in changes {
            let entry = counters.entry(change.key.clone()).or_insert((0, now + change.ttl));
            if entry.1 <= now {
                *entry = (0, now + change.ttl);
            }
            entry.0 = entry.0.saturating_add_signed(change.delta);
        }
        Ok(())
    }

    async fn throttle(&self, key: &str, rate: Rate) -> Result<Throttled> {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64() * 1000.0);
        let mut buckets = self.buckets.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        // Full buckets go on the way in; the map stays as small as the buckets in use.
        if buckets.len() > 1024 {
            buckets.retain(|_, full_at| *full_at > now);
        }
        let tat = buckets.get(key).copied().unwrap_or(0.0);
        match crate::gcra(rate, tat, now) {
            Ok(tat) => {
                buckets.insert(key.to_owned(), tat);
                Ok(Throttled::Allowed)
            }
            Err(wait_ms) => Ok(Throttled::Wait(Duration::from_secs_f64(wait_ms / 1000.0))),
        }
    }
}

/// Appends `events` to `stream` under the bus's lock.
fn append_locked(
    streams: &mut HashMap<String, StreamState>,
    stream: &str,
    events: Vec<NewEvent>,
    cap: Option<u64>,
) -> Vec<EventId> {
    let state = streams.entry(stream.to_owned()).or_insert_with(StreamState::new);
    let mut ids = Vec::with_capacity(events.len());
    for event in events {
        let ms = now_ms().max(state.last_id.ms);
        let id = if ms == state.last_id.ms {
            EventId::new(ms, state.last_id.seq + 1)
        } else {
            EventId::new(ms, 0)
        };
        state.last_id = id;
        state.entries.push_back(Event { id, headers: event.headers, payload: event.payload });
        ids.push(id);
    }
    let Some(&id) = ids.last() else { return ids };
    if let Some(cap) = cap {
        while state.entries.len() as u64 > cap {
            if let Some(trimmed) = state.entries.pop_front() {
                state.max_deleted = trimmed.id;
            }
        }
    }
    state.notify.send_replace(id);
    ids
}

/// Appends after checking, atomically (under the lock), that `holder` holds its entry and
/// that no guarded stream is sealed.
fn append_checked(
    streams: &mut HashMap<String, StreamState>,
    holder: Option<&Holder>,
    appends: Vec<Append>,
) -> Result<Vec<Vec<EventId>>> {
    if let Some(holder) = holder {
        let held = streams
            .get(&holder.stream)
            .and_then(|s| s.groups.get(&holder.group))
            .and_then(|g| g.pending.get(&holder.id))
            .is_some_and(|entry| entry.consumer == holder.consumer);
        if !held {
            return Err(BusError::NotHeld { stream: holder.stream.clone(), id: holder.id });
        }
    }
    if let Some(sealed) = appends.iter().find(|a| {
        a.guarded
            && streams
                .get(&a.stream)
                .and_then(|s| s.entries.back())
                .is_some_and(|last| last.headers.contains_key(crate::SEALED_HEADER))
    }) {
        return Err(BusError::Sealed { stream: sealed.stream.clone() });
    }
    Ok(appends
        .into_iter()
        .map(|append| append_locked(streams, &append.stream, append.events, append.cap))
        .collect())
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

#[async_trait]
impl EventBus for MemoryBus {
    fn backend(&self) -> &'static str {
        "memory"
    }

    async fn append(&self, stream: &str, event: NewEvent, cap: Option<u64>) -> Result<EventId> {
        let ids = self.append_all(stream, vec![event], cap).await?;
        Ok(ids.first().copied().unwrap_or_default())
    }

    async fn append_all(
        &self,
        stream: &str,
        events: Vec<NewEvent>,
        cap: Option<u64>,
    ) -> Result<Vec<EventId>> {
        Ok(append_locked(&mut self.lock(), stream, events, cap))
    }

    async fn append_many(&self, appends: Vec<Append>) -> Result<Vec<Vec<EventId>>> {
        append_checked(&mut self.lock(), None, appends)
    }

    async fn append_held(&self, holder: &Holder, appends: Vec<Append>) -> Result<Vec<Vec<EventId>>> {
        append_checked(&mut self.lock(), Some(holder), appends)
    }

    async fn read(&self, stream: &str, after: Option<EventId>, limit: usize) -> Result<Vec<Event>> {
        self.read_now(stream, after, limit)
    }

    async fn last_id(&self, stream: &str) -> Result<Option<EventId>> {
        Ok(self.lock().get(stream).and_then(|s| s.entries.back().map(|e| e.id)))
    }

    async fn len(&self, stream: &str) -> Result<u64> {
        Ok(self.lock().get(stream).map_or(0, |s| s.entries.len() as u64))
    }

    async fn delete(&self, stream: &str) -> Result<()> {
        self.lock().remove(stream);
        Ok(())
    }

    async fn tail(&self, stream: &str, after: Option<EventId>) -> Result<BoxStream<'static, Result<Event>>> {
        let bus = self.clone();
        let stream_name = stream.to_owned();
        let mut changes = self.subscribe(stream);
        // "From now on" is resolved when the tail is created, not when it is first polled.
        let start = after.unwrap_or_else(|| *changes.borrow_and_update());
        // The first events now: a resume from before what is kept fails here.
        let first = self.read_now(stream, Some(start), TAIL_BATCH)?;
        let start = first.last().map_or(start, |e| e.id);
        let first = stream::iter(first.into_iter().map(Ok));
        Ok(first
            .chain(
                stream::unfold(Some((start, changes)), move |state| {
                    let bus = bus.clone();
                    let stream_name = stream_name.clone();
                    async move {
                        let (mut cursor, mut changes) = state?;
                        loop {
                            match bus.read_now(&stream_name, Some(cursor), TAIL_BATCH) {
                                Err(e) => return Some((stream::iter(vec![Err(e)]), None)),
                                Ok(events) if !events.is_empty() => {
                                    cursor = events.last().map_or(cursor, |e| e.id);
                                    let items: Vec<Result<Event>> = events.into_iter().map(Ok).collect();
                                    return Some((stream::iter(items), Some((cursor, changes))));
                                }
                                Ok(_) => {
                                    if changes.changed().await.is_err() {
                                        // The stream was deleted: start over on a fresh one.
                                        changes = bus.subscribe(&stream_name);
                                    }
                                }
                            }
                        }
                    }
                })
                .flatten(),
            )
            .boxed())
    }

    async fn create_group(&self, stream: &str, group: &str, start: GroupStart) -> Result<()> {
        let mut streams = self.lock();
        let state = streams.entry(stream.to_owned()).or_insert_with(StreamState::new);
        let last_delivered = match start {
            GroupStart::Beginning => EventId::ZERO,
            GroupStart::End => state.last_id,
        };
        state
            .groups
            .entry(group.to_owned())
            .or_insert_with(|| GroupState { last_delivered, pending: BTreeMap::new() });
        Ok(())
    }

    async fn read_group(
        &self,
        stream: &str,
        group: &str,
        consumer: &str,
        limit: usize,
        block: Duration,
    ) -> Result<Vec<Delivery>> {
        let deadline = tokio::time::Instant::now() + block;
        let mut changes = self.subscribe(stream);
        loop {
            changes.borrow_and_update();
            let delivered = self.read_group_now(stream, group, consumer, limit)?;
            if !delivered.is_empty() {
                return Ok(delivered);
            }
            match tokio::time::timeout_at(deadline, changes.changed()).await {
                Ok(Ok(())) => continue,
                Ok(Err(_)) => changes = self.subscribe(stream),
                Err(_) => return Ok(Vec::new()),
            }
        }
    }

    async fn ack(&self, stream: &str, group: &str, ids: &[EventId]) -> Result<u64> {
        let mut streams = self.lock();
        let Some(group_state) = streams.get_mut(stream).and_then(|s| s.groups.get_mut(group)) else {
            return Ok(0);
        };
        Ok(ids.iter().filter(|id| group_state.pending.remove(id).is_some()).count() as u64)
    }

    async fn ack_held(&self, stream: &str, group: &str, consumer: &str, ids: &[EventId]) -> Result<u64> {
        let mut streams = self.lock();
        let Some(group_state) = streams.get_mut(stream).and_then(|s| s.groups.get_mut(group)) else {
            return Ok(0);
        };
        let mut acked = 0;
        for id in ids {
            if group_state.pending.get(id).is_some_and(|entry| entry.consumer == consumer) {
                group_state.pending.remove(id);
                acked += 1;
            }
        }
        Ok(acked)
    }

    async fn release(&self, stream: &str, group: &str, consumer: &str, ids: &[EventId]) -> Result<u64> {
        let mut streams = self.lock();
        let Some(group_state) = streams.get_mut(stream).and_then(|s| s.groups.get_mut(group)) else {
            return Err(BusError::NoGroup { stream: stream.to_owned(), group: group.to_owned() });
        };
        let mut released = 0;
        for id in ids {
            if let Some(entry) = group_state.pending.get_mut(id)
                && entry.consumer == consumer
            {
                entry.delivered_at = None;
                released += 1;
            }
        }
        Ok(released)
    }

    async fn touch(
        &self,
        stream: &str,
        group: &str,
        consumer: &str,
        ids: &[EventId],
    ) -> Result<Vec<EventId>> {
        let mut streams = self.lock();
        let Some(group_state) = streams.get_mut(stream).and_then(|s| s.groups.get_mut(group)) else {
            return Err(BusError::NoGroup { stream: stream.to_owned(), group: group.to_owned() });
        };
        let now = Instant::now();
        let mut held = Vec::new();
        for id in ids {
            if let Some(entry) = group_state.pending.get_mut(id)
                && entry.consumer == consumer
            {
                entry.delivered_at = Some(now);
                held.push(*id);
            }
        }
        Ok(held)
    }

    async fn claim_idle(
        &self,
        stream: &str,
        group: &str,
        consumer: &str,
        min_idle: Duration,
        limit: usize,
    ) -> Result<Vec<Delivery>> {
        let mut streams = self.lock();
        let no_group = || BusError::NoGroup { stream: stream.to_owned(), group: group.to_owned() };
        let state = streams.get_mut(stream).ok_or_else(no_group)?;
        let now = Instant::now();
        let idle_ids: Vec<EventId> = state
            .groups
            .get(group)
            .ok_or_else(no_group)?
            .pending
            .iter()
            .filter(|(_, p)| p.idle_for(now, min_idle))
            .map(|(id, _)| *id)
            .collect();
        let mut claimed = Vec::new();
        let mut vanished = Vec::new();
        for id in idle_ids {
            if claimed.len() >= limit {
                break;
            }
            match state.get(id) {
                Some(event) => claimed.push(event.clone()),
                None => vanished.push(id),
            }
        }
        let group_state = state.groups.get_mut(group).ok_or_else(no_group)?;
        // Like Redis 7: entries trimmed from the stream leave the pending list when met.
        for id in vanished {
            group_state.pending.remove(&id);
        }
        let mut out = Vec::with_capacity(claimed.len());
        for event in claimed {
            if let Some(entry) = group_state.pending.get_mut(&event.id) {
                entry.consumer = consumer.to_owned();
                entry.delivered_at = Some(now);
                entry.deliveries += 1;
                out.push(Delivery { deliveries: entry.deliveries, event });
            }
        }
        Ok(out)
    }

    async fn pending(&self, stream: &str, group: &str) -> Result<PendingSummary> {
        let streams = self.lock();
        let group_state = streams
            .get(stream)
            .and_then(|s| s.groups.get(group))
            .ok_or_else(|| BusError::NoGroup { stream: stream.to_owned(), group: group.to_owned() })?;
        let mut summary = PendingSummary { count: group_state.pending.len() as u64, ..Default::default() };
        for entry in group_state.pending.values() {
            *summary.consumers.entry(entry.consumer.clone()).or_default() += 1;
        }
        Ok(summary)
    }

    async fn backlog(&self, stream: &str, group: &str) -> Result<Backlog> {
        let streams = self.lock();
        let no_group = || BusError::NoGroup { stream: stream.to_owned(), group: group.to_owned() };
        let state = streams.get(stream).ok_or_else(no_group)?;
        let group_state = state.groups.get(group).ok_or_else(no_group)?;
        let waiting = state.entries.len() - state.first_after(group_state.last_delivered);
        Ok(Backlog { waiting: waiting as u64, pending: group_state.pending.len() as u64 })
    }

    async fn compact(&self, stream: &str, group: &str, _idle: Duration) -> Result<u64> {
        let mut streams = self.lock();
        let no_group = || BusError::NoGroup { stream: stream.to_owned(), group: group.to_owned() };
        let state = streams.get_mut(stream).ok_or_else(no_group)?;
        let group_state = state.groups.get(group).ok_or_else(no_group)?;
        // Everything before the oldest pending entry, and up to the last delivered one.
        let keep_from = group_state.pending.keys().next().copied();
        let last_delivered = group_state.last_delivered;
        let mut removed = 0;
        while let Some(front) = state.entries.front() {
            let done = front.id <= last_delivered && keep_from.is_none_or(|oldest| front.id < oldest);
            if !done {
                break;
            }
            if let Some(gone) = state.entries.pop_front() {
                state.max_deleted = gone.id;
                removed += 1;
            }
        }
        // Consumers exist here only through their pending entries: nothing more to forget.
        Ok(removed)
    }

    async fn ping(&self) -> Result<()> {
        Ok(())
    }
}
