//! The collaboration service across two replicas, on SQLite + the in-memory bus and on
//! PostgreSQL + Redis (where each replica has its own Redis connections, as separate processes).

#![allow(clippy::unwrap_used)]

mod common;

use std::{collections::HashSet, time::Duration};

use common::{add_node, is_change, is_joined, is_left, is_presence, link};
use csp_proto::{collab::v1 as pb, design::v1 as dpb, executor::v1 as xpb};
use csp_testkit::{TestEnv, authed};
use pb::collab_event::Kind;
use serde_json::json;
use tonic::Code;

/// Ada on replica 0 and Bob on replica 1 see each other join, move, edit and leave; a viewer
/// is there read-only; a stranger is not let in; executions of the design show up.
async fn clients_on_two_replicas_see_each_other(env: TestEnv) {
    let h = common::start(&env, 2, |_| {}).await;
    let (ada, bob, vic) = (h.designer("ada"), h.designer("bob"), h.viewer("vic"));
    let design = h.create(&ada, "Together").await;
    h.share(&ada, &design, "bob", dpb::Access::Editor).await;
    h.share(&ada, &design, "vic", dpb::Access::Viewer).await;

    let mut a = h.join(0, &ada, &design).await;
    let snapshot = a.snapshot.clone().unwrap();
    assert_eq!(snapshot.participants.len(), 1);
    assert_eq!(snapshot.participants[0].user_id, "ada");
    assert!(snapshot.participants[0].can_edit);
    assert_eq!(snapshot.design_revision, 1);
    assert_eq!((snapshot.heartbeat_interval_seconds, snapshot.session_timeout_seconds), (10, 30));
    assert!(snapshot.participants[0].color.starts_with('#'));

    let mut b = h.join(1, &bob, &design).await;
    let users: HashSet<String> =
        b.snapshot.as_ref().unwrap().participants.iter().map(|p| p.user_id.clone()).collect();
    assert_eq!(users, HashSet::from(["ada".to_owned(), "bob".to_owned()]));
    let joined = a.until(|k| is_joined(k).is_some()).await;
    let bob_there = is_joined(joined.kind.as_ref().unwrap()).unwrap();
    assert_eq!((bob_there.user_id.as_str(), bob_there.session_id.as_str()), ("bob", b.session_id.as_str()));

    // Cursors cross replicas both ways; unary calls may land on either replica.
    h.presence(1, &bob, &b.session_id, 42.0).await.unwrap();
    let moved = a.until(|k| is_presence(k).is_some()).await;
    let moved = is_presence(moved.kind.as_ref().unwrap()).unwrap();
    assert_eq!(moved.session_id, b.session_id);
    assert_eq!(moved.presence.as_ref().unwrap().cursor.as_ref().unwrap().x, 42.0);
    h.presence(1, &ada, &a.session_id, 7.0).await.unwrap();
    let moved = b.until(|k| is_presence(k).is_some()).await;
    assert_eq!(is_presence(moved.kind.as_ref().unwrap()).unwrap().session_id, a.session_id);

    // Edits through the design service reach everyone, the author too, with their ops.
    let revision = h
        .apply(
            &ada,
            &design,
            1,
            vec![add_node("in", "source.input", json!({})), add_node("out", "sink.output", json!({}))],
        )
        .await
        .unwrap();
    let revision = h.apply(&bob, &design, revision, vec![link("c", "in", "out")]).await.unwrap();
    for stream in [&mut a, &mut b] {
        let first = stream.until(|k| is_change(k).is_some()).await;
        let first = is_change(first.kind.as_ref().unwrap()).unwrap().clone();
        assert_eq!((first.revision, first.previous_revision, first.author_id.as_str()), (2, 1, "ada"));
        assert_eq!(first.ops.len(), 2);
        assert!(
            matches!(&first.ops[0].op, Some(dpb::op::Op::AddNode(n)) if n.node.as_ref().unwrap().id == "in")
        );
        let second = stream.until(|k| is_change(k).is_some()).await;
        let second = is_change(second.kind.as_ref().unwrap()).unwrap().clone();
        assert_eq!((second.revision, second.author_id.as_str()), (revision, "bob"));
    }

    // A viewer is present, read-only.
    let v = h.join(1, &vic, &design).await;
    let me = v.snapshot.as_ref().unwrap().participants.iter().find(|p| p.user_id == "vic").unwrap();
    assert!(!me.can_edit);
    assert_eq!(me.access, dpb::Access::Viewer as i32);
    let seen = a.until(|k| is_joined(k).is_some_and(|p| p.user_id == "vic")).await;
    assert!(!is_joined(seen.kind.as_ref().unwrap()).unwrap().can_edit);

    // A stranger is told the design does not exist, as by the design service.
    let stranger = h
        .join_with(0, &h.designer("eve"), pb::JoinRequest { design_id: design.clone(), ..Default::default() })
        .await
        .err()
        .unwrap();
    assert_eq!(stranger.code(), Code::NotFound);

    // An execution of the design shows up with its statuses.
    let request = xpb::StartExecutionRequest {
        design_id: design.clone(),
        inputs: [("in".to_owned(), prost_types::ListValue { values: vec![] })].into(),
        ..Default::default()
    };
    let started = h.executor.clone().start_execution(authed(request, &bob)).await.unwrap().into_inner();
    let execution = started.execution.unwrap().id;
    let mut statuses = Vec::new();
    while statuses.last() != Some(&(xpb::ExecutionStatus::Succeeded as i32)) {
        let event = b.until(|k| matches!(k, Kind::ExecutionStatusChanged(_))).await;
        let Some(Kind::ExecutionStatusChanged(s)) = event.kind else { unreachable!() };
        assert_eq!((s.execution_id.as_str(), s.started_by.as_str()), (execution.as_str(), "bob"));
        statuses.push(s.execution_status);
    }
    assert_eq!(
        statuses,
        [xpb::ExecutionStatus::Queued, xpb::ExecutionStatus::Running, xpb::ExecutionStatus::Succeeded]
            .map(|s| s as i32)
    );

    // Bob leaves: Ada sees why, and Bob's stream ends after its own leave.
    h.leave(0, &bob, &b.session_id).await.unwrap();
    let gone = a.until(|k| is_left(k).is_some()).await;
    let gone = is_left(gone.kind.as_ref().unwrap()).unwrap();
    assert_eq!(
        (gone.session_id.as_str(), gone.leave_reason),
        (b.session_id.as_str(), pb::LeaveReason::Left as i32)
    );
    b.ended().await;
    assert!(
        b.seen.iter().any(|e| e
            .kind
            .as_ref()
            .and_then(is_left)
            .is_some_and(|l| l.session_id == b.session_id))
    );

    // Every client saw the same events in the same order, each once, and never its own cursor.
    let ids: Vec<&str> = a.seen.iter().map(|e| e.event_id.as_str()).collect();
    let unique: HashSet<&&str> = ids.iter().collect();
    assert_eq!(unique.len(), ids.len(), "no event twice");
    assert!(
        a.seen.iter().all(|e| e
            .kind
            .as_ref()
            .and_then(is_presence)
            .is_none_or(|p| p.session_id != a.session_id))
    );
}

