//! How sessions end — left, timed out, on a replica that stopped, access withdrawn, design
//! deleted — and what bad input gets, on both backends.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::{at, is_left};
use csp_proto::{collab::v1 as pb, design::v1 as dpb};
use csp_testkit::{TestEnv, authed};
use pb::collab_event::Kind;
use tonic::Code;
use tonic_types::StatusExt as _;

fn quick(settings: &mut csp_platform::Settings) {
    settings.collab.session_timeout = Duration::from_secs(2);
    settings.collab.heartbeat_interval = Duration::from_secs(1);
}

fn left_reason(event: &pb::CollabEvent) -> (String, i32) {
    let left = is_left(event.kind.as_ref().unwrap()).unwrap();
    (left.session_id.clone(), left.leave_reason)
}

/// Keeps a session alive until the returned task is aborted.
fn keep_alive(
    h: &common::Harness,
    replica: usize,
    token: &str,
    session: &str,
) -> tokio::task::JoinHandle<()> {
    let (client, token, session) = (h.on(replica), token.to_owned(), session.to_owned());
    tokio::spawn(async move {
        loop {
            let request = pb::HeartbeatRequest { session_id: session.clone() };
            let _ = client.clone().heartbeat(authed(request, &token)).await;
            tokio::time::sleep(Duration::from_millis(400)).await;
        }
    })
}

/// A session whose heartbeats stop is announced as timed out, its stream ends, and it can no
/// longer be used; one that heartbeats stays.
async fn a_silent_session_times_out(env: TestEnv) {
    let h = common::start(&env, 2, quick).await;
    let (ada, bob) = (h.designer("ada"), h.designer("bob"));
    let design = h.create(&ada, "Heartbeats").await;
    h.share(&ada, &design, "bob", dpb::Access::Editor).await;
    let mut a = h.join(0, &ada, &design).await;
    let alive = keep_alive(&h, 1, &ada, &a.session_id);
    let mut b = h.join(1, &bob, &design).await;
    let joined = Instant::now();

    let event = a.until(|k| is_left(k).is_some()).await;
    let waited = joined.elapsed();
    assert_eq!(left_reason(&event), (b.session_id.clone(), pb::LeaveReason::TimedOut as i32));
    assert!(waited >= Duration::from_millis(1900), "not before the timeout: {waited:?}");
    b.ended().await;
    let expired = h.heartbeat(0, &bob, &b.session_id).await.unwrap_err();
    assert_eq!(expired.code(), Code::NotFound);
    assert_eq!(h.presence(1, &bob, &b.session_id, 1.0).await.unwrap_err().code(), Code::NotFound);

    // Ada heartbeated all along: still there, with a lease from now.
    let lease = h.heartbeat(1, &ada, &a.session_id).await.unwrap();
    let expires = lease.expires_at.unwrap().seconds * 1000;
    let now = csp_platform::auth::now_millis();
    assert!(expires > now && expires <= now + 2_500, "{expires} vs {now}");
    alive.abort();
}

/// The sessions of a replica that stopped are announced as left by the others once their
/// heartbeats stop.
async fn a_stopped_replicas_sessions_are_announced(env: TestEnv) {
    let h = common::start(&env, 2, quick).await;
    let (ada, bob) = (h.designer("ada"), h.designer("bob"));
    let design = h.create(&ada, "Replicas").await;
    h.share(&ada, &design, "bob", dpb::Access::Editor).await;
    let mut a = h.join(0, &ada, &design).await;
    let alive = keep_alive(&h, 0, &ada, &a.session_id);
    let b = h.join(1, &bob, &design).await;
    let bobs = keep_alive(&h, 1, &bob, &b.session_id);
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Replica 1 goes away, and Bob with it.
    h.replicas[1].stop.cancel();
    bobs.abort();
    let gone = Instant::now();
    let event = a.until(|k| is_left(k).is_some()).await;
    assert_eq!(left_reason(&event), (b.session_id.clone(), pb::LeaveReason::TimedOut as i32));
    assert!(gone.elapsed() < Duration::from_secs(5), "{:?}", gone.elapsed());
    alive.abort();
}

