//! Per-user undo and redo with several editors, on both backends.

#![allow(clippy::unwrap_used)]

mod common;

use common::{add_node, rename, update_node};
use csp_proto::design::v1 as pb;
use csp_testkit::{TestEnv, authed};
use serde_json::json;
use tonic::{Code, Status};
use tonic_types::StatusExt as _;

fn moved(id: &str, x: f64) -> pb::Op {
    update_node(pb::UpdateNodeOp {
        node_id: id.into(),
        position: Some(pb::Position { x, y: 0.0 }),
        ..Default::default()
    })
}

fn relabelled(id: &str, label: &str) -> pb::Op {
    update_node(pb::UpdateNodeOp { node_id: id.into(), label: Some(label.into()), ..Default::default() })
}

async fn undo(h: &common::Harness, token: &str, id: &str) -> Result<pb::UndoResponse, Status> {
    let request = pb::UndoRequest { design_id: id.into(), expected_revision: 0 };
    Ok(h.client.clone().undo(authed(request, token)).await?.into_inner())
}

async fn redo(h: &common::Harness, token: &str, id: &str) -> Result<pb::RedoResponse, Status> {
    let request = pb::RedoRequest { design_id: id.into(), expected_revision: 0 };
    Ok(h.client.clone().redo(authed(request, token)).await?.into_inner())
}

fn reason(status: &Status) -> String {
    status.get_details_error_info().map(|i| i.reason).unwrap_or_default()
}

fn node<'a>(design: &'a pb::Design, id: &str) -> Option<&'a pb::Node> {
    design.nodes.iter().find(|n| n.id == id)
}

async fn undo_and_redo_are_per_user_and_keep_others_edits(env: TestEnv) {
    let h = common::start(&env, |_| {}).await;
    let (ada, bob) = (h.designer("ada"), h.designer("bob"));
    let id = h.create(&ada, "Shared").await.id;
    h.share(&ada, &id, "bob", pb::Access::Editor).await;

    h.apply(&ada, &id, 1, vec![add_node("a", "transform.set", json!({}))]).await.unwrap(); // 2
    h.apply(&bob, &id, 2, vec![add_node("b", "sink.log", json!({}))]).await.unwrap(); // 3
    h.apply(&ada, &id, 3, vec![moved("a", 500.0)]).await.unwrap(); // 4
    h.apply(&bob, &id, 4, vec![relabelled("a", "Bob's label")]).await.unwrap(); // 5

    // Ada's undo reverts her move only: Bob's label and node stay.
    let undone = undo(&h, &ada, &id).await.unwrap();
    assert_eq!((undone.revision, undone.undone_revision), (6, 4));
    let design = h.get(&ada, &id).await.unwrap();
    let a = node(&design, "a").unwrap();
    assert_eq!(a.position.as_ref().unwrap().x, 10.0, "the move is reverted");
    assert_eq!(a.label, "Bob's label", "Bob's later edit stays");
    assert!(node(&design, "b").is_some());

    // Her next undo would remove `a`, which Bob has changed since: refused, naming it, nothing
    // changed; that step leaves her history.
    let conflict = undo(&h, &ada, &id).await.unwrap_err();
    assert_eq!(conflict.code(), Code::FailedPrecondition);
    assert_eq!(reason(&conflict), "UNDO_CONFLICT");
    assert!(conflict.message().contains("node `a`"), "{}", conflict.message());
    let info = conflict.get_details_error_info().unwrap();
    assert_eq!(info.metadata["elements"], "node `a`");
    assert_eq!(h.get(&ada, &id).await.unwrap().revision, 6, "a refused undo changes nothing");
    let nothing = undo(&h, &ada, &id).await.unwrap_err();
    assert_eq!(reason(&nothing), "NOTHING_TO_UNDO");

    // Redo brings the move back.
    let redone = redo(&h, &ada, &id).await.unwrap();
    assert_eq!((redone.revision, redone.redone_revision), (7, 4));
    let design = h.get(&ada, &id).await.unwrap();
    assert_eq!(node(&design, "a").unwrap().position.as_ref().unwrap().x, 500.0);
    assert_eq!(reason(&redo(&h, &ada, &id).await.unwrap_err()), "NOTHING_TO_REDO");

    // Bob's history is his own, and survives on a new connection.
    let mut fresh = h.second.clone();
    let request = pb::UndoRequest { design_id: id.clone(), expected_revision: 7 };
    let bobs = fresh.undo(authed(request, &bob)).await.unwrap().into_inner();
    assert_eq!(bobs.undone_revision, 5);
    let design = h.get(&bob, &id).await.unwrap();
    assert_eq!(node(&design, "a").unwrap().label, "");
    assert_eq!(node(&design, "a").unwrap().position.as_ref().unwrap().x, 500.0, "Ada's redo stays");

    // A new edit clears the redo history.
    h.apply(&bob, &id, 8, vec![rename("Renamed")]).await.unwrap();
    assert_eq!(reason(&redo(&h, &bob, &id).await.unwrap_err()), "NOTHING_TO_REDO");
    // Undoing the rename, then Bob's node: both his.
    assert_eq!(undo(&h, &bob, &id).await.unwrap().undone_revision, 9);
    assert_eq!(h.get(&bob, &id).await.unwrap().name, "Shared");
    assert_eq!(undo(&h, &bob, &id).await.unwrap().undone_revision, 3);
    assert!(node(&h.get(&bob, &id).await.unwrap(), "b").is_none());

    // A stale expected revision is refused as for any edit; viewers cannot undo.
    let request = pb::UndoRequest { design_id: id.clone(), expected_revision: 3 };
    let stale = h.client.clone().undo(authed(request, &ada)).await.unwrap_err();
    assert_eq!(reason(&stale), "STALE_REVISION");
    h.share(&ada, &id, "vic", pb::Access::Viewer).await;
    let viewer = undo(&h, &h.designer("vic"), &id).await.unwrap_err();
    assert_eq!(viewer.code(), Code::PermissionDenied);
    let stranger = undo(&h, &h.designer("eve"), &id).await.unwrap_err();
    assert_eq!(stranger.code(), Code::NotFound);
}

