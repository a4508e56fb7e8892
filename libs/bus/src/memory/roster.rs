//! Rosters in memory: the table and marks live beside the stream of the same name, under the
//! bus's lock, so a change and its event land together as on Redis. Keys do not expire
//! (`RosterLimits::idle` is ignored): the process's lifetime bounds them.

use std::{
    collections::{BTreeMap, HashMap},
    sync::MutexGuard,
};

use async_trait::async_trait;
use bytes::Bytes;

use super::{MemoryBus, StreamState, append_locked, now_ms};
use crate::{
    Result,
    roster::{
        Applied, Change, Mark, Member, Op, Relay, Relayed, RosterLimits, RosterSnapshot, Rosters, kind_of,
    },
};

/// Per roster kind: `(roster, member)` → expiry (ms since the epoch).
pub(super) type Leases = HashMap<String, HashMap<(String, String), u64>>;

impl MemoryBus {
    fn leases(&self) -> MutexGuard<'_, Leases> {
        match self.leases.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        }
    }
}

fn expiry(leases: &Leases, roster: &str, member: &str) -> Option<u64> {
    leases.get(kind_of(roster))?.get(&(roster.to_owned(), member.to_owned())).copied()
}

#[async_trait]
impl Rosters for MemoryBus {
    async fn roster_apply(&self, roster: &str, ops: Vec<Op>, limits: &RosterLimits) -> Result<Vec<Applied>> {
        let mut streams = self.lock();
        let mut leases = self.leases();
        let now = now_ms();
        let mut out = Vec::with_capacity(ops.len());
        for op in ops {
            let key = (roster.to_owned(), op.change.member().to_owned());
            let index = leases.entry(kind_of(roster).to_owned()).or_default();
            let state = streams.entry(roster.to_owned()).or_insert_with(StreamState::new);
            let present = state.members.contains_key(&key.1);
            let (applied, keeps_lease) = match op.change {
                Change::Put { member, value } => {
                    state.members.insert(member, value);
                    (true, true)
                }
                Change::Update { member, value } => match state.members.get_mut(&member) {
                    Some(slot) => {
                        *slot = value;
                        (true, true)
                    }
                    None => (false, false),
                },
                Change::Renew { .. } => (present, true),
                Change::Remove { member } => {
                    let removed = state.members.remove(&member).is_some();
                    if removed {
                        index.remove(&key);
                    }
                    (removed, false)
                }
                Change::Expire { member } => {
                    let lapsed = index.get(&key).is_some_and(|at| *at <= now);
                    if !present {
                        index.remove(&key);
                        (false, false)
                    } else if lapsed {
                        state.members.remove(&member);
                        index.remove(&key);
                        (true, false)
                    } else {
                        (false, false)
                    }
                }
            };
            let mut expires_at_ms = None;
            if applied && keeps_lease {
                if let Some(lease) = op.lease {
                    index.insert(key.clone(), now + lease.as_millis().max(1) as u64);
                }
                expires_at_ms = index.get(&key).copied();
            }
            let event = match op.event {
                Some(event) if applied => {
                    append_locked(&mut streams, roster, vec![event], Some(limits.cap.max(1))).first().copied()
                }
                _ => None,
            };
            out.push(Applied { applied, event, expires_at_ms });
        }
        Ok(out)
    }

    async fn roster_member(&self, roster: &str, member: &str) -> Result<Option<Member>> {
        let streams = self.lock();
        let Some(value) = streams.get(roster).and_then(|s| s.members.get(member)).cloned() else {
            return Ok(None);
        };
        let expires_at_ms = expiry(&self.leases(), roster, member);
        Ok(Some(Member { id: member.to_owned(), value, expires_at_ms }))
    }

    async fn roster_snapshot(&self, roster: &str) -> Result<RosterSnapshot> {
        let streams = self.lock();
        let leases = self.leases();
        let Some(state) = streams.get(roster) else {
            return Ok(RosterSnapshot { now_ms: now_ms(), ..Default::default() });
        };
        let members = state
            .members
            .iter()
            .map(|(id, value): (&String, &Bytes)| Member {
                id: id.clone(),
                value: value.clone(),
                expires_at_ms: expiry(&leases, roster, id),
            })
            .collect();
        Ok(RosterSnapshot {
            members,
            last_id: (state.last_id != crate::EventId::ZERO).then_some(state.last_id),
            marks: state.marks.clone(),
            now_ms: now_ms(),
        })
    }

    async fn roster_relay(&self, roster: &str, relay: Relay, limits: &RosterLimits) -> Result<Relayed> {
        let mut streams = self.lock();
        let state = streams.entry(roster.to_owned()).or_insert_with(StreamState::new);
        let mut from = relay.from;
        if let Some(mark) = state.marks.get(&relay.source).copied() {
            if relay.key <= mark.key {
                return Ok(Relayed::Stale(mark));
            }
            if relay.contiguous && relay.key.ms != mark.key.ms + 1 {
                return Ok(Relayed::Gap(mark));
            }
            from = from.or(Some(mark.from));
        }
        state.marks.insert(relay.source, Mark { key: relay.key, from: from.unwrap_or_default() });
        let id = match relay.event {
            Some(event) => {
                append_locked(&mut streams, roster, vec![event], Some(limits.cap.max(1))).first().copied()
            }
            None => None,
        };
        Ok(Relayed::Appended(id))
    }

    async fn roster_expired(&self, kind: &str, limit: usize) -> Result<Vec<(String, String)>> {
        let now = now_ms();
        let leases = self.leases();
        let Some(index) = leases.get(kind) else { return Ok(Vec::new()) };
        let mut lapsed: Vec<(u64, &(String, String))> =
            index.iter().filter(|(_, at)| **at <= now).map(|(key, at)| (*at, key)).collect();
        lapsed.sort();
        Ok(lapsed.into_iter().take(limit).map(|(_, key)| key.clone()).collect())
    }

    async fn roster_counts(&self, kind: &str) -> Result<BTreeMap<String, u64>> {
        let now = now_ms();
        let mut counts = BTreeMap::new();
        if let Some(index) = self.leases().get(kind) {
            for ((roster, _), at) in index {
                if *at > now {
                    *counts.entry(roster.clone()).or_insert(0) += 1;
                }
            }
        }
        Ok(counts)
    }
}