/// Access changes reach every session; withdrawing it ends the user's sessions, deleting the
/// design ends all of them, and a deleted design cannot be joined.
async fn withdrawn_access_and_deletion_end_sessions(env: TestEnv) {
    let h = common::start(&env, 2, |_| {}).await;
    let (ada, bob) = (h.designer("ada"), h.designer("bob"));
    let design = h.create(&ada, "Access").await;
    h.share(&ada, &design, "bob", dpb::Access::Editor).await;
    let mut a = h.join(0, &ada, &design).await;
    let mut b = h.join(1, &bob, &design).await;

    h.share(&ada, &design, "bob", dpb::Access::Viewer).await;
    for stream in [&mut a, &mut b] {
        let event = stream.until(|k| matches!(k, Kind::AccessChanged(_))).await;
        let Some(Kind::AccessChanged(change)) = event.kind else { unreachable!() };
        assert_eq!((change.user_id.as_str(), change.access), ("bob", dpb::Access::Viewer as i32));
    }
    let c = h.join(0, &h.designer("ada"), &design).await;
    let bob_now =
        c.snapshot.as_ref().unwrap().participants.iter().find(|p| p.user_id == "bob").unwrap().clone();
    assert!(!bob_now.can_edit, "a later snapshot knows too");

    h.unshare(&ada, &design, "bob").await;
    let event = a.until(|k| is_left(k).is_some()).await;
    assert_eq!(left_reason(&event), (b.session_id.clone(), pb::LeaveReason::AccessRevoked as i32));
    b.ended().await;
    let last = b.seen.last().unwrap();
    assert_eq!(left_reason(last), (b.session_id.clone(), pb::LeaveReason::AccessRevoked as i32));
    let again = h
        .join_with(1, &bob, pb::JoinRequest { design_id: design.clone(), ..Default::default() })
        .await
        .err()
        .unwrap();
    assert_eq!(again.code(), Code::NotFound);

    let request = dpb::DeleteDesignRequest {
        design_id: design.clone(),
        expected_revision: h.revision(&ada, &design).await,
    };
    h.designs.clone().delete_design(authed(request, &ada)).await.unwrap();
    a.ended().await;
    assert!(a.seen.iter().any(|e| matches!(&e.kind, Some(Kind::DesignChanged(c)) if c.deleted)));
    assert_eq!(
        left_reason(a.seen.last().unwrap()),
        (a.session_id.clone(), pb::LeaveReason::DesignDeleted as i32)
    );
    let deleted = h
        .join_with(0, &ada, pb::JoinRequest { design_id: design.clone(), ..Default::default() })
        .await
        .err()
        .unwrap();
    assert_eq!(deleted.code(), Code::NotFound);
}

fn fields(status: &tonic::Status) -> Vec<String> {
    status
        .get_details_bad_request()
        .map(|b| b.field_violations.into_iter().map(|v| v.field).collect())
        .unwrap_or_default()
}

