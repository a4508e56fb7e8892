//! Roster conformance: every property here holds for the in-memory bus and for Redis alike.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use bytes::Bytes;
use csp_bus::{
    BusError, EventId, NewEvent, SharedBus,
    roster::{Change, Op, Relay, Relayed, RosterLimits},
};
use csp_testkit::TestEnv;

const LIMITS: RosterLimits = RosterLimits { cap: 1000, idle: Duration::from_secs(3600) };

fn said(text: &str) -> NewEvent {
    NewEvent::new(text.to_owned())
}

fn put(member: &str, value: &str) -> Op {
    Op::new(Change::Put { member: member.into(), value: Bytes::from(value.to_owned()) })
}

async fn payloads(bus: &SharedBus, stream: &str) -> Vec<String> {
    let events = bus.read(stream, None, 1000).await.unwrap();
    events.iter().map(|e| String::from_utf8(e.payload.to_vec()).unwrap()).collect()
}

async fn changes_and_their_events_land_together(env: TestEnv) {
    let bus = env.bus();
    let room = "room:one";
    let lease = Duration::from_secs(60);
    let done = bus
        .roster_apply(
            room,
            vec![
                put("a", "alice").lease(lease).event(said("a joined")),
                put("b", "bob").lease(lease).event(said("b joined")),
            ],
            &LIMITS,
        )
        .await
        .unwrap();
    assert!(done.iter().all(|d| d.applied && d.event.is_some()));
    let expiry = done[0].expires_at_ms.unwrap();
    let snapshot = bus.roster_snapshot(room).await.unwrap();
    assert!(
        expiry > snapshot.now_ms + 50_000 && expiry <= snapshot.now_ms + 60_000,
        "lease from the bus clock"
    );

    // Updates and removals apply only to members that are there, and announce only what applied.
    let done = bus
        .roster_apply(
            room,
            vec![
                Op::new(Change::Update { member: "a".into(), value: "alice at 3,4".into() })
                    .event(said("a moved")),
                Op::new(Change::Update { member: "ghost".into(), value: "x".into() })
                    .event(said("ghost moved")),
                Op::new(Change::Remove { member: "b".into() }).event(said("b left")),
                Op::new(Change::Remove { member: "b".into() }).event(said("b left twice")),
                Op::new(Change::Renew { member: "a".into() }).lease(Duration::from_secs(120)),
            ],
            &LIMITS,
        )
        .await
        .unwrap();
    let applied: Vec<bool> = done.iter().map(|d| d.applied).collect();
    assert_eq!(applied, [true, false, true, false, true]);
    assert!(done[4].expires_at_ms.unwrap() > expiry + 50_000, "a renewal moves the lease");
    assert_eq!(payloads(&bus, room).await, ["a joined", "b joined", "a moved", "b left"]);

    let snapshot = bus.roster_snapshot(room).await.unwrap();
    assert_eq!(snapshot.members.len(), 1);
    assert_eq!(snapshot.members[0].id, "a");
    assert_eq!(snapshot.members[0].value, "alice at 3,4");
    assert_eq!(snapshot.last_id, done[2].event, "the table is as of the stream's last event");
    let member = bus.roster_member(room, "a").await.unwrap().unwrap();
    assert_eq!(member.expires_at_ms, done[4].expires_at_ms);
    assert!(bus.roster_member(room, "b").await.unwrap().is_none());
    assert!(bus.roster_member("room:never", "a").await.unwrap().is_none());
    let empty = bus.roster_snapshot("room:never").await.unwrap();
    assert!(empty.members.is_empty() && empty.last_id.is_none());
}

async fn lapsed_members_are_removed_exactly_once(env: TestEnv) {
    let bus = env.bus();
    let short = Duration::from_millis(300);
    for (room, member, lease) in [
        ("room:x", "quick", short),
        ("room:x", "slow", Duration::from_secs(60)),
        ("room:y", "renewed", short),
        ("other:z", "elsewhere", short),
    ] {
        bus.roster_apply(room, vec![put(member, member).lease(lease).event(said("joined"))], &LIMITS)
            .await
            .unwrap();
    }
    assert!(bus.roster_expired("room", 10).await.unwrap().is_empty());
    let counts = bus.roster_counts("room").await.unwrap();
    assert_eq!(counts.get("room:x"), Some(&2));
    assert_eq!(counts.get("room:y"), Some(&1));
    assert!(!counts.contains_key("other:z"), "counts are per kind");

    tokio::time::sleep(Duration::from_millis(150)).await;
    bus.roster_apply(
        "room:y",
        vec![Op::new(Change::Renew { member: "renewed".into() }).lease(short)],
        &LIMITS,
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(250)).await;
    let expired = bus.roster_expired("room", 10).await.unwrap();
    assert_eq!(expired, [("room:x".to_owned(), "quick".to_owned())], "only lapsed leases, of this kind");

    // Many sweepers at once: one removes the member and announces it.
    let sweeps: Vec<_> = (0..8)
        .map(|_| {
            let bus = bus.clone();
            tokio::spawn(async move {
                let op = Op::new(Change::Expire { member: "quick".into() }).event(said("quick timed out"));
                bus.roster_apply("room:x", vec![op], &LIMITS).await.unwrap()[0]
            })
        })
        .collect();
    let mut removed = 0;
    for sweep in sweeps {
        removed += usize::from(sweep.await.unwrap().applied);
    }
    assert_eq!(removed, 1);
    let announced = payloads(&bus, "room:x").await;
    assert_eq!(announced.iter().filter(|p| p.as_str() == "quick timed out").count(), 1);
    assert!(bus.roster_expired("room", 10).await.unwrap().is_empty());

    // A live member is not expired; expiring one that is gone does nothing.
    let op = Op::new(Change::Expire { member: "slow".into() }).event(said("slow timed out"));
    assert!(!bus.roster_apply("room:x", vec![op.clone()], &LIMITS).await.unwrap()[0].applied);
    let op = Op::new(Change::Expire { member: "nobody".into() }).event(said("nobody timed out"));
    assert!(!bus.roster_apply("room:x", vec![op], &LIMITS).await.unwrap()[0].applied);
    assert_eq!(bus.roster_counts("room").await.unwrap().get("room:x"), Some(&1));
}

