//! Rosters on Redis: the stream `<prefix><roster>`, the members hash `<roster>#members`, the
//! marks hash `<roster>#marks`, and per kind the lease index, a sorted set `<kind>#leases` of
//! `<roster>\n<member>` scored by expiry. Every operation is one Lua script, timed by Redis's
//! own clock.

use std::{collections::BTreeMap, sync::OnceLock};

use async_trait::async_trait;
use bytes::Bytes;
use fred::types::Value;

use super::{RedisBus, bad_reply, bytes_of, integer, push_fields, text, unavailable};
use crate::{
    EventId, Result,
    roster::{
        Applied, Change, Mark, Member, Op, Relay, Relayed, RosterLimits, RosterSnapshot, Rosters, kind_of,
    },
};

/// Separates roster and member in the lease index.
const SEPARATOR: char = '\n';

/// Shared Lua: the clock, and the trim of `append_many_script` (records the last trimmed id
/// so resumes from before the kept window are told).
const PRELUDE: &str = r#"
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function trim(stream, cap, last)
  if cap <= 0 then return end
  local excess = redis.call('XLEN', stream) - cap
  if excess > 0 then
    local old = redis.call('XRANGE', stream, '-', '+', 'COUNT', excess)
    redis.call('XTRIM', stream, 'MAXLEN', '=', cap)
    redis.call('XSETID', stream, last, 'MAXDELETEDID', old[#old][1])
  end
end
local function keep(keys, idle)
  if idle > 0 then
    for _, key in ipairs(keys) do redis.call('PEXPIRE', key, idle) end
  end
end
"#;

fn script(
    cell: &'static OnceLock<fred::types::scripts::Script>,
    body: &str,
) -> &'static fred::types::scripts::Script {
    cell.get_or_init(|| fred::types::scripts::Script::from_lua(format!("{PRELUDE}{body}")))
}

/// KEYS: stream, members, marks, index. ARGV: roster, idle ms, cap, op count, then per op its
/// kind, member, value, lease ms (0: keep), field count and the event's fields.
/// Returns per op `{applied, event id or '', expiry or -1}`.
fn apply_script() -> &'static fred::types::scripts::Script {
    static SCRIPT: OnceLock<fred::types::scripts::Script> = OnceLock::new();
    script(
        &SCRIPT,
        r#"
local stream, members, marks, index = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local roster, idle, cap, n = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local now = now_ms()
local out, last = {}, nil
local i = 5
for k = 1, n do
  local kind, member, value, lease, nf = ARGV[i], ARGV[i + 1], ARGV[i + 2], tonumber(ARGV[i + 3]), tonumber(ARGV[i + 4])
  local first = i + 5
  i = first + nf
  local entry = roster .. '\n' .. member
  local present = redis.call('HEXISTS', members, member) == 1
  local applied = false
  if kind == 'put' then
    redis.call('HSET', members, member, value)
    applied = true
  elseif kind == 'update' then
    if present then redis.call('HSET', members, member, value); applied = true end
  elseif kind == 'renew' then
    applied = present
  elseif kind == 'remove' then
    if present then
      redis.call('HDEL', members, member)
      redis.call('ZREM', index, entry)
      applied = true
    end
  elseif kind == 'expire' then
    local score = redis.call('ZSCORE', index, entry)
    if not present then
      redis.call('ZREM', index, entry)
    elseif score and tonumber(score) <= now then
      redis.call('HDEL', members, member)
      redis.call('ZREM', index, entry)
      applied = true
    end
  end
  local expires = -1
  if applied and (kind == 'put' or kind == 'update' or kind == 'renew') then
    if lease > 0 then
      expires = now + lease
      redis.call('ZADD', index, expires, entry)
    else
      local score = redis.call('ZSCORE', index, entry)
      if score then expires = tonumber(score) end
    end
  end
  local id = ''
  if applied and nf > 0 then
    id = redis.call('XADD', stream, '*', unpack(ARGV, first, first + nf - 1))
    last = id
  end
  out[k] = {applied and 1 or 0, id, expires}
end
if last then trim(stream, cap, last) end
keep({stream, members, marks}, idle)
return out
"#,
    )
}