async fn undo_restores_removed_nodes_with_their_connections(env: TestEnv) {
    let h = common::start(&env, |s| s.design.undo_depth = 2).await;
    let ada = h.designer("ada");
    let id = h.create(&ada, "Pipeline").await.id;
    h.apply(
        &ada,
        &id,
        1,
        vec![
            add_node("src", "source.constant", json!({ "value": 1 })),
            add_node("out", "sink.log", json!({})),
            common::add_connection("c1", "src", "out", "out", "in"),
        ],
    )
    .await
    .unwrap();
    let before = h.get(&ada, &id).await.unwrap();
    h.apply(&ada, &id, 2, vec![common::remove_node("src")]).await.unwrap();
    let gone = h.get(&ada, &id).await.unwrap();
    assert!(gone.connections.is_empty());
    undo(&h, &ada, &id).await.unwrap();
    let back = h.get(&ada, &id).await.unwrap();
    assert_eq!(common::content(&back), common::content(&before), "the node and its connection are back");

    // The history is bounded: with a depth of 2, the third edit back is gone.
    h.apply(&ada, &id, 4, vec![rename("one")]).await.unwrap();
    h.apply(&ada, &id, 5, vec![rename("two")]).await.unwrap();
    h.apply(&ada, &id, 6, vec![rename("three")]).await.unwrap();
    undo(&h, &ada, &id).await.unwrap();
    undo(&h, &ada, &id).await.unwrap();
    assert_eq!(h.get(&ada, &id).await.unwrap().name, "one");
    assert_eq!(reason(&undo(&h, &ada, &id).await.unwrap_err()), "NOTHING_TO_UNDO");
}

csp_testkit::backend_tests!(
    undo_and_redo_are_per_user_and_keep_others_edits,
    undo_restores_removed_nodes_with_their_connections,
);