async fn relays_append_each_key_once_in_order(env: TestEnv) {
    let bus = env.bus();
    let relay = |key: u64, contiguous: bool| Relay {
        source: "design".into(),
        key: EventId::new(key, 0),
        from: Some(EventId::new(1000 + key, 0)),
        contiguous,
        event: Some(said(&format!("revision {key}"))),
    };
    let room = "room:relay";
    assert!(matches!(
        bus.roster_relay(room, relay(1, true), &LIMITS).await.unwrap(),
        Relayed::Appended(Some(_))
    ));
    let Relayed::Stale(mark) = bus.roster_relay(room, relay(1, true), &LIMITS).await.unwrap() else {
        panic!()
    };
    assert_eq!(mark.key, EventId::new(1, 0));
    assert_eq!(mark.from, EventId::new(1001, 0));
    let Relayed::Gap(mark) = bus.roster_relay(room, relay(3, true), &LIMITS).await.unwrap() else { panic!() };
    assert_eq!(mark.key, EventId::new(1, 0), "a gap leaves the mark where it was");

    // Several relayers of the same source: each key lands once, in order.
    let relayers: Vec<_> = (0..4)
        .map(|_| {
            let bus = bus.clone();
            tokio::spawn(async move {
                let mut appended = 0;
                for key in 2..=20 {
                    loop {
                        match bus.roster_relay(room, relay(key, true), &LIMITS).await.unwrap() {
                            Relayed::Appended(_) => appended += 1,
                            Relayed::Stale(_) => {}
                            Relayed::Gap(_) => {
                                tokio::task::yield_now().await;
                                continue;
                            }
                        }
                        break;
                    }
                }
                appended
            })
        })
        .collect();
    let mut total = 0;
    for relayer in relayers {
        total += relayer.await.unwrap();
    }
    assert_eq!(total, 19);
    let expected: Vec<String> = (1..=20).map(|k| format!("revision {k}")).collect();
    assert_eq!(payloads(&bus, room).await, expected);

    // Skipping keys on purpose, and moving the mark without an event.
    assert!(matches!(
        bus.roster_relay(room, relay(25, false), &LIMITS).await.unwrap(),
        Relayed::Appended(Some(_))
    ));
    let silent = Relay { event: None, from: None, ..relay(30, false) };
    assert_eq!(bus.roster_relay(room, silent, &LIMITS).await.unwrap(), Relayed::Appended(None));
    let snapshot = bus.roster_snapshot(room).await.unwrap();
    let mark = snapshot.marks["design"];
    assert_eq!(mark.key, EventId::new(30, 0));
    assert_eq!(mark.from, EventId::new(1025, 0), "a relay without a position keeps the mark's");
    assert_eq!(bus.len(room).await.unwrap(), 21);
}

async fn roster_streams_keep_their_cap(env: TestEnv) {
    let bus = env.bus();
    let limits = RosterLimits { cap: 5, idle: Duration::from_secs(60) };
    let first = bus.roster_apply("room:cap", vec![put("a", "a").event(said("0"))], &limits).await.unwrap()[0]
        .event
        .unwrap();
    for i in 1..20 {
        let op =
            Op::new(Change::Update { member: "a".into(), value: "a".into() }).event(said(&i.to_string()));
        bus.roster_apply("room:cap", vec![op], &limits).await.unwrap();
    }
    for key in 1..4 {
        let relay = Relay {
            source: "s".into(),
            key: EventId::new(key, 0),
            from: None,
            contiguous: false,
            event: Some(said(&format!("r{key}"))),
        };
        bus.roster_relay("room:cap", relay, &limits).await.unwrap();
    }
    assert_eq!(payloads(&bus, "room:cap").await, ["17", "18", "19", "r1", "r2", "r3"][1..]);
    assert!(matches!(bus.read("room:cap", Some(first), 10).await, Err(BusError::Truncated { .. })));
}

csp_testkit::backend_tests!(
    changes_and_their_events_land_together,
    lapsed_members_are_removed_exactly_once,
    relays_append_each_key_once_in_order,
    roster_streams_keep_their_cap,
);
