//! The bus conformance suite: every property here holds for the in-memory bus and for Redis
//! streams alike (each test runs on both; see `csp_testkit::backend_tests!`).

#![allow(clippy::unwrap_used)]

use std::{collections::HashSet, time::Duration};

use csp_bus::{
    Adjust, Append, BusError, Claim, Event, EventId, GroupStart, NewEvent, Rate, Reserved, SharedBus,
    Throttled,
};
use csp_testkit::TestEnv;
use futures::StreamExt as _;
use tokio::time::timeout;

fn payload(i: usize) -> NewEvent {
    NewEvent::new(format!("event-{i}")).header("n", i.to_string())
}

fn numbers(events: &[Event]) -> Vec<usize> {
    events.iter().map(|e| e.headers["n"].parse().unwrap()).collect()
}

async fn append_n(bus: &SharedBus, stream: &str, range: std::ops::Range<usize>) -> Vec<EventId> {
    let mut ids = Vec::new();
    for i in range {
        ids.push(bus.append(stream, payload(i), None).await.unwrap());
    }
    ids
}

/// Collects `n` events from a stream, failing if they do not come within 10 s.
async fn take(
    stream: &mut futures::stream::BoxStream<'static, csp_bus::Result<Event>>,
    n: usize,
) -> Vec<Event> {
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        match timeout(Duration::from_secs(10), stream.next()).await {
            Ok(Some(Ok(event))) => out.push(event),
            Ok(Some(Err(e))) => panic!("tail failed after {} events: {e}", out.len()),
            Ok(None) => panic!("tail ended after {} events", out.len()),
            Err(_) => panic!("timed out after {} of {n} events", out.len()),
        }
    }
    out
}

async fn appends_keep_order_and_round_trip(env: TestEnv) {
    let bus = env.bus();
    let binary: Vec<u8> = (0..=255u8).collect();
    let ids = append_n(&bus, "s", 0..5).await;
    let bin_id = bus
        .append("s", NewEvent::new(binary.clone()).header("kind", "binary").header("traceparent", "x"), None)
        .await
        .unwrap();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "ids strictly increase: {ids:?}");
    assert!(ids[4] < bin_id);

    let all = bus.read("s", None, 100).await.unwrap();
    assert_eq!(numbers(&all[..5]), [0, 1, 2, 3, 4]);
    assert_eq!(all[0].payload, "event-0".as_bytes());
    assert_eq!(all[5].payload.as_ref(), binary.as_slice(), "binary payloads survive");
    assert_eq!(all[5].headers["kind"], "binary");
    assert_eq!(bus.len("s").await.unwrap(), 6);
    assert_eq!(bus.last_id("s").await.unwrap(), Some(bin_id));
    assert_eq!(bus.last_id("nothing-here").await.unwrap(), None);
    assert!(bus.read("nothing-here", None, 10).await.unwrap().is_empty());
}

async fn readers_resume_without_gaps_or_repeats(env: TestEnv) {
    let bus = env.bus();
    let ids = append_n(&bus, "s", 0..10).await;
    let page = bus.read("s", Some(ids[2]), 3).await.unwrap();
    assert_eq!(numbers(&page), [3, 4, 5], "strictly after the id, limited");
    let rest = bus.read("s", Some(page[2].id), 100).await.unwrap();
    assert_eq!(numbers(&rest), [6, 7, 8, 9]);
    assert!(bus.read("s", Some(ids[9]), 100).await.unwrap().is_empty());

    // A tail that stops and resumes from the last id it saw, while writers keep appending.
    let writer = {
        let bus = bus.clone();
        tokio::spawn(async move {
            for i in 10..210 {
                bus.append("s", payload(i), None).await.unwrap();
                if i % 20 == 0 {
                    tokio::task::yield_now().await;
                }
            }
        })
    };
    let mut seen = Vec::new();
    let mut cursor = ids[4];
    for _ in 0..4 {
        let mut tail = bus.tail("s", Some(cursor)).await.unwrap();
        let got = take(&mut tail, 40).await;
        cursor = got.last().unwrap().id;
        seen.extend(numbers(&got));
        drop(tail);
    }
    writer.await.unwrap();
    let mut tail = bus.tail("s", Some(cursor)).await.unwrap();
    seen.extend(numbers(&take(&mut tail, 205 - seen.len()).await));
    assert_eq!(seen, (5..210).collect::<Vec<_>>(), "every event once, in order");
}