/// What two clients both receive: everything but the cursors of the two themselves.
fn shared_events(seen: &[pb::CollabEvent], after: &str, mine: [&str; 2]) -> Vec<String> {
    let after: csp_bus::EventId = after.parse().unwrap();
    seen.iter()
        .filter(|e| !matches!(e.kind, Some(Kind::Snapshot(_))))
        .filter(|e| e.event_id.parse::<csp_bus::EventId>().unwrap() > after)
        .filter(|e| {
            e.kind.as_ref().and_then(is_presence).is_none_or(|p| !mine.contains(&p.session_id.as_str()))
        })
        .map(|e| e.event_id.clone())
        .collect()
}

/// A client that drops its stream and reconnects (to the other replica) with its session and
/// last event id gets exactly the events it missed, and is not announced again.
async fn a_reconnect_with_the_last_id_loses_and_repeats_nothing(env: TestEnv) {
    let h = common::start(&env, 2, |s| s.collab.presence_tick = Duration::from_millis(1)).await;
    let (ada, bob, cy) = (h.designer("ada"), h.designer("bob"), h.designer("cy"));
    let design = h.create(&ada, "Resume").await;
    for user in ["bob", "cy"] {
        h.share(&ada, &design, user, dpb::Access::Editor).await;
    }
    let mut a = h.join(0, &ada, &design).await;
    let c = h.join(0, &cy, &design).await;
    let mut b = h.join(1, &bob, &design).await;
    let from = b.snapshot.as_ref().map(|_| b.last_id()).unwrap();
    a.until(|k| is_joined(k).is_some_and(|p| p.user_id == "bob")).await;

    // Some traffic while Bob is connected, then he drops his stream mid-flow.
    let mut revision = 1;
    for i in 0..5 {
        h.presence(0, &cy, &c.session_id, f64::from(i)).await.unwrap();
    }
    revision = h.apply(&cy, &design, revision, vec![add_node("n1", "sink.log", json!({}))]).await.unwrap();
    b.until(|k| is_change(k).is_some()).await;
    let dropped_at = b.last_id();
    drop(b.events);

    // Traffic he misses: cursors on both replicas, edits, a join.
    for i in 0..20 {
        h.presence(i % 2, &cy, &c.session_id, f64::from(100 + i as u32)).await.unwrap();
        if i % 5 == 0 {
            h.presence(0, &ada, &a.session_id, f64::from(i as u32)).await.unwrap();
        }
    }
    for n in 2..5 {
        revision = h
            .apply(&ada, &design, revision, vec![add_node(&format!("n{n}"), "sink.log", json!({}))])
            .await
            .unwrap();
    }
    let _dee = h.join(1, &h.designer("ada"), &design).await;

    // Back, on the other replica, where he left off.
    let request = pb::JoinRequest {
        design_id: design.clone(),
        session_id: b.session_id.clone(),
        after_event_id: dropped_at.clone(),
        ..Default::default()
    };
    let events = h.on(0).join(authed(request, &bob)).await.unwrap().into_inner();
    let mut resumed =
        common::Joined { events, session_id: b.session_id.clone(), snapshot: None, seen: Vec::new() };
    let last = h.apply(&cy, &design, revision, vec![add_node("last", "sink.log", json!({}))]).await.unwrap();
    for stream in [&mut a, &mut resumed] {
        stream.until(|k| is_change(k).is_some_and(|c| c.revision == last)).await;
    }
    assert!(!matches!(resumed.seen[0].kind, Some(Kind::Snapshot(_))), "a resume starts with what was missed");
    assert!(resumed.seen[0].event_id.parse::<csp_bus::EventId>().unwrap() > dropped_at.parse().unwrap());

    let mut bobs = b.seen.clone();
    bobs.extend(resumed.seen.clone());
    let mine = [a.session_id.as_str(), b.session_id.as_str()];
    let expected = shared_events(&a.seen, &from, mine);
    let got = shared_events(&bobs, &from, mine);
    assert_eq!(
        got, expected,
        "Bob's events, before and after the reconnect, are Ada's: none lost, none twice"
    );
    assert!(expected.len() > 25, "{}", expected.len());
    assert_eq!(
        a.seen
            .iter()
            .filter(|e| e.kind.as_ref().and_then(is_joined).is_some_and(|p| p.user_id == "bob"))
            .count(),
        1,
        "a resumed session is not announced again"
    );
}

