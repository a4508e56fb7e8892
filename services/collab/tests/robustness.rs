//! Clients and designs that misbehave cannot slow the others, on both backends.

#![allow(clippy::unwrap_used, clippy::print_stdout)]

mod common;

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use common::{add_node, at, is_change, is_presence};
use csp_bus::NewEvent;
use csp_proto::{collab::v1 as pb, design::v1 as dpb};
use csp_testkit::{TestEnv, authed};
use pb::collab_event::Kind;
use serde_json::json;
use tonic::transport::Endpoint;

type Arrivals = Arc<Mutex<HashMap<u64, Instant>>>;

/// Reads a stream in the background, noting when each cursor position of `watched` arrives
/// and which revisions come, until `last_revision`.
fn reader(
    mut joined: common::Joined,
    watched: String,
    last_revision: i64,
) -> (Arrivals, tokio::task::JoinHandle<Vec<i64>>) {
    let arrivals: Arrivals = Arc::default();
    let noted = arrivals.clone();
    let task = tokio::spawn(async move {
        let mut revisions = Vec::new();
        loop {
            let event = joined.next().await;
            match event.kind.as_ref() {
                Some(Kind::PresenceChanged(p)) if p.session_id == watched => {
                    let x = p.presence.as_ref().unwrap().cursor.as_ref().unwrap().x as u64;
                    noted.lock().unwrap().insert(x, Instant::now());
                }
                Some(Kind::DesignChanged(c)) => {
                    revisions.push(c.revision);
                    if c.revision == last_revision {
                        return revisions;
                    }
                }
                _ => {}
            }
        }
    });
    (arrivals, task)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// Carol moves her cursor `moves` times and edits `edits` times; returns when each move was
/// sent, and the last revision.
async fn traffic(
    h: &common::Harness,
    design: &str,
    token: &str,
    session: &str,
    base: u64,
    moves: u64,
    edits: i64,
) -> (HashMap<u64, Instant>, i64) {
    let mut sent = HashMap::new();
    let mut revision = h.revision(token, design).await;
    for i in 0..moves {
        let x = base + i;
        sent.insert(x, Instant::now());
        h.presence((i % h.replicas.len() as u64) as usize, token, session, x as f64).await.unwrap();
        if edits > 0 && i % (moves / edits as u64).max(1) == 0 {
            revision = h
                .apply(token, design, revision, vec![add_node(&format!("n{x}"), "sink.log", json!({}))])
                .await
                .unwrap();
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    (sent, revision)
}

fn latencies(sent: &HashMap<u64, Instant>, arrived: &Arrivals) -> Vec<Duration> {
    let arrived = arrived.lock().unwrap();
    let mut out: Vec<Duration> =
        arrived.iter().filter_map(|(x, at)| Some(at.duration_since(*sent.get(x)?))).collect();
    out.sort();
    out
}

/// A client that never reads its stream costs the others nothing: their cursor latency with
/// it present stays what it is without it, every edit reaches them, and the stuck client,
/// once it reads again, is told to start over from a fresh snapshot.
async fn a_client_that_never_reads_does_not_delay_the_others(env: TestEnv) {
    let h = common::start(&env, 2, |s| {
        s.collab.send_queue = 16;
        s.collab.presence_tick = Duration::from_millis(1);
    })
    .await;
    let (ada, cy, sam) = (h.designer("ada"), h.designer("cy"), h.designer("sam"));
    let design = h.create(&ada, "Stuck").await;
    for user in ["cy", "sam"] {
        h.share(&ada, &design, user, dpb::Access::Editor).await;
    }
    let c = h.join(1, &cy, &design).await;

    // Without the stuck client.
    let a = h.join(0, &ada, &design).await;
    let (arrived, done) = reader(a, c.session_id.clone(), 4);
    let (sent, _) = traffic(&h, &design, &cy, &c.session_id, 0, 150, 3).await;
    done.await.unwrap();
    let before = latencies(&sent, &arrived);

    // Sam joins over a connection whose flow-control window he never opens, and stops reading.
    let channel = Endpoint::from_shared(format!("http://{}", h.replicas[0].addr))
        .unwrap()
        .initial_stream_window_size(Some(1024))
        .connect()
        .await
        .unwrap();
    let request = pb::JoinRequest { design_id: design.clone(), ..Default::default() };
    let mut stuck = pb::collaboration_service_client::CollaborationServiceClient::new(channel)
        .join(authed(request, &sam))
        .await
        .unwrap()
        .into_inner();
    stuck.message().await.unwrap().unwrap();

    let a = h.join(0, &ada, &design).await;
    let (arrived, done) = reader(a, c.session_id.clone(), 14);
    let (sent, last) = traffic(&h, &design, &cy, &c.session_id, 1000, 600, 10).await;
    let revisions = done.await.unwrap();
    assert_eq!(last, 14);
    assert_eq!(revisions, (5..=14).collect::<Vec<_>>(), "every edit, in order");
    let after = latencies(&sent, &arrived);
    assert!(after.len() > 300, "{}", after.len());
    let (p50, p99) = (percentile(&after, 0.5), percentile(&after, 0.99));
    println!(
        "cursor latency p50/p99 without a stuck client {:?}/{:?}, with one {p50:?}/{p99:?} ({} moves seen)",
        percentile(&before, 0.5),
        percentile(&before, 0.99),
        after.len()
    );
    assert!(
        p99 < percentile(&before, 0.99) + Duration::from_millis(500),
        "the stuck client slowed the others"
    );

    // Sam reads again: what fit in his queue, then a fresh snapshot in place of what did not,
    // then live events.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let event =
            tokio::time::timeout(Duration::from_secs(10), stuck.message()).await.unwrap().unwrap().unwrap();
        let event = event.event.unwrap();
        if let Some(Kind::Snapshot(s)) = &event.kind {
            assert!(s.resync);
            assert_eq!(s.design_revision, 14);
            break;
        }
        assert!(Instant::now() < deadline, "no fresh snapshot");
    }
    h.presence(0, &cy, &c.session_id, 5.0).await.unwrap();
    loop {
        let event =
            tokio::time::timeout(Duration::from_secs(10), stuck.message()).await.unwrap().unwrap().unwrap();
        if event.event.unwrap().kind.as_ref().and_then(is_presence).is_some() {
            break;
        }
    }
}

/// A design whose log fills with garbage and a huge burst does not stall another design's
/// fan-out, and its own room survives it.
async fn a_misbehaving_design_does_not_stall_the_others(env: TestEnv) {
    let h = common::start(&env, 1, |s| s.collab.presence_tick = Duration::from_millis(1)).await;
    let (ada, cy, xav) = (h.designer("ada"), h.designer("cy"), h.designer("xav"));
    let calm = h.create(&ada, "Calm").await;
    h.share(&ada, &calm, "cy", dpb::Access::Editor).await;
    let noisy = h.create(&xav, "Noisy").await;
    let mut x = h.join(0, &xav, &noisy).await;
    let c = h.join(0, &cy, &calm).await;

    // The noisy design's log: malformed entries and valid-looking ones, as fast as they go.
    let bus = h.env.bus();
    let log = csp_collab::log_name(&noisy);
    let flood = tokio::spawn(async move {
        for round in 0..40 {
            let batch: Vec<NewEvent> = (0..500)
                .map(|i| {
                    if i % 2 == 0 {
                        NewEvent::new(vec![0xff, 0x00, round as u8, i as u8])
                    } else {
                        let event = pb::CollabEvent {
                            kind: Some(Kind::PresenceChanged(pb::PresenceChanged {
                                session_id: format!("{}.{}", uuid_like(), "0".repeat(32)),
                                presence: Some(at(f64::from(i))),
                            })),
                            ..Default::default()
                        };
                        NewEvent::new(prost::Message::encode_to_vec(&event))
                    }
                })
                .collect();
            bus.append_all(&log, batch, Some(10_000)).await.unwrap();
        }
    });

    let a = h.join(0, &ada, &calm).await;
    let (arrived, done) = reader(a, c.session_id.clone(), 6);
    let (sent, last) = traffic(&h, &calm, &cy, &c.session_id, 0, 200, 5).await;
    flood.await.unwrap();
    let revisions = done.await.unwrap();
    assert_eq!((last, revisions), (6, (2..=6).collect::<Vec<_>>()));
    let calm_latency = latencies(&sent, &arrived);
    println!(
        "cursor latency p50/p99 in a calm design beside a flooded one: {:?}/{:?}",
        percentile(&calm_latency, 0.5),
        percentile(&calm_latency, 0.99)
    );
    assert!(percentile(&calm_latency, 0.99) < Duration::from_secs(1));

    // The noisy design's room still works: an edit reaches Xavier.
    h.apply(&xav, &noisy, 1, vec![add_node("survivor", "sink.log", json!({}))]).await.unwrap();
    x.until(|k| is_change(k).is_some_and(|c| c.revision == 2)).await;
}

fn uuid_like() -> &'static str {
    "0192b5c8-7f00-7000-8000-00000000abcd"
}

csp_testkit::backend_tests!(
    a_client_that_never_reads_does_not_delay_the_others,
    a_misbehaving_design_does_not_stall_the_others,
);