async fn the_cap_holds_and_trimmed_history_is_reported(env: TestEnv) {
    let bus = env.bus();
    let mut ids = Vec::new();
    for i in 0..50 {
        ids.push(bus.append("capped", payload(i), Some(10)).await.unwrap());
        assert!(bus.len("capped").await.unwrap() <= 10, "cap holds after every append");
    }
    assert_eq!(bus.len("capped").await.unwrap(), 10);
    let kept = bus.read("capped", None, 100).await.unwrap();
    assert_eq!(numbers(&kept), (40..50).collect::<Vec<_>>(), "the newest are kept");

    // Resuming inside the kept window works; resuming before it is an error, not a silent gap.
    assert_eq!(numbers(&bus.read("capped", Some(ids[39]), 100).await.unwrap()), (40..50).collect::<Vec<_>>());
    match bus.read("capped", Some(ids[10]), 100).await {
        Err(BusError::Truncated { after, .. }) => assert_eq!(after, ids[10]),
        other => panic!("expected Truncated, got {other:?}"),
    }
    // A tail knows at once: its caller can refuse the resume instead of streaming an error.
    match bus.tail("capped", Some(ids[0])).await {
        Err(BusError::Truncated { after, .. }) => assert_eq!(after, ids[0]),
        Err(other) => panic!("expected Truncated from the tail, got {other:?}"),
        Ok(_) => panic!("expected Truncated from the tail, got a tail"),
    }
    let mut tail = bus.tail("capped", Some(ids[39])).await.unwrap();
    assert_eq!(numbers(&take(&mut tail, 10).await), (40..50).collect::<Vec<_>>());
}

async fn appends_to_several_streams_land_in_order(env: TestEnv) {
    let bus = env.bus();
    let mut jobs = bus.tail("jobs", None).await.unwrap();
    let appends = vec![
        Append::new("events", vec![payload(1), payload(2)], Some(3)),
        Append::new("jobs", vec![payload(3)], None),
        Append::new("untouched", Vec::new(), None),
    ];
    let ids = bus.append_many(appends).await.unwrap();
    assert_eq!(ids.iter().map(Vec::len).collect::<Vec<_>>(), [2, 1, 0]);
    // Whoever sees the later stream's event finds the earlier stream written.
    let job = take(&mut jobs, 1).await;
    assert_eq!((numbers(&job), job[0].id), (vec![3], ids[1][0]));
    let events = bus.read("events", None, 10).await.unwrap();
    assert_eq!(numbers(&events), [1, 2]);
    assert_eq!(events.iter().map(|e| e.id).collect::<Vec<_>>(), ids[0]);
    assert_eq!(bus.len("untouched").await.unwrap(), 0);

    // Each stream keeps its own cap.
    let more = vec![
        Append::new("events", vec![payload(4), payload(5)], Some(3)),
        Append::new("jobs", vec![payload(6)], None),
    ];
    bus.append_many(more).await.unwrap();
    assert_eq!(numbers(&bus.read("events", None, 10).await.unwrap()), [2, 4, 5]);
    assert_eq!(numbers(&bus.read("jobs", None, 10).await.unwrap()), [3, 6]);
    match bus.read("events", Some(EventId::ZERO), 10).await {
        Err(BusError::Truncated { .. }) => {}
        other => panic!("expected Truncated, got {other:?}"),
    }
    assert!(bus.append_many(Vec::new()).await.unwrap().is_empty());
}

async fn batches_append_in_order_and_respect_the_cap(env: TestEnv) {
    let bus = env.bus();
    let before = bus.append("b", payload(0), None).await.unwrap();
    let mut tail = bus.tail("b", Some(before)).await.unwrap();
    let batch = (1..6).map(payload).collect();
    let ids = bus.append_all("b", batch, None).await.unwrap();
    assert_eq!(ids.len(), 5);
    assert!(ids.windows(2).all(|w| w[0] < w[1]) && before < ids[0], "ids strictly increase: {ids:?}");
    let read = bus.read("b", Some(before), 100).await.unwrap();
    assert_eq!(numbers(&read), [1, 2, 3, 4, 5]);
    assert_eq!(read.iter().map(|e| e.id).collect::<Vec<_>>(), ids);
    assert_eq!(read[2].headers["n"], "3", "headers survive");
    assert_eq!(numbers(&take(&mut tail, 5).await), [1, 2, 3, 4, 5], "tails see a batch as it lands");
    assert!(bus.append_all("b", Vec::new(), None).await.unwrap().is_empty());

    // A capped batch larger than the cap keeps its newest events and reports the trim.
    let ids = bus.append_all("b", (6..20).map(payload).collect(), Some(4)).await.unwrap();
    assert_eq!(numbers(&bus.read("b", None, 100).await.unwrap()), [16, 17, 18, 19]);
    match bus.read("b", Some(ids[5]), 100).await {
        Err(BusError::Truncated { .. }) => {}
        other => panic!("expected Truncated, got {other:?}"),
    }
    assert_eq!(numbers(&bus.read("b", Some(ids[9]), 100).await.unwrap()), [16, 17, 18, 19]);
}

