//! `collab`: 100 clients on one design, spread over two collaboration replicas on PostgreSQL +
//! Redis (each replica with its own Redis connections, as separate processes have), each
//! moving its cursor 10 times a second; meanwhile an editor commits an edit twice a second.
//!
//! Reports the delivery latency of a cursor move from the UpdatePresence call to each other
//! client's stream (p50, p99), the events delivered, the moves coalesced on the server (a
//! later move of the same client replaced them before they went out) and dropped from slow
//! clients' queues, and the latency of an edit from the ApplyOps call to every joined client,
//! with the edits any client missed.

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use csp_platform::{Settings, auth::Role, server::bind};
use csp_proto::{
    collab::v1::{self as pb, collaboration_service_client::CollaborationServiceClient},
    design::v1::{self as dpb, design_service_client::DesignServiceClient},
};
use csp_testkit::{TestEnv, TestIssuer, authed};
use pb::collab_event::Kind;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

const CLIENTS: usize = 100;
const REPLICAS: usize = 2;
const MOVES_PER_SECOND: u64 = 10;
const EDITS_EVERY: Duration = Duration::from_millis(500);
const RUN_FOR: Duration = Duration::from_secs(10);

pub(crate) fn run() -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async {
        let env = crate::external_env().await;
        let outcome = measure(&env).await;
        env.teardown().await;
        outcome
    })
}

async fn connect(addr: std::net::SocketAddr) -> anyhow::Result<Channel> {
    Ok(Channel::from_shared(format!("http://{addr}"))?.connect().await?)
}

/// What every client reads: moves (sender, sequence) with their arrival, edits with theirs.
#[derive(Default)]
struct Seen {
    moves: Vec<((usize, u64), Instant)>,
    edits: Vec<(i64, Instant)>,
    events: u64,
    resyncs: u64,
}