/// Bad ids and absurd presence get clear statuses naming the field; nothing echoes a huge
/// input; someone else's session is as unknown as a made-up one.
async fn bad_input_gets_clear_statuses(env: TestEnv) {
    let h = common::start(&env, 1, |s| s.collab.max_sessions_per_user = 3).await;
    let (ada, bob) = (h.designer("ada"), h.designer("bob"));
    let design = h.create(&ada, "Strict").await;
    h.share(&ada, &design, "bob", dpb::Access::Editor).await;
    let a = h.join(0, &ada, &design).await;
    let b = h.join(0, &bob, &design).await;

    let huge = "x".repeat(100_000);
    for id in [huge.as_str(), "nope", ""] {
        let status = h.presence(0, &ada, id, 1.0).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);
        assert_eq!(fields(&status), ["session_id"]);
        assert!(status.message().len() < 200, "{}", status.message().len());
    }
    let unknown = format!("{design}.{}", "0".repeat(32));
    assert_eq!(h.heartbeat(0, &ada, &unknown).await.unwrap_err().code(), Code::NotFound);
    let foreign = h.presence(0, &ada, &b.session_id, 1.0).await.unwrap_err();
    assert_eq!(foreign.code(), Code::NotFound);
    assert_eq!(foreign.message(), h.heartbeat(0, &ada, &unknown).await.unwrap_err().message());
    assert_eq!(h.leave(0, &ada, &b.session_id).await.unwrap_err().code(), Code::NotFound);

    let mut absurd = at(f64::NAN);
    absurd.viewport = Some(pb::Viewport { x: 1e308, y: 0.0, width: -5.0, height: 1.0, zoom: 1.0 });
    absurd.selected_node_ids = vec!["n".into(); 10_000];
    let request = pb::UpdatePresenceRequest { session_id: a.session_id.clone(), presence: Some(absurd) };
    let status = h.on(0).update_presence(authed(request, &ada)).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(
        fields(&status),
        ["presence.cursor", "presence.viewport", "presence.viewport", "presence.selected_node_ids"]
    );

    let join = |request: pb::JoinRequest| h.join_with(0, &ada, request);
    let bad = join(pb::JoinRequest { design_id: huge.clone(), ..Default::default() }).await.err().unwrap();
    assert_eq!((bad.code(), fields(&bad)), (Code::InvalidArgument, vec!["design_id".to_owned()]));
    assert!(bad.message().len() < 200);
    let request =
        pb::JoinRequest { design_id: design.clone(), after_event_id: huge.clone(), ..Default::default() };
    assert_eq!(fields(&join(request).await.err().unwrap()), ["after_event_id"]);
    let other = h.create(&ada, "Other").await;
    let request =
        pb::JoinRequest { design_id: other, session_id: a.session_id.clone(), ..Default::default() };
    assert_eq!(fields(&join(request).await.err().unwrap()), ["session_id"]);
    let request =
        pb::JoinRequest { design_id: design.clone(), session_id: b.session_id.clone(), ..Default::default() };
    assert_eq!(join(request).await.err().unwrap().code(), Code::NotFound, "resuming someone else's session");

    // A join naming a position the log never reached starts over with a snapshot.
    let request = pb::JoinRequest {
        design_id: design.clone(),
        session_id: a.session_id.clone(),
        after_event_id: "99999999999999-0".into(),
        ..Default::default()
    };
    let resynced = join(request).await.unwrap();
    assert!(resynced.snapshot.unwrap().resync);

    // One user cannot take every seat.
    let mut tabs = Vec::new();
    let full = loop {
        match h.join_with(0, &bob, pb::JoinRequest { design_id: design.clone(), ..Default::default() }).await
        {
            Ok(tab) => tabs.push(tab),
            Err(status) => break status,
        }
    };
    assert_eq!((full.code(), tabs.len() + 1), (Code::ResourceExhausted, 3), "{full:?}");
    let _ = h.join(0, &ada, &design).await;

    let stats = h.on(0).get_stats(authed(pb::GetStatsRequest {}, &ada)).await.unwrap_err();
    assert_eq!(stats.code(), Code::PermissionDenied);
    let no_token = h.on(0).get_stats(pb::GetStatsRequest {}).await.unwrap_err();
    assert_eq!(no_token.code(), Code::Unauthenticated);
}