/// KEYS: stream, members, marks, index. ARGV: roster.
/// Returns `{now, last id or '', {member, value, expiry or -1, ...}, {source, mark, ...}}`.
fn snapshot_script() -> &'static fred::types::scripts::Script {
    static SCRIPT: OnceLock<fred::types::scripts::Script> = OnceLock::new();
    script(
        &SCRIPT,
        r#"
local stream, members, marks, index = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local roster = ARGV[1]
local last = ''
if redis.call('EXISTS', stream) == 1 then
  local info = redis.call('XINFO', 'STREAM', stream)
  for i = 1, #info, 2 do
    if info[i] == 'last-generated-id' then last = info[i + 1] end
  end
end
local flat = redis.call('HGETALL', members)
local out = {}
for i = 1, #flat, 2 do
  local score = redis.call('ZSCORE', index, roster .. '\n' .. flat[i])
  out[#out + 1] = flat[i]
  out[#out + 1] = flat[i + 1]
  out[#out + 1] = score and tonumber(score) or -1
end
return {now_ms(), last, out, redis.call('HGETALL', marks)}
"#,
    )
}

/// KEYS: stream, marks, members. ARGV: source, key ms, key seq, from ('' keeps), contiguous
/// (0/1), idle ms, cap, field count, fields. Returns `{'appended', id}`, `{'stale', mark}` or
/// `{'gap', mark}`.
fn relay_script() -> &'static fred::types::scripts::Script {
    static SCRIPT: OnceLock<fred::types::scripts::Script> = OnceLock::new();
    script(
        &SCRIPT,
        r#"
local stream, marks, members = KEYS[1], KEYS[2], KEYS[3]
local source, kms, kseq, from = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4]
local contiguous, idle, cap, nf = ARGV[5] == '1', tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8])
local current = redis.call('HGET', marks, source)
if current then
  local lms, lseq, lfrom = string.match(current, '^(%d+)-(%d+)|(.*)$')
  lms, lseq = tonumber(lms), tonumber(lseq)
  if kms < lms or (kms == lms and kseq <= lseq) then return {'stale', current} end
  if contiguous and kms ~= lms + 1 then return {'gap', current} end
  if from == '' then from = lfrom end
end
local id = ''
if nf > 0 then
  id = redis.call('XADD', stream, '*', unpack(ARGV, 9, 8 + nf))
  trim(stream, cap, id)
end
redis.call('HSET', marks, source, string.format('%d-%d|%s', kms, kseq, from))
keep({stream, marks, members}, idle)
return {'appended', id}
"#,
    )
}

/// KEYS: members, index. ARGV: member, index entry. Returns `{value, expiry or -1}`, or nil.
fn member_script() -> &'static fred::types::scripts::Script {
    static SCRIPT: OnceLock<fred::types::scripts::Script> = OnceLock::new();
    script(
        &SCRIPT,
        r#"
local value = redis.call('HGET', KEYS[1], ARGV[1])
if not value then return nil end
local score = redis.call('ZSCORE', KEYS[2], ARGV[2])
return {value, score and tonumber(score) or -1}
"#,
    )
}

/// KEYS: index. ARGV: limit. Entries whose lease ran out, oldest first.
fn expired_script() -> &'static fred::types::scripts::Script {
    static SCRIPT: OnceLock<fred::types::scripts::Script> = OnceLock::new();
    script(
        &SCRIPT,
        r#"
return redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now_ms(), 'LIMIT', 0, tonumber(ARGV[1]))
"#,
    )
}

/// KEYS: index. Entries with a live lease.
fn live_script() -> &'static fred::types::scripts::Script {
    static SCRIPT: OnceLock<fred::types::scripts::Script> = OnceLock::new();
    script(
        &SCRIPT,
        r#"
return redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. now_ms(), '+inf')
"#,
    )
}

/// `<prefix>ms-seq|ms-seq` → a mark.
fn parse_mark(value: &str) -> Option<Mark> {
    let (key, from) = value.split_once('|')?;
    Some(Mark {
        key: key.parse().ok()?,
        from: if from.is_empty() { EventId::ZERO } else { from.parse().ok()? },
    })
}