/// A resume from before what the log keeps gets a fresh snapshot, marked as such.
async fn a_resume_from_trimmed_events_gets_a_fresh_snapshot(env: TestEnv) {
    let h = common::start(&env, 1, |s| s.collab.events_kept = 100).await;
    let (ada, bob) = (h.designer("ada"), h.designer("bob"));
    let design = h.create(&ada, "Busy").await;
    h.share(&ada, &design, "bob", dpb::Access::Editor).await;
    let b = h.join(0, &bob, &design).await;
    let from = b.last_id();
    drop(b.events);
    let mut revision = 1;
    for n in 0..120 {
        revision = h
            .apply(&ada, &design, revision, vec![add_node(&format!("n{n}"), "sink.log", json!({}))])
            .await
            .unwrap();
    }
    let mut a = h.join(0, &ada, &design).await;
    if a.snapshot.as_ref().unwrap().design_revision < revision {
        a.until(|k| is_change(k).is_some_and(|c| c.revision == revision)).await;
    }
    let request = pb::JoinRequest {
        design_id: design.clone(),
        session_id: b.session_id.clone(),
        after_event_id: from,
        ..Default::default()
    };
    let resumed = h.join_with(0, &bob, request).await.unwrap();
    let snapshot = resumed.snapshot.expect("a snapshot first");
    assert!(snapshot.resync);
    assert_eq!(snapshot.session_id, b.session_id, "the session goes on");
    assert_eq!(snapshot.design_revision, revision);
    assert_eq!(snapshot.participants.len(), 2);
}

/// Edits racing from two editors reach every client once each, in revision order, each
/// saying which revision it follows.
async fn racing_edits_arrive_in_revision_order(env: TestEnv) {
    let h = common::start(&env, 2, |_| {}).await;
    let (ada, bob) = (h.designer("ada"), h.designer("bob"));
    let design = h.create(&ada, "Race").await;
    h.share(&ada, &design, "bob", dpb::Access::Editor).await;
    let mut watchers = vec![h.join(0, &ada, &design).await, h.join(1, &bob, &design).await];
    let edits = |token: String, who: &'static str| {
        let designs = h.designs.clone();
        let design = design.clone();
        async move {
            let mut made = 0;
            let mut n = 0;
            while made < 15 {
                n += 1;
                let current = {
                    let request = dpb::GetDesignRequest {
                        design_id: design.clone(),
                        view: dpb::DesignView::Basic as i32,
                    };
                    designs
                        .clone()
                        .get_design(authed(request, &token))
                        .await
                        .unwrap()
                        .into_inner()
                        .design
                        .unwrap()
                        .revision
                };
                let request = dpb::ApplyOpsRequest {
                    design_id: design.clone(),
                    expected_revision: current,
                    ops: vec![add_node(&format!("{who}{n}"), "sink.log", json!({}))],
                };
                if designs.clone().apply_ops(authed(request, &token)).await.is_ok() {
                    made += 1;
                }
            }
        }
    };
    tokio::join!(edits(ada.clone(), "a"), edits(bob.clone(), "b"));
    for w in &mut watchers {
        let mut revisions = Vec::new();
        while revisions.last() != Some(&31) {
            let event = w.until(|k| is_change(k).is_some()).await;
            let change = is_change(event.kind.as_ref().unwrap()).unwrap();
            assert_eq!(change.previous_revision, change.revision - 1);
            revisions.push(change.revision);
        }
        assert_eq!(revisions, (2..=31).collect::<Vec<_>>());
    }
}

csp_testkit::backend_tests!(
    clients_on_two_replicas_see_each_other,
    a_reconnect_with_the_last_id_loses_and_repeats_nothing,
    a_resume_from_trimmed_events_gets_a_fresh_snapshot,
    racing_edits_arrive_in_revision_order,
);