async fn tails_see_backlog_then_live_events(env: TestEnv) {
    let bus = env.bus();
    append_n(&bus, "t", 0..3).await;
    let mut from_start = bus.tail("t", Some(EventId::ZERO)).await.unwrap();
    let mut from_now = bus.tail("t", None).await.unwrap();
    assert_eq!(numbers(&take(&mut from_start, 3).await), [0, 1, 2]);

    // Live events reach both; "from now" never sees the backlog.
    let later = {
        let bus = bus.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            append_n(&bus, "t", 3..6).await;
        })
    };
    assert_eq!(numbers(&take(&mut from_start, 3).await), [3, 4, 5]);
    assert_eq!(numbers(&take(&mut from_now, 3).await), [3, 4, 5]);
    later.await.unwrap();

    // Tails of other streams get only their own events.
    let mut other = bus.tail("other", Some(EventId::ZERO)).await.unwrap();
    bus.append("other", payload(100), None).await.unwrap();
    bus.append("t", payload(6), None).await.unwrap();
    assert_eq!(numbers(&take(&mut other, 1).await), [100]);
    assert_eq!(numbers(&take(&mut from_now, 1).await), [6]);
}

async fn many_concurrent_tails_each_get_their_stream(env: TestEnv) {
    let bus = env.bus();
    let mut readers = Vec::new();
    for s in 0..20 {
        let mut tail = bus.tail(&format!("multi-{s}"), Some(EventId::ZERO)).await.unwrap();
        readers.push(tokio::spawn(async move { numbers(&take(&mut tail, 25).await) }));
    }
    for i in 0..25 {
        for s in 0..20 {
            bus.append(&format!("multi-{s}"), payload(s * 1000 + i), None).await.unwrap();
        }
    }
    for (s, reader) in readers.into_iter().enumerate() {
        assert_eq!(reader.await.unwrap(), (0..25).map(|i| s * 1000 + i).collect::<Vec<_>>());
    }
}

async fn a_slow_tail_loses_nothing(env: TestEnv) {
    let bus = env.bus();
    let mut tail = bus.tail("fast", Some(EventId::ZERO)).await.unwrap();
    // Start the tail, then flood it far beyond any buffer without reading.
    append_n(&bus, "fast", 0..1).await;
    assert_eq!(numbers(&take(&mut tail, 1).await), [0]);
    for chunk in 0..6 {
        let futures: Vec<_> = (chunk * 500 + 1..chunk * 500 + 501)
            .map(|i| {
                let bus = bus.clone();
                async move { bus.append("fast", payload(i), None).await.unwrap() }
            })
            .collect();
        // Appends of one chunk may interleave; their ids give the order.
        futures::future::join_all(futures).await;
    }
    let got = take(&mut tail, 3000).await;
    let ids: Vec<EventId> = got.iter().map(|e| e.id).collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "in order, no repeats");
    let set: HashSet<usize> = numbers(&got).into_iter().collect();
    assert_eq!(set, (1..=3000).collect::<HashSet<_>>(), "nothing lost");
}

async fn a_group_delivers_each_entry_to_one_consumer(env: TestEnv) {
    let bus = env.bus();
    bus.create_group("jobs", "workers", GroupStart::Beginning).await.unwrap();
    bus.create_group("jobs", "workers", GroupStart::Beginning).await.unwrap(); // idempotent
    append_n(&bus, "jobs", 0..200).await;

    let consume = |name: &'static str| {
        let bus = bus.clone();
        tokio::spawn(async move {
            let mut got = Vec::new();
            loop {
                let batch =
                    bus.read_group("jobs", "workers", name, 7, Duration::from_millis(200)).await.unwrap();
                if batch.is_empty() {
                    return got;
                }
                let ids: Vec<EventId> = batch.iter().map(|d| d.event.id).collect();
                assert!(batch.iter().all(|d| d.deliveries == 1));
                got.extend(batch.into_iter().map(|d| d.event));
                assert_eq!(bus.ack("jobs", "workers", &ids).await.unwrap(), ids.len() as u64);
                tokio::task::yield_now().await;
            }
        })
    };
    let (a, b) = (consume("a"), consume("b"));
    let (a, b) = (a.await.unwrap(), b.await.unwrap());
    let a: HashSet<usize> = numbers(&a).into_iter().collect();
    let b: HashSet<usize> = numbers(&b).into_iter().collect();
    assert!(a.is_disjoint(&b), "no entry reached both consumers");
    assert_eq!(a.union(&b).copied().collect::<HashSet<_>>(), (0..200).collect(), "every entry reached one");
    assert_eq!(bus.pending("jobs", "workers").await.unwrap().count, 0, "all acknowledged");
}