fn millis(value: &Value) -> Option<u64> {
    integer(value).filter(|n| *n >= 0).map(|n| n as u64)
}

impl RedisBus {
    fn roster_keys(&self, roster: &str) -> Vec<String> {
        vec![
            self.key(roster),
            self.key(&format!("{roster}#members")),
            self.key(&format!("{roster}#marks")),
            self.key(&format!("{}#leases", kind_of(roster))),
        ]
    }
}

#[async_trait]
impl Rosters for RedisBus {
    async fn roster_apply(&self, roster: &str, ops: Vec<Op>, limits: &RosterLimits) -> Result<Vec<Applied>> {
        if ops.is_empty() {
            return Ok(Vec::new());
        }
        let count = ops.len();
        let mut args = vec![
            Value::from(roster),
            Value::Integer(limits.idle.as_millis() as i64),
            Value::Integer(limits.cap as i64),
            Value::Integer(count as i64),
        ];
        for op in ops {
            let (kind, member, value) = match op.change {
                Change::Put { member, value } => ("put", member, value),
                Change::Update { member, value } => ("update", member, value),
                Change::Renew { member } => ("renew", member, Bytes::new()),
                Change::Remove { member } => ("remove", member, Bytes::new()),
                Change::Expire { member } => ("expire", member, Bytes::new()),
            };
            args.push(Value::from(kind));
            args.push(Value::from(member));
            args.push(Value::Bytes(value));
            args.push(Value::Integer(op.lease.map_or(0, |l| l.as_millis().max(1) as i64)));
            match op.event {
                Some(event) => push_fields(event, &mut args),
                None => args.push(Value::Integer(0)),
            }
        }
        let reply: Value = apply_script()
            .evalsha_with_reload(self.inner.pool.next(), self.roster_keys(roster), args)
            .await
            .map_err(unavailable)?;
        let Value::Array(rows) = reply else { return Err(bad_reply("roster apply")) };
        if rows.len() != count {
            return Err(bad_reply("roster apply shape"));
        }
        rows.iter()
            .map(|row| {
                let Value::Array(cols) = row else { return Err(bad_reply("roster apply row")) };
                let applied = cols.first().and_then(integer) == Some(1);
                let event = match cols.get(1).and_then(text) {
                    Some(id) if !id.is_empty() => Some(id.parse()?),
                    _ => None,
                };
                Ok(Applied { applied, event, expires_at_ms: cols.get(2).and_then(millis) })
            })
            .collect()
    }

    async fn roster_member(&self, roster: &str, member: &str) -> Result<Option<Member>> {
        let keys = self.roster_keys(roster);
        let keys = vec![keys[1].clone(), keys[3].clone()];
        let args = vec![Value::from(member), Value::from(format!("{roster}{SEPARATOR}{member}"))];
        let reply: Value = member_script()
            .evalsha_with_reload(self.inner.pool.next(), keys, args)
            .await
            .map_err(unavailable)?;
        let Value::Array(mut parts) = reply else { return Ok(None) };
        if parts.len() != 2 {
            return Err(bad_reply("roster member"));
        }
        let expiry = parts.pop().unwrap_or(Value::Null);
        let value = parts.pop().unwrap_or(Value::Null);
        Ok(Some(Member { id: member.to_owned(), value: bytes_of(value), expires_at_ms: millis(&expiry) }))
    }