async fn measure(env: &TestEnv) -> anyhow::Result<()> {
    let issuer = TestIssuer::start().await;
    let mut settings: Settings = env.settings();
    issuer.point(&mut settings);
    settings.log.level = "error".into();
    let stop = CancellationToken::new();
    let listener = bind("registry", "127.0.0.1:0".parse()?).await?;
    let registry = csp_registry::Application::with_listener(&settings, env.bus(), listener).await?;
    settings.services.registry.address = format!("http://{}", registry.local_addr());
    tokio::spawn(registry.run_until_stopped(stop.clone().cancelled_owned()));
    let listener = bind("design", "127.0.0.1:0".parse()?).await?;
    let design = csp_design::Application::with_listener(&settings, env.bus(), listener).await?;
    let design_addr = design.local_addr();
    settings.services.design.address = format!("http://{design_addr}");
    tokio::spawn(design.run_until_stopped(stop.clone().cancelled_owned()));
    let mut replicas = Vec::new();
    for _ in 0..REPLICAS {
        let listener = bind("collab", "127.0.0.1:0".parse()?).await?;
        let app = csp_collab::Application::with_listener(&settings, env.own_bus().await, listener).await?;
        replicas.push(app.local_addr());
        tokio::spawn(app.run_until_stopped(stop.clone().cancelled_owned()));
    }

    let owner = issuer.token("owner", &[Role::Designer]);
    let mut designs = DesignServiceClient::new(connect(design_addr).await?);
    let request = dpb::CreateDesignRequest { name: "Crowded".into(), ..Default::default() };
    let id = designs.create_design(authed(request, &owner)).await?.into_inner().design.unwrap_or_default().id;
    for i in 0..CLIENTS {
        let request = dpb::ShareDesignRequest {
            design_id: id.clone(),
            user_id: format!("user{i}"),
            access: dpb::Access::Editor as i32,
        };
        designs.share_design(authed(request, &owner)).await?;
    }

    // Join everyone (one connection each, as browser tabs have), alternating replicas.
    let mut joined = Vec::new();
    for i in 0..CLIENTS {
        let token = issuer.token(&format!("user{i}"), &[Role::Designer]);
        let mut client = CollaborationServiceClient::new(connect(replicas[i % REPLICAS]).await?);
        let request = pb::JoinRequest { design_id: id.clone(), ..Default::default() };
        let mut events = client.join(authed(request, &token)).await?.into_inner();
        let first = events.message().await?.and_then(|r| r.event).and_then(|e| e.kind);
        let Some(Kind::Snapshot(snapshot)) = first else { anyhow::bail!("no snapshot") };
        joined.push((client, token, snapshot.session_id, events));
    }
    let sessions: HashMap<String, usize> = joined.iter().enumerate().map(|(i, j)| (j.2.clone(), i)).collect();
    let sessions = Arc::new(sessions);

    let sent: Arc<Mutex<HashMap<(usize, u64), Instant>>> = Arc::default();
    let edits: Arc<Mutex<HashMap<i64, Instant>>> = Arc::default();
    let running = CancellationToken::new();
    // The edit committed after every move: a reader that has it has everything before it.
    let last_edit = Arc::new(std::sync::atomic::AtomicI64::new(i64::MAX));
    let mut readers = Vec::new();
    let mut writers = Vec::new();
    for (i, (client, token, session, mut events)) in joined.into_iter().enumerate() {
        let sessions = sessions.clone();
        let last_edit = last_edit.clone();
        readers.push(tokio::spawn(async move {
            let mut seen = Seen::default();
            loop {
                let message = tokio::time::timeout(Duration::from_secs(10), events.message()).await;
                let Ok(Ok(Some(response))) = message else { break };
                let now = Instant::now();
                seen.events += 1;
                match response.event.and_then(|e| e.kind) {
                    Some(Kind::PresenceChanged(p)) => {
                        let x = p.presence.and_then(|p| p.cursor).map_or(0.0, |c| c.x) as u64;
                        if let Some(sender) = sessions.get(&p.session_id) {
                            seen.moves.push(((*sender, x), now));
                        }
                    }
                    Some(Kind::DesignChanged(c)) => {
                        seen.edits.push((c.revision, now));
                        if c.revision >= last_edit.load(std::sync::atomic::Ordering::SeqCst) {
                            break;
                        }
                    }
                    Some(Kind::Snapshot(s)) if s.resync => seen.resyncs += 1,
                    _ => {}
                }
            }
            seen
        }));
        let sent = sent.clone();
        let done = running.clone();
        writers.push(tokio::spawn(async move {
            let mut client = client;
            // Spread the clients' ticks over the period.
            let period = Duration::from_millis(1000 / MOVES_PER_SECOND);
            tokio::time::sleep(period * i as u32 / CLIENTS as u32).await;
            let mut tick = tokio::time::interval(period);
            let mut seq = 0u64;
            while !done.is_cancelled() {
                tick.tick().await;
                seq += 1;
                sent.lock().map_err(|_| anyhow::anyhow!("poisoned"))?.insert((i, seq), Instant::now());
                let request = pb::UpdatePresenceRequest {
                    session_id: session.clone(),
                    presence: Some(pb::Presence {
                        cursor: Some(pb::Cursor { x: seq as f64, y: i as f64 }),
                        ..Default::default()
                    }),
                };
                client.update_presence(authed(request, &token)).await?;
            }
            anyhow::Ok(seq)
        }));
    }
    let editor = {
        let (edits, done, id, owner) = (edits.clone(), running.clone(), id.clone(), owner.clone());
        let mut designs = designs.clone();
        tokio::spawn(async move {
            let mut revision = 1;
            let mut tick = tokio::time::interval(EDITS_EVERY);
            let mut last = false;
            while !last {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = done.cancelled() => {
                        // The last edit, once the last moves have gone out.
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        last = true;
                    }
                }
                let op = dpb::Op {
                    op: Some(dpb::op::Op::AddNode(dpb::AddNodeOp {
                        node: Some(dpb::Node {
                            id: format!("n{revision}"),
                            r#type: "sink.log".into(),
                            ..Default::default()
                        }),
                    })),
                };
                let request = dpb::ApplyOpsRequest {
                    design_id: id.clone(),
                    expected_revision: revision,
                    ops: vec![op],
                };
                let started = Instant::now();
                edits.lock().map_err(|_| anyhow::anyhow!("poisoned"))?.insert(revision + 1, started);
                revision = designs.apply_ops(authed(request, &owner)).await?.into_inner().revision;
            }
            anyhow::Ok(revision)
        })
    };

    tokio::time::sleep(RUN_FOR).await;
    running.cancel();
    let mut moves_sent = 0;
    for writer in writers {
        moves_sent += writer.await??;
    }
    let last_revision = editor.await??;
    last_edit.store(last_revision, std::sync::atomic::Ordering::SeqCst);
    let mut all = Vec::new();
    for reader in readers {
        all.push(reader.await?);
    }
    stop.cancel();

    let sent = sent.lock().map_err(|_| anyhow::anyhow!("poisoned"))?.clone();
    let edits = edits.lock().map_err(|_| anyhow::anyhow!("poisoned"))?.clone();
    let mut presence_latency = Vec::new();
    let mut edit_latency = Vec::new();
    let mut logged: HashSet<(usize, u64)> = HashSet::new();
    let (mut events, mut resyncs, mut lost_edits) = (0, 0, 0);
    for seen in &all {
        events += seen.events;
        resyncs += seen.resyncs;
        for (key, at) in &seen.moves {
            logged.insert(*key);
            if let Some(sent) = sent.get(key) {
                presence_latency.push(at.duration_since(*sent));
            }
        }
        let revisions: HashSet<i64> = seen.edits.iter().map(|(r, _)| *r).collect();
        lost_edits += (2..=last_revision).filter(|r| !revisions.contains(r)).count();
        for (revision, at) in &seen.edits {
            if let Some(started) = edits.get(revision) {
                edit_latency.push(at.duration_since(*started));
            }
        }
    }
    // Every logged move should reach the 99 other clients.
    let expected: usize = logged.len() * (CLIENTS - 1);
    let delivered = presence_latency.len();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let pct = |v: &mut Vec<Duration>, p: f64| {
        v.sort();
        v.get(((v.len().max(1) - 1) as f64 * p).round() as usize).copied().unwrap_or_default()
    };
    println!(
        "collab: {CLIENTS} clients on one design over {REPLICAS} replicas (PostgreSQL + Redis), {MOVES_PER_SECOND} moves/s each for {}s: \
         cursor p50 {:.1} ms, p99 {:.1} ms; {events} events delivered; {moves_sent} moves sent, {} coalesced on the server, {} dropped from send queues ({resyncs} resyncs); \
         edits ({}, one per {} ms) p50 {:.1} ms, p99 {:.1} ms, {lost_edits} lost",
        RUN_FOR.as_secs(),
        ms(pct(&mut presence_latency, 0.5)),
        ms(pct(&mut presence_latency, 0.99)),
        (moves_sent as usize).saturating_sub(logged.len()),
        expected.saturating_sub(delivered),
        last_revision - 1,
        EDITS_EVERY.as_millis(),
        ms(pct(&mut edit_latency, 0.5)),
        ms(pct(&mut edit_latency, 0.99)),
    );
    Ok(())
}