async fn groups_start_where_asked_and_must_exist(env: TestEnv) {
    let bus = env.bus();
    append_n(&bus, "g", 0..3).await;
    bus.create_group("g", "new-only", GroupStart::End).await.unwrap();
    assert!(bus.read_group("g", "new-only", "c", 10, Duration::ZERO).await.unwrap().is_empty());
    append_n(&bus, "g", 3..4).await;
    let got = bus.read_group("g", "new-only", "c", 10, Duration::ZERO).await.unwrap();
    assert_eq!(got.iter().map(|d| d.event.headers["n"].as_str()).collect::<Vec<_>>(), ["3"]);

    match bus.read_group("g", "missing", "c", 10, Duration::ZERO).await {
        Err(BusError::NoGroup { group, .. }) => assert_eq!(group, "missing"),
        other => panic!("expected NoGroup, got {other:?}"),
    }
    // Creating a group creates its stream.
    bus.create_group("fresh", "g", GroupStart::Beginning).await.unwrap();
    assert_eq!(bus.len("fresh").await.unwrap(), 0);
}

async fn a_blocked_group_read_wakes_on_append_and_times_out_empty(env: TestEnv) {
    let bus = env.bus();
    bus.create_group("q", "w", GroupStart::End).await.unwrap();
    let started = std::time::Instant::now();
    assert!(bus.read_group("q", "w", "c", 1, Duration::from_millis(300)).await.unwrap().is_empty());
    assert!(started.elapsed() >= Duration::from_millis(250), "it waited");

    let reader = {
        let bus = bus.clone();
        tokio::spawn(async move { bus.read_group("q", "w", "c", 1, Duration::from_secs(20)).await.unwrap() })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    let started = std::time::Instant::now();
    bus.append("q", payload(1), None).await.unwrap();
    let got = timeout(Duration::from_secs(5), reader).await.expect("woken by the append").unwrap();
    assert_eq!(got.len(), 1);
    assert!(started.elapsed() < Duration::from_secs(5));
}

async fn entries_of_a_stopped_consumer_are_claimed_after_the_idle_time(env: TestEnv) {
    let bus = env.bus();
    bus.create_group("work", "w", GroupStart::Beginning).await.unwrap();
    append_n(&bus, "work", 0..5).await;

    // Consumer "dead" takes three entries, acknowledges one, then stops.
    let taken = bus.read_group("work", "w", "dead", 3, Duration::ZERO).await.unwrap();
    assert_eq!(taken.len(), 3);
    bus.ack("work", "w", &[taken[0].event.id]).await.unwrap();
    let pending = bus.pending("work", "w").await.unwrap();
    assert_eq!(pending.count, 2);
    assert_eq!(pending.consumers.get("dead"), Some(&2));

    // Before the idle time nothing can be claimed.
    let idle = Duration::from_millis(400);
    assert!(bus.claim_idle("work", "w", "alive", idle, 10).await.unwrap().is_empty());

    tokio::time::sleep(idle + Duration::from_millis(100)).await;
    let claimed = bus.claim_idle("work", "w", "alive", idle, 10).await.unwrap();
    assert_eq!(
        claimed.iter().map(|d| d.event.id).collect::<Vec<_>>(),
        [taken[1].event.id, taken[2].event.id],
        "exactly the unacknowledged entries"
    );
    assert!(claimed.iter().all(|d| d.deliveries == 2), "deliveries are counted: {claimed:?}");
    assert_eq!(claimed[0].event.payload, taken[1].event.payload);
    let pending = bus.pending("work", "w").await.unwrap();
    assert_eq!(pending.consumers.get("alive"), Some(&2));
    assert_eq!(pending.consumers.get("dead"), None);

    // Claimed entries are not claimable again until they idle again, and new entries still
    // go to readers normally.
    assert!(bus.claim_idle("work", "w", "third", idle, 10).await.unwrap().is_empty());
    let rest = bus.read_group("work", "w", "alive", 10, Duration::ZERO).await.unwrap();
    assert_eq!(rest.len(), 2);
    let ids: Vec<EventId> = claimed.iter().chain(rest.iter()).map(|d| d.event.id).collect();
    assert_eq!(bus.ack("work", "w", &ids).await.unwrap(), 4);
    assert_eq!(bus.pending("work", "w").await.unwrap().count, 0);
}

async fn a_touched_lease_is_not_claimed_and_a_claimed_one_not_touched_back(env: TestEnv) {
    let bus = env.bus();
    bus.create_group("leases", "w", GroupStart::Beginning).await.unwrap();
    append_n(&bus, "leases", 0..2).await;
    let held = bus.read_group("leases", "w", "owner", 2, Duration::ZERO).await.unwrap();
    let ids: Vec<EventId> = held.iter().map(|d| d.event.id).collect();
    let idle = Duration::from_millis(300);

    // Renewed before it idles: nobody can take it.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(bus.touch("leases", "w", "owner", &ids).await.unwrap(), ids);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(bus.claim_idle("leases", "w", "other", idle, 10).await.unwrap().is_empty(), "renewed 200 ms ago");

    // Left to idle, it is taken over, and the old owner's renewal no longer holds it.
    tokio::time::sleep(idle).await;
    assert_eq!(bus.claim_idle("leases", "w", "other", idle, 10).await.unwrap().len(), 2);
    assert!(bus.touch("leases", "w", "owner", &ids).await.unwrap().is_empty());
    let pending = bus.pending("leases", "w").await.unwrap();
    assert_eq!(pending.consumers.get("other"), Some(&2));
    assert!(matches!(bus.touch("nothing", "w", "owner", &ids).await, Err(BusError::NoGroup { .. })));

    // The old owner's acknowledgement is refused: the entries stay the new owner's.
    assert_eq!(bus.ack_held("leases", "w", "owner", &ids).await.unwrap(), 0);
    assert_eq!(bus.pending("leases", "w").await.unwrap().count, 2);
    assert_eq!(bus.ack_held("leases", "w", "other", &ids[..1]).await.unwrap(), 1);
    assert_eq!(bus.touch("leases", "w", "other", &ids).await.unwrap(), ids[1..]);
}

/// A released entry is claimable at once by anyone, whatever their idle time, with its
/// delivery count kept; only its holder can release it.
async fn a_released_entry_is_claimed_at_once(env: TestEnv) {
    let bus = env.bus();
    bus.create_group("handover", "w", GroupStart::Beginning).await.unwrap();
    append_n(&bus, "handover", 0..3).await;
    let held = bus.read_group("handover", "w", "leaving", 3, Duration::ZERO).await.unwrap();
    let ids: Vec<EventId> = held.iter().map(|d| d.event.id).collect();
    let lease = Duration::from_secs(3600);
    assert!(bus.claim_idle("handover", "w", "staying", lease, 10).await.unwrap().is_empty());

    assert_eq!(bus.release("handover", "w", "someone-else", &ids).await.unwrap(), 0);
    assert_eq!(bus.release("handover", "w", "leaving", &ids[..2]).await.unwrap(), 2);
    let claimed = bus.claim_idle("handover", "w", "staying", lease, 10).await.unwrap();
    assert_eq!(claimed.iter().map(|d| d.event.id).collect::<Vec<_>>(), ids[..2]);
    assert!(claimed.iter().all(|d| d.deliveries == 2), "one more delivery each: {claimed:?}");
    // Claimed, they are held (not idle) again; the third was never released.
    assert!(bus.claim_idle("handover", "w", "third", lease, 10).await.unwrap().is_empty());
    assert_eq!(bus.pending("handover", "w").await.unwrap().consumers.get("leaving"), Some(&1));
}

/// A sealed stream refuses guarded appends — the whole call, every stream of it — until
/// something unguarded is appended after the seal.
async fn a_sealed_stream_refuses_guarded_appends(env: TestEnv) {
    let bus = env.bus();
    let guarded =
        |stream: &str, events: Vec<NewEvent>| Append::new(stream, events, Some(100)).unless_sealed();
    bus.append_many(vec![guarded("run", vec![payload(0), payload(1)])]).await.unwrap();
    let sealed = bus
        .append_many(vec![
            guarded("run", vec![payload(2), payload(3).sealing()]),
            Append::new("all", vec![payload(3)], None),
        ])
        .await
        .unwrap();
    assert_eq!(sealed[0].len(), 2);

    // A second "last" event: refused, and its companion append on another stream too.
    let again = bus
        .append_many(vec![
            guarded("run", vec![payload(4).sealing()]),
            Append::new("all", vec![payload(4)], None),
        ])
        .await;
    assert!(matches!(&again, Err(BusError::Sealed { stream }) if stream == "run"), "{again:?}");
    assert_eq!(numbers(&bus.read("run", None, 10).await.unwrap()), [0, 1, 2, 3]);
    assert_eq!(numbers(&bus.read("all", None, 10).await.unwrap()), [3]);
    let events = bus.read("run", None, 10).await.unwrap();
    assert!(events[3].headers.contains_key(csp_bus::SEALED_HEADER));

    // Unguarded appends still land (other streams are unaffected by the seal).
    bus.append_many(vec![guarded("other", vec![payload(9)])]).await.unwrap();
    bus.append("run", payload(5), None).await.unwrap();
    bus.append_many(vec![guarded("run", vec![payload(6)])]).await.unwrap();
    assert_eq!(numbers(&bus.read("run", None, 10).await.unwrap()), [0, 1, 2, 3, 5, 6]);
}

/// Appends conditioned on holding a group's entry land while it is held, and are refused —
/// every stream of the call — once another consumer has claimed it or it was acknowledged.
async fn appends_of_a_holder_stop_when_it_loses_its_entry(env: TestEnv) {
    let bus = env.bus();
    bus.create_group("jobs", "w", GroupStart::Beginning).await.unwrap();
    append_n(&bus, "jobs", 0..1).await;
    let job = bus.read_group("jobs", "w", "first", 1, Duration::ZERO).await.unwrap().remove(0);
    let holder = |consumer: &str| csp_bus::Holder {
        stream: "jobs".into(),
        group: "w".into(),
        consumer: consumer.into(),
        id: job.event.id,
    };
    let events =
        |i| vec![Append::new("run", vec![payload(i)], None), Append::new("runs", vec![payload(i)], None)];
    bus.append_held(&holder("first"), events(0)).await.unwrap();
    let refused = bus.append_held(&holder("second"), events(1)).await;
    assert!(matches!(refused, Err(BusError::NotHeld { .. })), "{refused:?}");

    // Taken over: the first holder's appends are refused, the new one's land.
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert_eq!(bus.claim_idle("jobs", "w", "second", Duration::from_millis(100), 1).await.unwrap().len(), 1);
    let refused = bus.append_held(&holder("first"), events(2)).await;
    assert!(matches!(refused, Err(BusError::NotHeld { .. })), "{refused:?}");
    bus.append_held(&holder("second"), events(3)).await.unwrap();
    // Acknowledged: nobody holds it.
    bus.ack("jobs", "w", &[job.event.id]).await.unwrap();
    assert!(bus.append_held(&holder("second"), events(4)).await.is_err());
    assert_eq!(numbers(&bus.read("run", None, 10).await.unwrap()), [0, 3]);
    assert_eq!(numbers(&bus.read("runs", None, 10).await.unwrap()), [0, 3]);
    let no_group = csp_bus::Holder { group: "none".into(), ..holder("second") };
    assert!(matches!(bus.append_held(&no_group, events(5)).await, Err(BusError::NotHeld { .. })));
}

/// The backlog counts what waits and what is pending; compacting removes only what every
/// consumer is done with.
async fn a_queue_reports_its_backlog_and_compacts(env: TestEnv) {
    let bus = env.bus();
    bus.create_group("queue", "w", GroupStart::Beginning).await.unwrap();
    append_n(&bus, "queue", 0..10).await;
    assert_eq!(bus.backlog("queue", "w").await.unwrap(), csp_bus::Backlog { waiting: 10, pending: 0 });
    let taken = bus.read_group("queue", "w", "c", 4, Duration::ZERO).await.unwrap();
    assert_eq!(bus.backlog("queue", "w").await.unwrap(), csp_bus::Backlog { waiting: 6, pending: 4 });
    // Acknowledge the 1st, 2nd and 4th: the 3rd still pends, so only two can go.
    let ids: Vec<EventId> = taken.iter().map(|d| d.event.id).collect();
    bus.ack("queue", "w", &[ids[0], ids[1], ids[3]]).await.unwrap();
    assert_eq!(bus.compact("queue", "w", Duration::from_secs(3600)).await.unwrap(), 2);
    assert_eq!(bus.len("queue").await.unwrap(), 8);
    assert_eq!(bus.backlog("queue", "w").await.unwrap(), csp_bus::Backlog { waiting: 6, pending: 1 });
    bus.ack("queue", "w", &[ids[2]]).await.unwrap();
    assert_eq!(bus.compact("queue", "w", Duration::from_secs(3600)).await.unwrap(), 2);
    // What was never delivered stays, and is still delivered.
    let rest = bus.read_group("queue", "w", "c", 10, Duration::ZERO).await.unwrap();
    assert_eq!(numbers(&rest.iter().map(|d| d.event.clone()).collect::<Vec<_>>()), [4, 5, 6, 7, 8, 9]);
    let ids: Vec<EventId> = rest.iter().map(|d| d.event.id).collect();
    bus.ack("queue", "w", &ids).await.unwrap();
    assert_eq!(bus.compact("queue", "w", Duration::ZERO).await.unwrap(), 6);
    assert_eq!(bus.backlog("queue", "w").await.unwrap(), csp_bus::Backlog { waiting: 0, pending: 0 });
    // New entries after a full compaction are delivered as usual.
    append_n(&bus, "queue", 10..12).await;
    assert_eq!(bus.backlog("queue", "w").await.unwrap(), csp_bus::Backlog { waiting: 2, pending: 0 });
    assert!(matches!(bus.backlog("no-queue", "w").await, Err(BusError::NoGroup { .. })));
}

async fn deleting_a_stream_removes_it(env: TestEnv) {
    let bus = env.bus();
    append_n(&bus, "gone", 0..3).await;
    bus.delete("gone").await.unwrap();
    assert_eq!(bus.len("gone").await.unwrap(), 0);
    assert!(bus.read("gone", None, 10).await.unwrap().is_empty());
    bus.ping().await.unwrap();
}

async fn counters_count_within_a_fixed_window(env: TestEnv) {
    let bus = env.bus();
    let window = Duration::from_millis(600);
    assert_eq!(bus.count("fails:alice").await.unwrap(), 0);
    assert_eq!(bus.ttl("fails:alice").await.unwrap(), None);
    for expected in 1..=3 {
        assert_eq!(bus.hit("fails:alice", window).await.unwrap(), expected);
    }
    assert_eq!(bus.add("fails:alice", 10, window).await.unwrap(), 13);
    assert_eq!(bus.count("fails:alice").await.unwrap(), 13);
    assert_eq!(bus.count("fails:bob").await.unwrap(), 0, "keys are independent");
    let ttl = bus.ttl("fails:alice").await.unwrap().unwrap();
    assert!(ttl <= window && ttl > Duration::from_millis(100), "{ttl:?}");

    // Hits do not extend the window; it ends, and the count starts over.
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(bus.count("fails:alice").await.unwrap(), 0);
    assert_eq!(bus.ttl("fails:alice").await.unwrap(), None);
    assert_eq!(bus.hit("fails:alice", window).await.unwrap(), 1);

    bus.set("lock:alice", 1, Duration::from_secs(30)).await.unwrap();
    assert!(bus.ttl("lock:alice").await.unwrap().unwrap() > Duration::from_secs(25));
    bus.reset("lock:alice").await.unwrap();
    assert_eq!(bus.ttl("lock:alice").await.unwrap(), None);
}

async fn concurrent_hits_are_all_counted(env: TestEnv) {
    let bus = env.bus();
    let hits: Vec<_> = (0..200)
        .map(|_| {
            let bus = bus.clone();
            tokio::spawn(async move { bus.hit("shared", Duration::from_secs(30)).await.unwrap() })
        })
        .collect();
    let mut seen = HashSet::new();
    for hit in hits {
        assert!(seen.insert(hit.await.unwrap()), "every hit sees its own count");
    }
    assert_eq!(seen, (1..=200).collect::<HashSet<u64>>());
}

/// Reserve-then-settle: a reservation takes from every counter or from none, racing
/// reservers never pass a limit together, and settling gives back what was not used.
async fn reservations_never_pass_a_limit(env: TestEnv) {
    let bus = env.bus();
    let ttl = Duration::from_secs(60);
    let claim = |key: &str, amount: u64, limit: u64| Claim { key: key.into(), amount, limit, ttl };
    assert_eq!(
        bus.reserve(&[claim("tokens", 60, 100), claim("spend", 5, 10)]).await.unwrap(),
        Reserved::Granted
    );
    assert_eq!(bus.count("tokens").await.unwrap(), 60);
    // The second claim would pass its limit: nothing is taken from either.
    assert_eq!(
        bus.reserve(&[claim("tokens", 30, 100), claim("spend", 6, 10)]).await.unwrap(),
        Reserved::Refused(1)
    );
    assert_eq!((bus.count("tokens").await.unwrap(), bus.count("spend").await.unwrap()), (60, 5));
    assert!(bus.ttl("tokens").await.unwrap().unwrap() > Duration::from_secs(50));

    // Settling: 60 reserved, 25 used; a refund never goes below zero.
    let adjust = |key: &str, delta: i64| Adjust { key: key.into(), delta, ttl };
    bus.adjust(&[adjust("tokens", -35), adjust("spend", -100)]).await.unwrap();
    assert_eq!((bus.count("tokens").await.unwrap(), bus.count("spend").await.unwrap()), (25, 0));

    // Many at once: exactly as many as fit are granted.
    let racers: Vec<_> = (0..50)
        .map(|_| {
            let bus = bus.clone();
            tokio::spawn(async move {
                bus.reserve(&[Claim {
                    key: "race".into(),
                    amount: 7,
                    limit: 100,
                    ttl: Duration::from_secs(60),
                }])
                .await
                .unwrap()
            })
        })
        .collect();
    let mut granted = 0;
    for racer in racers {
        granted += usize::from(racer.await.unwrap() == Reserved::Granted);
    }
    assert_eq!(granted, 14);
    assert_eq!(bus.count("race").await.unwrap(), 98);
}

/// Token buckets: a burst, then one token per interval; racing takers never get more than
/// the bucket holds; buckets are independent.
async fn token_buckets_allow_a_burst_then_the_rate(env: TestEnv) {
    let bus = env.bus();
    let rate = Rate { per_second: 10.0, burst: 5 };
    for i in 0..5 {
        assert_eq!(bus.throttle("user:a", rate).await.unwrap(), Throttled::Allowed, "token {i} of the burst");
    }
    let Throttled::Wait(wait) = bus.throttle("user:a", rate).await.unwrap() else {
        panic!("the bucket is empty after its burst");
    };
    assert!(wait > Duration::ZERO && wait <= Duration::from_millis(100), "{wait:?}");
    assert_eq!(bus.throttle("user:b", rate).await.unwrap(), Throttled::Allowed, "buckets are independent");
    // After the wait, one token; not two.
    tokio::time::sleep(wait + Duration::from_millis(5)).await;
    assert_eq!(bus.throttle("user:a", rate).await.unwrap(), Throttled::Allowed);
    assert!(matches!(bus.throttle("user:a", rate).await.unwrap(), Throttled::Wait(_)));

    // 100 racers on a bucket of 20 at 1 a second: 20 get a token (21 if a second passes).
    let rate = Rate { per_second: 1.0, burst: 20 };
    let racers: Vec<_> = (0..100)
        .map(|_| {
            let bus = bus.clone();
            tokio::spawn(async move { bus.throttle("race", rate).await.unwrap() })
        })
        .collect();
    let mut allowed = 0;
    for racer in racers {
        allowed += usize::from(racer.await.unwrap() == Throttled::Allowed);
    }
    assert!((20..=21).contains(&allowed), "{allowed}");
}

csp_testkit::backend_tests!(
    token_buckets_allow_a_burst_then_the_rate,
    appends_of_a_holder_stop_when_it_loses_its_entry,
    a_released_entry_is_claimed_at_once,
    a_sealed_stream_refuses_guarded_appends,
    a_queue_reports_its_backlog_and_compacts,
    reservations_never_pass_a_limit,
    counters_count_within_a_fixed_window,
    concurrent_hits_are_all_counted,
    appends_keep_order_and_round_trip,
    readers_resume_without_gaps_or_repeats,
    the_cap_holds_and_trimmed_history_is_reported,
    appends_to_several_streams_land_in_order,
    batches_append_in_order_and_respect_the_cap,
    tails_see_backlog_then_live_events,
    many_concurrent_tails_each_get_their_stream,
    a_slow_tail_loses_nothing,
    a_group_delivers_each_entry_to_one_consumer,
    groups_start_where_asked_and_must_exist,
    a_blocked_group_read_wakes_on_append_and_times_out_empty,
    entries_of_a_stopped_consumer_are_claimed_after_the_idle_time,
    a_touched_lease_is_not_claimed_and_a_claimed_one_not_touched_back,
    deleting_a_stream_removes_it,
);