    async fn roster_snapshot(&self, roster: &str) -> Result<RosterSnapshot> {
        let reply: Value = snapshot_script()
            .evalsha_with_reload(self.inner.pool.next(), self.roster_keys(roster), vec![Value::from(roster)])
            .await
            .map_err(unavailable)?;
        let Value::Array(mut parts) = reply else { return Err(bad_reply("roster snapshot")) };
        if parts.len() != 4 {
            return Err(bad_reply("roster snapshot shape"));
        }
        let marks = parts.pop().unwrap_or(Value::Null);
        let members = parts.pop().unwrap_or(Value::Null);
        let now_ms = millis(&parts[0]).ok_or_else(|| bad_reply("roster clock"))?;
        let last_id = match text(&parts[1]) {
            Some(id) if !id.is_empty() => Some(id.parse()?),
            _ => None,
        };
        let mut snapshot = RosterSnapshot { members: Vec::new(), last_id, marks: BTreeMap::new(), now_ms };
        if let Value::Array(flat) = members {
            let mut iter = flat.into_iter();
            while let (Some(id), Some(value), Some(expiry)) = (iter.next(), iter.next(), iter.next()) {
                snapshot.members.push(Member {
                    id: text(&id).unwrap_or_default(),
                    value: bytes_of(value),
                    expires_at_ms: millis(&expiry),
                });
            }
        }
        if let Value::Array(flat) = marks {
            let mut iter = flat.into_iter();
            while let (Some(source), Some(mark)) = (iter.next(), iter.next()) {
                if let (Some(source), Some(mark)) =
                    (text(&source), text(&mark).as_deref().and_then(parse_mark))
                {
                    snapshot.marks.insert(source, mark);
                }
            }
        }
        Ok(snapshot)
    }

    async fn roster_relay(&self, roster: &str, relay: Relay, limits: &RosterLimits) -> Result<Relayed> {
        let keys = self.roster_keys(roster);
        let keys = vec![keys[0].clone(), keys[2].clone(), keys[1].clone()];
        let mut args = vec![
            Value::from(relay.source),
            Value::Integer(relay.key.ms as i64),
            Value::Integer(relay.key.seq as i64),
            Value::from(relay.from.map(|f| f.to_string()).unwrap_or_default()),
            Value::from(if relay.contiguous { "1" } else { "0" }),
            Value::Integer(limits.idle.as_millis() as i64),
            Value::Integer(limits.cap as i64),
        ];
        match relay.event {
            Some(event) => push_fields(event, &mut args),
            None => args.push(Value::Integer(0)),
        }
        let reply: Value = relay_script()
            .evalsha_with_reload(self.inner.pool.next(), keys, args)
            .await
            .map_err(unavailable)?;
        let Value::Array(parts) = reply else { return Err(bad_reply("relay")) };
        let (Some(outcome), Some(detail)) = (parts.first().and_then(text), parts.get(1).and_then(text))
        else {
            return Err(bad_reply("relay shape"));
        };
        match outcome.as_str() {
            "appended" if detail.is_empty() => Ok(Relayed::Appended(None)),
            "appended" => Ok(Relayed::Appended(Some(detail.parse()?))),
            "stale" => Ok(Relayed::Stale(parse_mark(&detail).ok_or_else(|| bad_reply("mark"))?)),
            "gap" => Ok(Relayed::Gap(parse_mark(&detail).ok_or_else(|| bad_reply("mark"))?)),
            _ => Err(bad_reply("relay outcome")),
        }
    }

    async fn roster_expired(&self, kind: &str, limit: usize) -> Result<Vec<(String, String)>> {
        let index = self.key(&format!("{kind}#leases"));
        let reply: Value = expired_script()
            .evalsha_with_reload(self.inner.pool.next(), vec![index], vec![Value::Integer(limit as i64)])
            .await
            .map_err(unavailable)?;
        Ok(entries(reply))
    }

    async fn roster_counts(&self, kind: &str) -> Result<BTreeMap<String, u64>> {
        let index = self.key(&format!("{kind}#leases"));
        let reply: Value = live_script()
            .evalsha_with_reload(self.inner.pool.next(), vec![index], Vec::<Value>::new())
            .await
            .map_err(unavailable)?;
        let mut counts = BTreeMap::new();
        for (roster, _) in entries(reply) {
            *counts.entry(roster).or_insert(0) += 1;
        }
        Ok(counts)
    }
}

/// Lease-index entries → `(roster, member)`.
fn entries(reply: Value) -> Vec<(String, String)> {
    let Value::Array(items) = reply else { return Vec::new() };
    items
        .iter()
        .filter_map(text)
        .filter_map(|entry| entry.split_once(SEPARATOR).map(|(r, m)| (r.to_owned(), m.to_owned())))
        .collect()
}
