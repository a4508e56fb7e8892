//! The collaboration service across two replicas, on SQLite + the in-memory bus and on
//! PostgreSQL + Redis (where each replica has its own Redis connections, as separate processes).

#![allow(clippy::unwrap_used)]

mod common;

use std::{collections::HashSet, time::Duration};

use common::{add_node, at, is_change, is_joined, is_left, is_presence, link};
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

csp_testkit::backend_tests!(clients_on_two_replicas_see_each_other);

#[allow(dead_code)]
fn unused() -> Duration {
    let _ = at(0.0);
    Duration::ZERO
}