/// Session: the same over one bidirectional stream; a bad message ends it with a status;
/// closing the client side leaves.
async fn a_bidirectional_session_works_like_join(env: TestEnv) {
    let h = common::start(&env, 2, |_| {}).await;
    let (ada, bob) = (h.designer("ada"), h.designer("bob"));
    let design = h.create(&ada, "Native").await;
    h.share(&ada, &design, "bob", dpb::Access::Editor).await;
    let mut a = h.join(0, &ada, &design).await;

    let (tx, rx) = tokio::sync::mpsc::channel::<pb::SessionRequest>(8);
    let join = pb::JoinRequest { design_id: design.clone(), ..Default::default() };
    tx.send(pb::SessionRequest { kind: Some(pb::session_request::Kind::Join(join)) }).await.unwrap();
    let request = authed(tokio_stream::wrappers::ReceiverStream::new(rx), &bob);
    let mut events = h.on(1).session(request).await.unwrap().into_inner();
    let first = events.message().await.unwrap().unwrap().event.unwrap();
    let Some(Kind::Snapshot(snapshot)) = first.kind else { panic!("{first:?}") };
    tx.send(pb::SessionRequest { kind: Some(pb::session_request::Kind::Presence(at(5.0))) }).await.unwrap();
    let moved = a.until(|k| common::is_presence(k).is_some()).await;
    assert_eq!(common::is_presence(moved.kind.as_ref().unwrap()).unwrap().session_id, snapshot.session_id);
    tx.send(pb::SessionRequest {
        kind: Some(pb::session_request::Kind::Heartbeat(pb::HeartbeatRequest::default())),
    })
    .await
    .unwrap();
    // Closing the client side leaves.
    drop(tx);
    let event = a.until(|k| is_left(k).is_some()).await;
    assert_eq!(left_reason(&event), (snapshot.session_id.clone(), pb::LeaveReason::Left as i32));
    while let Some(response) =
        tokio::time::timeout(Duration::from_secs(10), events.message()).await.unwrap().unwrap()
    {
        drop(response);
    }

    // A bad message ends the stream with a status naming the field.
    let (tx, rx) = tokio::sync::mpsc::channel::<pb::SessionRequest>(8);
    let join = pb::JoinRequest { design_id: design.clone(), ..Default::default() };
    tx.send(pb::SessionRequest { kind: Some(pb::session_request::Kind::Join(join)) }).await.unwrap();
    let mut events = h
        .on(0)
        .session(authed(tokio_stream::wrappers::ReceiverStream::new(rx), &bob))
        .await
        .unwrap()
        .into_inner();
    events.message().await.unwrap().unwrap();
    tx.send(pb::SessionRequest { kind: Some(pb::session_request::Kind::Presence(at(f64::INFINITY))) })
        .await
        .unwrap();
    let status = loop {
        match tokio::time::timeout(Duration::from_secs(10), events.message()).await.unwrap() {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("ended without a status"),
            Err(status) => break status,
        }
    };
    assert_eq!((status.code(), fields(&status)), (Code::InvalidArgument, vec!["presence.cursor".to_owned()]));

    // The first message must be a join.
    let (tx, rx) = tokio::sync::mpsc::channel::<pb::SessionRequest>(8);
    tx.send(pb::SessionRequest { kind: Some(pb::session_request::Kind::Presence(at(1.0))) }).await.unwrap();
    let status =
        h.on(0).session(authed(tokio_stream::wrappers::ReceiverStream::new(rx), &bob)).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
}

/// GetStats counts this replica's streams and the cluster's sessions and replicas.
async fn stats_count_streams_sessions_and_replicas(env: TestEnv) {
    let h = common::start(&env, 2, |_| {}).await;
    let ada = h.designer("ada");
    let one = h.create(&ada, "One").await;
    let two = h.create(&ada, "Two").await;
    let _a = h.join(0, &ada, &one).await;
    let _b = h.join(0, &ada, &one).await;
    let _c = h.join(1, &ada, &two).await;
    let admin = h.admin("root");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let stats = h.on(0).get_stats(authed(pb::GetStatsRequest {}, &admin)).await.unwrap().into_inner();
        assert_eq!(stats.connections, 2, "streams on this replica");
        assert_eq!(stats.sessions, 3);
        assert_eq!(stats.designs[0].design_id, one, "busiest first");
        assert_eq!((stats.designs[0].sessions, stats.designs[1].sessions), (2, 1));
        if stats.replicas == 2 && stats.cluster_connections == 3 {
            break;
        }
        assert!(Instant::now() < deadline, "replicas never reported: {stats:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

csp_testkit::backend_tests!(
    a_silent_session_times_out,
    a_stopped_replicas_sessions_are_announced,
    withdrawn_access_and_deletion_end_sessions,
    bad_input_gets_clear_statuses,
    a_bidirectional_session_works_like_join,
    stats_count_streams_sessions_and_replicas,
);
