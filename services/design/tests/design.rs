//! The design service over gRPC, with a real registry and gateway, on SQLite + the in-memory bus
//! and on PostgreSQL + Redis.

#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use csp_platform::auth::Role;
use csp_proto::{design::v1 as pb, json};
use csp_testkit::{TestEnv, authed};
use prost::Message as _;
use serde_json::json;
use tonic::Code;

/// Two clients race ApplyOps on the same revision, round after round: exactly one commits,
/// the other is told the current revision, re-reads, retries and commits. Nothing is lost.
async fn racing_edits_commit_exactly_once(env: TestEnv) {
    const ROUNDS: i64 = 40;
    let h = start(&env, |_| {}).await;
    let alice = h.designer("alice");
    let bob = h.designer("bob");
    let design = h.create(&alice, "Race").await;
    h.share(&alice, &design.id, "bob", pb::Access::Editor).await;
    let mut revision = design.revision;
    let mut winners = [0; 2];
    for round in 0..ROUNDS {
        let a = pb::ApplyOpsRequest {
            design_id: design.id.clone(),
            expected_revision: revision,
            ops: vec![add_node(&format!("a{round}"), "sink.log", json!({}))],
        };
        let b = pb::ApplyOpsRequest {
            design_id: design.id.clone(),
            expected_revision: revision,
            ops: vec![add_node(&format!("b{round}"), "sink.log", json!({}))],
        };
        let (mut first, mut second) = (h.client.clone(), h.second.clone());
        let (ra, rb) = tokio::join!(first.apply_ops(authed(a, &alice)), second.apply_ops(authed(b, &bob)));
        let (loser_token, loser_node, lost) = match (ra, rb) {
            (Ok(won), Err(lost)) => {
                assert_eq!(won.into_inner().revision, revision + 1);
                winners[0] += 1;
                (&bob, format!("b{round}"), lost)
            }
            (Err(lost), Ok(won)) => {
                assert_eq!(won.into_inner().revision, revision + 1);
                winners[1] += 1;
                (&alice, format!("a{round}"), lost)
            }
            (a, b) => panic!("round {round}: exactly one must commit, got {a:?} and {b:?}"),
        };
        assert_eq!(lost.code(), Code::FailedPrecondition, "{lost:?}");
        assert_eq!(stale(&lost), ("STALE_REVISION".to_owned(), revision + 1));

        // The loser re-reads: the winner's edit is there, its own is not; the retry commits.
        let current = h.get(loser_token, &design.id).await.unwrap();
        assert_eq!(current.revision, revision + 1);
        assert!(!current.nodes.iter().any(|n| n.id == loser_node));
        let retried = h
            .apply(
                loser_token,
                &design.id,
                current.revision,
                vec![add_node(&loser_node, "sink.log", json!({}))],
            )
            .await;
        assert_eq!(retried.unwrap().revision, revision + 2);
        revision += 2;
    }
    assert_eq!(winners.iter().sum::<i64>(), ROUNDS);

    let last = h.get(&alice, &design.id).await.unwrap();
    assert_eq!(last.revision, 1 + 2 * ROUNDS);
    assert_eq!(last.nodes.len() as i64, 2 * ROUNDS, "no edit lost");
    for round in 0..ROUNDS {
        for who in ["a", "b"] {
            assert!(last.nodes.iter().any(|n| n.id == format!("{who}{round}")));
        }
    }

    // Every revision is recorded once, and was published for collaborators.
    let mut listed = Vec::new();
    let mut token = String::new();
    loop {
        let request =
            pb::ListRevisionsRequest { design_id: design.id.clone(), page_size: 7, page_token: token };
        let page = h.client.clone().list_revisions(authed(request, &alice)).await.unwrap().into_inner();
        listed.extend(page.revisions.iter().map(|r| r.revision));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(listed, (1..=1 + 2 * ROUNDS).rev().collect::<Vec<_>>());
    let bus = env.bus();
    let stream = csp_design::stream(&design.id);
    let events = bus.read(&stream, None, 1000).await.unwrap();
    let (changes, access): (Vec<_>, Vec<_>) =
        events.iter().partition(|e| e.headers["type"] == "design.changed");
    let changes: Vec<pb::DesignChange> =
        changes.iter().map(|e| pb::DesignChange::decode(e.payload.as_ref()).unwrap()).collect();
    let shared = pb::DesignAccessChange::decode(access[0].payload.as_ref()).unwrap();
    assert_eq!((access.len(), shared.user_id.as_str()), (1, "bob"), "the share was published too");
    assert_eq!(shared.access, pb::Access::Editor as i32);
    assert_eq!(
        changes.iter().map(|c| c.revision).collect::<Vec<_>>(),
        (1..=1 + 2 * ROUNDS).collect::<Vec<_>>()
    );
    assert!(changes[1].ops.iter().all(|op| matches!(op.op, Some(pb::op::Op::AddNode(_)))));
    assert!(["alice", "bob"].contains(&changes[1].author_id.as_str()));
}

/// Old revisions read back exactly as they were (through snapshots and replays), diffs are
/// field by field, and a restore makes an old revision's content current as a new revision.
async fn history_restore_and_diff(env: TestEnv) {
    let h = start(&env, |s| s.design.snapshot_every = 3).await;
    let alice = h.designer("alice");
    let design = h.create(&alice, "History").await;
    let id = design.id.clone();
    let mut seen = vec![None, Some(design)];
    let edits: Vec<Vec<pb::Op>> = vec![
        vec![
            add_node("src", "source.constant", json!({ "value": { "a": 1 } })),
            add_node("map", "transform.map", json!({ "expression": ".a" })),
            add_node("sink", "sink.log", json!({})),
        ],
        vec![
            add_connection("c1", "src", "out", "map", "in"),
            add_connection("c2", "map", "out", "sink", "in"),
        ],
        vec![
            update_node(pb::UpdateNodeOp {
                node_id: "map".into(),
                config: Some(json::to_struct(json!({ "expression": ".b" }))),
                ..Default::default()
            }),
            update_node(pb::UpdateNodeOp {
                node_id: "sink".into(),
                position: Some(pb::Position { x: 300.0, y: 20.0 }),
                ..Default::default()
            }),
        ],
        vec![remove_node("src")],
        vec![rename("History, renamed")],
    ];
    for (i, ops) in edits.into_iter().enumerate() {
        let revision = i as i64 + 1;
        let applied = h.apply(&alice, &id, revision, ops).await.unwrap();
        assert_eq!(applied.revision, revision + 1);
        seen.push(Some(h.get(&alice, &id).await.unwrap()));
    }
    // Removing a node removed its connection, explicitly, in the committed ops.
    let request = pb::GetRevisionRequest { design_id: id.clone(), revision: 5 };
    let r5 = h.client.clone().get_revision(authed(request, &alice)).await.unwrap().into_inner();
    assert_eq!(r5.info.as_ref().unwrap().summary, "removed 1 connection, removed 1 node");

    for revision in 1..=6 {
        let request = pb::GetRevisionRequest { design_id: id.clone(), revision };
        let old = h.client.clone().get_revision(authed(request, &alice)).await.unwrap().into_inner();
        let expected = seen[revision as usize].as_ref().unwrap();
        assert_eq!(content(old.design.as_ref().unwrap()), content(expected), "revision {revision}");
        assert_eq!(old.design.unwrap().revision, revision);
        assert_eq!(old.info.unwrap().author_id, "alice");
    }
    for bad in [0, 7] {
        let request = pb::GetRevisionRequest { design_id: id.clone(), revision: bad };
        let status = h.client.clone().get_revision(authed(request, &alice)).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);
        assert_eq!(violations(&status)[0].0, "revision");
    }

    let diff = |from: i64, to: i64| {
        let mut client = h.client.clone();
        let request =
            pb::DiffRevisionsRequest { design_id: id.clone(), from_revision: from, to_revision: to };
        let token = alice.clone();
        async move { client.diff_revisions(authed(request, &token)).await.unwrap().into_inner() }
    };
    let d = diff(3, 4).await;
    let map = d.nodes.iter().find(|n| n.node_id == "map").unwrap();
    assert_eq!(map.kind, pb::ChangeKind::Changed as i32);
    assert_eq!(map.changes.len(), 1);
    assert_eq!(map.changes[0].path, "config.expression");
    assert_eq!(json::from_value(map.changes[0].before.clone().unwrap()), json!(".a"));
    assert_eq!(json::from_value(map.changes[0].after.clone().unwrap()), json!(".b"));
    let sink = d.nodes.iter().find(|n| n.node_id == "sink").unwrap();
    assert_eq!(sink.changes.iter().map(|c| c.path.as_str()).collect::<Vec<_>>(), ["position.x"]);
    assert!(d.connections.is_empty() && d.design_changes.is_empty());

    let d = diff(4, 5).await;
    assert_eq!(d.nodes.len(), 1);
    assert_eq!((d.nodes[0].node_id.as_str(), d.nodes[0].kind), ("src", pb::ChangeKind::Removed as i32));
    assert!(d.nodes[0].before.is_some() && d.nodes[0].after.is_none());
    assert_eq!(
        (d.connections[0].connection_id.as_str(), d.connections[0].kind),
        ("c1", pb::ChangeKind::Removed as i32)
    );
    let d = diff(5, 6).await;
    assert_eq!(d.design_changes[0].path, "name");
    let d = diff(1, 3).await;
    assert_eq!(d.nodes.iter().filter(|n| n.kind == pb::ChangeKind::Added as i32).count(), 3);
    assert_eq!(d.connections.len(), 2);

    // Restore revision 3 on top of 6: revision 7 has revision 3's content.
    let request = pb::RestoreRevisionRequest { design_id: id.clone(), expected_revision: 6, revision: 3 };
    let restored = h.client.clone().restore_revision(authed(request, &alice)).await.unwrap().into_inner();
    let restored = restored.design.unwrap();
    assert_eq!(restored.revision, 7);
    assert_eq!(content(&restored), content(seen[3].as_ref().unwrap()));
    assert_eq!(content(&h.get(&alice, &id).await.unwrap()), content(seen[3].as_ref().unwrap()));
    let d = diff(3, 7).await;
    assert!(d.nodes.is_empty() && d.connections.is_empty() && d.design_changes.is_empty(), "{d:?}");
    let request = pb::ListRevisionsRequest { design_id: id.clone(), page_size: 1, page_token: String::new() };
    let newest = h.client.clone().list_revisions(authed(request, &alice)).await.unwrap().into_inner();
    assert!(newest.revisions[0].summary.starts_with("restored revision 3: "), "{:?}", newest.revisions[0]);

    // A restore on a stale revision is refused like any edit.
    let request = pb::RestoreRevisionRequest { design_id: id.clone(), expected_revision: 6, revision: 2 };
    let status = h.client.clone().restore_revision(authed(request, &alice)).await.unwrap_err();
    assert_eq!(stale(&status).1, 7);
}

/// Malicious or broken documents are refused with the place that is wrong, and create nothing.
async fn hostile_imports_are_refused(env: TestEnv) {
    let h = start(&env, |s| s.design.max_import_bytes = 1 << 20).await;
    let alice = h.designer("alice");
    let design = h.create(&alice, "Original").await;
    h.apply(
        &alice,
        &design.id,
        1,
        vec![
            add_node("src", "source.constant", json!({ "value": { "n": 1.5 }, "count": 3 })),
            add_node("sink", "sink.log", json!({ "level": "warn" })),
            add_connection("c1", "src", "out", "sink", "in"),
        ],
    )
    .await
    .unwrap();
    let exported = h.export(&alice, &design.id).await;
    let copy = h.import(&alice, exported.clone()).await.unwrap();
    assert_ne!(copy.id, design.id);
    assert_eq!(h.export(&alice, &copy.id).await, exported, "export → import → export is byte-identical");

    let good: serde_json::Value = serde_json::from_str(&exported).unwrap();
    let refused = |document: String| {
        let h = &h;
        let alice = alice.clone();
        async move {
            let status = h.import(&alice, document).await.unwrap_err();
            assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
            violations(&status)
        }
    };
    let with = |pointer: &str, value: serde_json::Value| {
        let mut doc = good.clone();
        *doc.pointer_mut(pointer).unwrap() = value;
        doc.to_string()
    };

    // Deep nesting: beyond the parser's limit, and beyond what protobuf readers accept.
    let deep = exported.replacen(
        "\"level\": \"warn\"",
        &format!("\"level\": {}1{}", "{\"a\":".repeat(5_000), "}".repeat(5_000)),
        1,
    );
    let v = refused(deep).await;
    assert_eq!(v[0].0, "document");
    assert!(v[0].1.contains("recursion limit"), "{v:?}");
    let mut nested = json!(1);
    for _ in 0..40 {
        nested = json!({ "a": nested });
    }
    let v = refused(with("/nodes/1/config/value", nested)).await;
    assert_eq!(v[0].0, "document.nodes[1].config");
    assert!(v[0].1.contains("nest at most"), "{v:?}");

    // Huge arrays: too many nodes, or a configuration too big.
    let many: Vec<serde_json::Value> =
        (0..5_000).map(|i| json!({ "id": format!("n{i}"), "type": "sink.log" })).collect();
    let v = refused(with("/nodes", json!(many))).await;
    assert_eq!(v, [("document.nodes".to_owned(), "has 5000 nodes; a design has at most 1000".to_owned())]);
    let v = refused(with("/nodes/1/config/value", json!(vec![0; 100_000]))).await;
    assert_eq!(v[0].0, "document.nodes[1].config");
    assert!(v[0].1.contains("at most 65536 bytes"), "{v:?}");

    // Unknown fields and wrong types, named by their path.
    let mut unknown = good.clone();
    unknown["nodes"][0]["colour"] = json!("red");
    let v = refused(unknown.to_string()).await;
    assert!(v[0].1.contains("nodes[0]") && v[0].1.contains("colour"), "{v:?}");
    let v = refused(with("/nodes/0/position/x", json!("left"))).await;
    assert!(v[0].1.contains("nodes[0].position.x"), "{v:?}");
    let v = refused(with("/connections/0/capacity", json!(-5))).await;
    assert_eq!(v[0].0, "document.connections[0].capacity");
    let v = refused(with("/connections/0/to/node_id", json!("nowhere"))).await;
    assert_eq!(v[0], ("document.connections[0].to.node_id".to_owned(), "no node `nowhere`".to_owned()));
    let v = refused(with("/format_version", json!(2))).await;
    assert!(v[0].1.contains("format version 2 is not supported"), "{v:?}");
    let v = refused("[1, 2, 3]".into()).await;
    assert_eq!(v[0].0, "document");

    // Over the configured size, then far over the transport's limit (50 MB).
    let padded = with("/design/description", json!("x".repeat(2 << 20)));
    let v = refused(padded).await;
    assert!(v[0].1.contains("at most 1048576 bytes"), "{v:?}");
    let huge = with("/design/description", json!("x".repeat(50 << 20)));
    let request = pb::ImportDesignRequest { document: huge.clone(), name: String::new() };
    let direct = h.client.clone().import_design(authed(request, &alice)).await.unwrap_err();
    assert_eq!(direct.code(), Code::OutOfRange, "{direct:?}");
    assert!(direct.message().contains("too large"));
    let request = pb::ImportDesignRequest { document: huge, name: String::new() };
    let through_gateway = h.gateway.clone().import_design(authed(request, &alice)).await.unwrap_err();
    assert_eq!(through_gateway.code(), Code::ResourceExhausted, "{through_gateway:?}");

    // Nothing half-imported: only the original and its one good copy exist.
    let request = pb::ListDesignsRequest { filter: pb::DesignFilter::Owned as i32, ..Default::default() };
    let listed = h.client.clone().list_designs(authed(request, &alice)).await.unwrap().into_inner();
    assert_eq!(listed.designs.len(), 2);
    // The service is still fine.
    assert_eq!(h.get(&alice, &copy.id).await.unwrap().nodes.len(), 2);
}

/// Who can do what: every RPC for anonymous callers, strangers, viewers, editors, owners,
/// admins, and a viewer-role user shared as editor.
async fn authorization_matrix(env: TestEnv) {
    let h = start(&env, |_| {}).await;
    // The user designs are transferred to (the auth service knows them).
    h.issuer.add_user("zed");
    let owner = h.designer("owner");
    let users: Vec<(&str, Option<String>)> = vec![
        ("anonymous", None),
        ("stranger", Some(h.designer("stranger"))),
        ("viewer", Some(h.designer("viewer"))),
        ("editor", Some(h.designer("editor"))),
        ("owner", Some(owner.clone())),
        ("admin", Some(h.issuer.token("admin", &[Role::Admin]))),
        ("viewer-role", Some(h.issuer.token("viewer-role", &[Role::Viewer]))),
    ];
    let rpcs = [
        "CreateDesign",
        "GetDesign",
        "ListDesigns",
        "UpdateDesign",
        "DeleteDesign",
        "DuplicateDesign",
        "AddNode",
        "UpdateNode",
        "RemoveNode",
        "AddConnection",
        "RemoveConnection",
        "ApplyOps",
        "ListRevisions",
        "GetRevision",
        "DiffRevisions",
        "RestoreRevision",
        "ValidateDesign",
        "ExportDesign",
        "ImportDesign",
        "ShareDesign",
        "UnshareDesign",
        "TransferOwnership",
        "CreateFromTemplate",
    ];
    const READ: &[&str] =
        &["GetDesign", "ListRevisions", "GetRevision", "DiffRevisions", "ValidateDesign", "ExportDesign"];
    const OWNER_ONLY: &[&str] = &["DeleteDesign", "ShareDesign", "UnshareDesign", "TransferOwnership"];
    const UNBOUND: &[&str] = &["CreateDesign", "ListDesigns", "ImportDesign"];
    let expected = |user: &str, rpc: &str| -> Code {
        let writes_designs = !READ.contains(&rpc) && rpc != "ListDesigns";
        match user {
            "anonymous" => Code::Unauthenticated,
            "owner" | "admin" => Code::Ok,
            _ if UNBOUND.contains(&rpc) && user == "viewer-role" && writes_designs => Code::PermissionDenied,
            _ if UNBOUND.contains(&rpc) => Code::Ok,
            // The viewer role may not write at all, whatever a design's share says.
            "viewer-role" if writes_designs && rpc != "UnshareDesign" => Code::PermissionDenied,
            // Templates are readable by everyone.
            "stranger" if rpc == "CreateFromTemplate" => Code::Ok,
            "stranger" => Code::NotFound,
            // Duplicating a readable design (or instantiating a template) creates one's own.
            _ if READ.contains(&rpc) || rpc == "DuplicateDesign" || rpc == "CreateFromTemplate" => Code::Ok,
            // Anyone shared may leave (unshare themselves); the fixture unshares the caller.
            _ if rpc == "UnshareDesign" => Code::Ok,
            _ if OWNER_ONLY.contains(&rpc) => Code::PermissionDenied,
            "editor" | "viewer-role" => Code::Ok,
            _ => Code::PermissionDenied,
        }
    };

    let mut table = Vec::new();
    for (user, token) in &users {
        for rpc in rpcs {
            // A fresh design per call, with a connection, shared with the viewer, the editor
            // and the viewer-role user (as an editor); a template for CreateFromTemplate.
            let design = h.create(&owner, &format!("{user} {rpc}")).await;
            let id = design.id.clone();
            let template = rpc == "CreateFromTemplate";
            let fixture = vec![
                add_node("a", "source.constant", json!({ "value": 1 })),
                add_node("b", "sink.log", json!({})),
                add_connection("c", "a", "out", "b", "in"),
                pb::Op {
                    op: Some(pb::op::Op::UpdateDesign(pb::UpdateDesignOp {
                        is_template: Some(template),
                        ..Default::default()
                    })),
                },
            ];
            h.apply(&owner, &id, 1, fixture).await.unwrap();
            for (u, access) in [
                ("viewer", pb::Access::Viewer),
                ("editor", pb::Access::Editor),
                ("viewer-role", pb::Access::Editor),
            ] {
                h.share(&owner, &id, u, access).await;
            }
            let mut c = h.client.clone();
            let rev = 2;
            let code = |r: Result<(), tonic::Status>| r.err().map_or(Code::Ok, |s| s.code());
            let design_id = id.clone();
            let got = match rpc {
                "CreateDesign" => code(
                    c.create_design(maybe_authed(
                        token.as_deref(),
                        pb::CreateDesignRequest { name: "n".into(), ..Default::default() },
                    ))
                    .await
                    .map(drop),
                ),
                "GetDesign" => code(
                    c.get_design(maybe_authed(
                        token.as_deref(),
                        pb::GetDesignRequest { design_id, ..Default::default() },
                    ))
                    .await
                    .map(drop),
                ),
                "ListDesigns" => code(
                    c.list_designs(maybe_authed(token.as_deref(), pb::ListDesignsRequest::default()))
                        .await
                        .map(drop),
                ),
                "UpdateDesign" => code(
                    c.update_design(maybe_authed(
                        token.as_deref(),
                        pb::UpdateDesignRequest {
                            design_id,
                            expected_revision: rev,
                            update: Some(pb::UpdateDesignOp {
                                description: Some("d".into()),
                                ..Default::default()
                            }),
                        },
                    ))
                    .await
                    .map(drop),
                ),
                "DeleteDesign" => code(
                    c.delete_design(maybe_authed(
                        token.as_deref(),
                        pb::DeleteDesignRequest { design_id, expected_revision: rev },
                    ))
                    .await
                    .map(drop),
                ),
                "DuplicateDesign" => code(
                    c.duplicate_design(maybe_authed(
                        token.as_deref(),
                        pb::DuplicateDesignRequest { design_id, name: String::new() },
                    ))
                    .await
                    .map(drop),
                ),
                "AddNode" => code(
                    c.add_node(maybe_authed(
                        token.as_deref(),
                        pb::AddNodeRequest {
                            design_id,
                            expected_revision: rev,
                            node: Some(node("x", "sink.log", json!({}))),
                        },
                    ))
                    .await
                    .map(drop),
                ),
                "UpdateNode" => code(
                    c.update_node(maybe_authed(
                        token.as_deref(),
                        pb::UpdateNodeRequest {
                            design_id,
                            expected_revision: rev,
                            update: Some(pb::UpdateNodeOp {
                                node_id: "b".into(),
                                label: Some("B".into()),
                                ..Default::default()
                            }),
                        },
                    ))
                    .await
                    .map(drop),
                ),
                "RemoveNode" => code(
                    c.remove_node(maybe_authed(
                        token.as_deref(),
                        pb::RemoveNodeRequest { design_id, expected_revision: rev, node_id: "b".into() },
                    ))
                    .await
                    .map(drop),
                ),
                "AddConnection" => code(
                    c.add_connection(maybe_authed(
                        token.as_deref(),
                        pb::AddConnectionRequest {
                            design_id,
                            expected_revision: rev,
                            connection: Some(connection("c2", "a", "out", "b", "in")),
                        },
                    ))
                    .await
                    .map(drop),
                ),
                "RemoveConnection" => code(
                    c.remove_connection(maybe_authed(
                        token.as_deref(),
                        pb::RemoveConnectionRequest {
                            design_id,
                            expected_revision: rev,
                            connection_id: "c".into(),
                        },
                    ))
                    .await
                    .map(drop),
                ),
                "ApplyOps" => code(
                    c.apply_ops(maybe_authed(
                        token.as_deref(),
                        pb::ApplyOpsRequest {
                            design_id,
                            expected_revision: rev,
                            ops: vec![rename("renamed")],
                        },
                    ))
                    .await
                    .map(drop),
                ),
                "ListRevisions" => code(
                    c.list_revisions(maybe_authed(
                        token.as_deref(),
                        pb::ListRevisionsRequest { design_id, ..Default::default() },
                    ))
                    .await
                    .map(drop),
                ),
                "GetRevision" => code(
                    c.get_revision(maybe_authed(
                        token.as_deref(),
                        pb::GetRevisionRequest { design_id, revision: 1 },
                    ))
                    .await
                    .map(drop),
                ),
                "DiffRevisions" => code(
                    c.diff_revisions(maybe_authed(
                        token.as_deref(),
                        pb::DiffRevisionsRequest { design_id, from_revision: 1, to_revision: 2 },
                    ))
                    .await
                    .map(drop),
                ),
                "RestoreRevision" => code(
                    c.restore_revision(maybe_authed(
                        token.as_deref(),
                        pb::RestoreRevisionRequest { design_id, expected_revision: rev, revision: 1 },
                    ))
                    .await
                    .map(drop),
                ),
                "ValidateDesign" => code(
                    c.validate_design(maybe_authed(
                        token.as_deref(),
                        pb::ValidateDesignRequest { design_id, revision: 0 },
                    ))
                    .await
                    .map(drop),
                ),
                "ExportDesign" => code(
                    c.export_design(maybe_authed(
                        token.as_deref(),
                        pb::ExportDesignRequest { design_id, revision: 0 },
                    ))
                    .await
                    .map(drop),
                ),
                "ImportDesign" => {
                    let document = h.export(&owner, &id).await;
                    code(
                        c.import_design(maybe_authed(
                            token.as_deref(),
                            pb::ImportDesignRequest { document, name: String::new() },
                        ))
                        .await
                        .map(drop),
                    )
                }
                "ShareDesign" => code(
                    c.share_design(maybe_authed(
                        token.as_deref(),
                        pb::ShareDesignRequest {
                            design_id,
                            user_id: "zed".into(),
                            access: pb::Access::Viewer as i32,
                        },
                    ))
                    .await
                    .map(drop),
                ),
                "UnshareDesign" => {
                    // The owner and admin remove the viewer; others try to remove themselves.
                    let target = if ["owner", "admin", "anonymous", "stranger"].contains(user) {
                        "viewer"
                    } else {
                        user
                    };
                    code(
                        c.unshare_design(maybe_authed(
                            token.as_deref(),
                            pb::UnshareDesignRequest { design_id, user_id: target.into() },
                        ))
                        .await
                        .map(drop),
                    )
                }
                "TransferOwnership" => code(
                    c.transfer_ownership(maybe_authed(
                        token.as_deref(),
                        pb::TransferOwnershipRequest {
                            design_id,
                            expected_revision: rev,
                            new_owner_id: "zed".into(),
                        },
                    ))
                    .await
                    .map(drop),
                ),
                "CreateFromTemplate" => code(
                    c.create_from_template(maybe_authed(
                        token.as_deref(),
                        pb::CreateFromTemplateRequest { template_id: design_id, name: String::new() },
                    ))
                    .await
                    .map(drop),
                ),
                other => panic!("no call for {other}"),
            };
            table.push((*user, rpc, got, expected(user, rpc)));
        }
    }
    let wrong: Vec<_> = table.iter().filter(|(_, _, got, want)| got != want).collect();
    assert!(wrong.is_empty(), "unexpected outcomes (user, rpc, got, expected): {wrong:#?}");

    // A stranger cannot tell a hidden design from a missing one.
    let hidden = h.create(&owner, "hidden").await;
    let stranger = h.designer("stranger");
    let a = h.get(&stranger, &hidden.id).await.unwrap_err();
    let b = h.get(&stranger, &uuid_like()).await.unwrap_err();
    assert_eq!((a.code(), b.code()), (Code::NotFound, Code::NotFound));
    assert_eq!(a.message().replace(&hidden.id, "ID"), b.message().replace(&uuid_like(), "ID"));
    // A stranger sees templates only; the viewer sees what is shared with them.
    let request =
        pb::ListDesignsRequest { filter: pb::DesignFilter::SharedWithMe as i32, ..Default::default() };
    let shared =
        h.client.clone().list_designs(authed(request, &h.designer("viewer"))).await.unwrap().into_inner();
    assert!(shared.designs.iter().all(|d| d.access == pb::Access::Viewer as i32));
    assert!(!shared.designs.is_empty());
}

fn maybe_authed<T>(token: Option<&str>, message: T) -> tonic::Request<T> {
    match token {
        Some(token) => authed(message, token),
        None => tonic::Request::new(message),
    }
}

/// An export-format document.
fn document(
    name: &str,
    nodes: &[(&str, &str, serde_json::Value)],
    connections: &[(&str, &str, &str, &str, &str)],
) -> String {
    json!({
        "format": "csp-designer.design",
        "format_version": 1,
        "design": { "name": name },
        "nodes": nodes.iter().map(|(id, t, config)| json!({ "id": id, "type": t, "config": config })).collect::<Vec<_>>(),
        "connections": connections
            .iter()
            .map(|(id, from, out, to, input)| json!({
                "id": id,
                "from": { "node_id": from, "port": out },
                "to": { "node_id": to, "port": input },
            }))
            .collect::<Vec<_>>(),
    })
    .to_string()
}

fn uuid_like() -> String {
    "0190c0de-0000-7000-8000-000000000000".into()
}

/// ValidateDesign finds what is wrong, with codes, nodes, connections and pointers, by asking
/// the registry; sub-designs lend their inputs and outputs as ports and may not call back.
async fn validation_finds_problems(env: TestEnv) {
    let h = start(&env, |_| {}).await;
    let alice = h.designer("alice");
    let _component = h.register_sentiment("acme.sentiment").await;

    // A clean pipeline is valid.
    let clean = h.create(&alice, "Clean").await;
    h.apply(
        &alice,
        &clean.id,
        1,
        vec![
            add_node("src", "source.constant", json!({ "value": { "text": "hi" } })),
            add_node("map", "transform.map", json!({ "expression": ".text" })),
            add_node("log", "sink.log", json!({})),
            add_connection("c1", "src", "out", "map", "in"),
            add_connection("c2", "map", "out", "log", "in"),
        ],
    )
    .await
    .unwrap();
    let verdict = h.validate(&alice, &clean.id).await.unwrap();
    assert!(verdict.valid && verdict.findings.is_empty(), "{:?}", verdict.findings);
    assert_eq!(verdict.revision, 2);

    // A sub-design with a typed input `orders` and an output `clean`.
    let sub = h.create(&alice, "Cleaning").await;
    h.apply(
        &alice,
        &sub.id,
        1,
        vec![
            add_node(
                "orders_in",
                "source.input",
                json!({ "name": "orders", "schema": { "type": "object", "required": ["id"] } }),
            ),
            add_node("tidy", "transform.map", json!({ "expression": "." })),
            add_node("clean_out", "sink.output", json!({ "name": "clean" })),
            add_connection("s1", "orders_in", "out", "tidy", "in"),
            add_connection("s2", "tidy", "out", "clean_out", "in"),
        ],
    )
    .await
    .unwrap();

    // Broken in every way the checks know. Edits refuse bad connections (see
    // `connections_are_checked_as_they_are_drawn`), so it comes in as a document, as designs
    // exported elsewhere or written by hand do.
    let nodes = [
        ("gen", "source.constant", json!({ "value": { "id": 1 } })),
        ("batch", "control.batch", json!({ "size": 2 })),
        ("call", "design.call", json!({ "design_id": sub.id })),
        ("after_call", "sink.log", json!({})),
        ("bad", "transform.map", json!({ "expression": ".a |" })),
        ("log", "sink.log", json!({})),
        ("ghost", "acme.nothing", json!({})),
        ("lonely", "sink.log", json!({})),
        ("stats", "metrics.stats", json!({})),
        ("senti", "acme.sentiment", json!({})),
        ("merge", "control.merge", json!({})),
        ("split", "control.split", json!({})),
        ("echo", "transform.map", json!({ "expression": "." })),
        ("lost_call", "design.call", json!({ "design_id": uuid_like() })),
    ];
    let connections = [
        ("k_gen_batch", "gen", "out", "batch", "in"),
        ("k_batch_call", "batch", "out", "call", "orders"),
        ("k_call_after", "call", "clean", "after_call", "in"),
        ("k_gen_bad", "gen", "out", "bad", "in"),
        ("k_gen_bad_again", "gen", "out", "bad", "in"),
        ("k_bad_log", "bad", "out", "log", "in"),
        ("k_wrong_port", "gen", "nope", "log", "in"),
        ("k_gen_stats", "gen", "out", "stats", "in"),
        ("k_stats_senti", "stats", "out", "senti", "in"),
        ("k_gen_merge", "gen", "out", "merge", "in"),
        ("k_merge_split", "merge", "out", "split", "in"),
        ("k_split_merge", "split", "out", "merge", "in"),
        ("k_gen_echo", "gen", "out", "echo", "in"),
        ("k_echo_echo", "echo", "out", "echo", "in"),
    ];
    let main = h.import(&alice, document("Broken", &nodes, &connections)).await.unwrap();
    let verdict = h.validate(&alice, &main.id).await.unwrap();
    assert!(!verdict.valid);
    let found: Vec<(String, String, String, String)> = verdict
        .findings
        .iter()
        .map(|f| (f.code.clone(), f.node_id.clone(), f.connection_id.clone(), f.pointer.clone()))
        .collect();
    let expect = |code: &str, node: &str, connection: &str, pointer: &str| {
        let wanted = (code.to_owned(), node.to_owned(), connection.to_owned(), pointer.to_owned());
        assert!(found.contains(&wanted), "missing {wanted:?} in {:#?}", verdict.findings);
    };
    expect("invalid_config", "bad", "", "/expression");
    expect("unknown_component_type", "ghost", "", "");
    expect("unknown_sub_design", "lost_call", "", "/design_id");
    expect("unknown_port", "gen", "k_wrong_port", "");
    expect("duplicate_connection", "bad", "k_gen_bad_again", "");
    expect("self_loop", "echo", "k_echo_echo", "");
    expect("dangling_required_input", "lonely", "", "");
    expect("unreachable_node", "lonely", "", "");
    // Through the registry: metrics.stats may send numbers; acme.sentiment wants {text}.
    expect("port_type_mismatch", "senti", "k_stats_senti", "/text");
    // Against the sub-design's input schema: batches are arrays, `orders` wants objects.
    expect("port_type_mismatch", "call", "k_batch_call", "");
    expect("deadlock_prone_cycle", "merge", "k_merge_split", "");
    let first_warning =
        verdict.findings.iter().position(|f| f.severity == pb::Severity::Warning as i32).unwrap();
    assert!(
        verdict.findings[first_warning..].iter().all(|f| f.severity == pb::Severity::Warning as i32),
        "errors first"
    );
    let mismatch = verdict.findings.iter().find(|f| f.connection_id == "k_stats_senti").unwrap();
    assert!(
        mismatch.message.contains("stats.out") && mismatch.message.contains("senti.in"),
        "{}",
        mismatch.message
    );

    // Deprecating a type shows up as a warning.
    let registrar = h.issuer.token("registrar", &[Role::Registrar]);
    let request = csp_proto::registry::v1::DeprecateComponentTypeRequest {
        r#type: "acme.sentiment".into(),
        version: "1.0.0".into(),
        message: "use acme.sentiment2".into(),
    };
    h.registry.clone().deprecate_component_type(authed(request, &registrar)).await.unwrap();
    let verdict = h.validate(&alice, &main.id).await.unwrap();
    let deprecated = verdict.findings.iter().find(|f| f.code == "deprecated_component_type").unwrap();
    assert_eq!(deprecated.node_id, "senti");
    assert!(deprecated.message.contains("use acme.sentiment2"));

    // The sub-design calling the main design back is a loop.
    h.apply(&alice, &sub.id, 2, vec![add_node("back", "design.call", json!({ "design_id": main.id }))])
        .await
        .unwrap();
    let verdict = h.validate(&alice, &main.id).await.unwrap();
    let recursive = verdict.findings.iter().find(|f| f.code == "recursive_sub_design").unwrap();
    assert_eq!(recursive.node_id, "call");
    assert!(
        recursive.message.contains(&format!("{} → {} → {}", main.id, sub.id, main.id)),
        "{}",
        recursive.message
    );

    // A sub-design the caller cannot read is as unknown as a missing one.
    let bob = h.designer("bob");
    let private = h.create(&bob, "Private").await;
    let peeking = h.create(&alice, "Peeking").await;
    h.apply(
        &alice,
        &peeking.id,
        1,
        vec![add_node("call", "design.call", json!({ "design_id": private.id }))],
    )
    .await
    .unwrap();
    let verdict = h.validate(&alice, &peeking.id).await.unwrap();
    assert!(verdict.findings.iter().any(|f| f.code == "unknown_sub_design"));

    // Without the registry, validation says so instead of guessing.
    h.registry_stop.cancel();
    h.wait_for_registry_to_stop().await;
    let status = h.validate(&alice, &clean.id).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(status.message().contains("registry"));
}

/// Drawing a connection asks the registry: a port the type does not have, or messages the
/// input refuses, are refused on the spot; unknown types are left to validation.
async fn connections_are_checked_as_they_are_drawn(env: TestEnv) {
    let h = start(&env, |_| {}).await;
    let alice = h.designer("alice");
    let _component = h.register_sentiment("acme.sentiment").await;
    let design = h.create(&alice, "Drawing").await;
    let nodes = vec![
        add_node("gen", "source.constant", json!({ "value": { "text": "hi" } })),
        add_node("stats", "metrics.stats", json!({})),
        add_node("senti", "acme.sentiment", json!({})),
        add_node("ghost", "acme.nothing", json!({})),
    ];
    let revision = h.apply(&alice, &design.id, 1, nodes).await.unwrap().revision;

    let request = pb::AddConnectionRequest {
        design_id: design.id.clone(),
        expected_revision: revision,
        connection: Some(connection("", "gen", "output", "senti", "in")),
    };
    let status = h.client.clone().add_connection(authed(request, &alice)).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    let v = violations(&status);
    assert_eq!(v[0].0, "connection.from.port");
    assert!(v[0].1.contains("`output` is not an output of source.constant"), "{v:?}");

    let ops = vec![
        add_connection("ok", "gen", "out", "senti", "in"),
        add_connection("bad", "gen", "out", "stats", "in"),
        {
            let mut op = add_connection("", "stats", "out", "senti", "in");
            if let Some(pb::op::Op::AddConnection(a)) = &mut op.op {
                a.connection.as_mut().unwrap().id = "typed".into();
            }
            op
        },
    ];
    let status = h.apply(&alice, &design.id, revision, ops).await.unwrap_err();
    let v = violations(&status);
    assert_eq!(v.len(), 1, "{v:?}");
    assert_eq!(v[0].0, "ops[2].add_connection.connection.to.port");
    assert!(v[0].1.contains("`stats.out` may send messages `senti.in` refuses at `/text`"), "{v:?}");
    assert_eq!(h.get(&alice, &design.id).await.unwrap().revision, revision, "nothing committed");

    // Compatible and unknown-type connections go in.
    let ops = vec![
        add_connection("ok", "gen", "out", "senti", "in"),
        add_connection("unknown", "gen", "out", "ghost", "in"),
    ];
    let revision = h.apply(&alice, &design.id, revision, ops).await.unwrap().revision;

    // Without the registry a connection cannot be checked, so it is not drawn; other edits go on.
    h.registry_stop.cancel();
    h.wait_for_registry_to_stop().await;
    let ops = vec![add_connection("later", "gen", "out", "stats", "in")];
    let status = h.apply(&alice, &design.id, revision, ops).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    h.apply(&alice, &design.id, revision, vec![rename("Still editable")]).await.unwrap();
}

/// Templates, copies, listings, ownership transfer, deletion and limits, as users meet them.
async fn designs_are_shared_copied_and_listed(env: TestEnv) {
    let h = start(&env, |s| {
        s.design.max_nodes = 3;
        s.design.max_name_chars = 20;
    })
    .await;
    let alice = h.designer("alice");
    let bob = h.designer("bob");
    let carol = h.designer("carol");

    // Templates: anyone can find, read and instantiate them.
    let template = h.create(&alice, "Starter").await;
    h.apply(
        &alice,
        &template.id,
        1,
        vec![
            add_node("src", "source.constant", json!({ "value": 1 })),
            pb::Op {
                op: Some(pb::op::Op::UpdateDesign(pb::UpdateDesignOp {
                    is_template: Some(true),
                    ..Default::default()
                })),
            },
        ],
    )
    .await
    .unwrap();
    let request = pb::ListDesignsRequest { filter: pb::DesignFilter::Templates as i32, ..Default::default() };
    let templates = h.client.clone().list_designs(authed(request, &carol)).await.unwrap().into_inner();
    assert_eq!(templates.designs.iter().map(|d| d.id.as_str()).collect::<Vec<_>>(), [template.id.as_str()]);
    assert_eq!(templates.designs[0].access, pb::Access::Viewer as i32);
    assert_eq!(templates.designs[0].node_count, 1);
    let request = pb::CreateFromTemplateRequest { template_id: template.id.clone(), name: "Mine".into() };
    let mine = h
        .client
        .clone()
        .create_from_template(authed(request, &carol))
        .await
        .unwrap()
        .into_inner()
        .design
        .unwrap();
    assert_eq!(
        (mine.owner_id.as_str(), mine.name.as_str(), mine.is_template, mine.revision),
        ("carol", "Mine", false, 1)
    );
    assert_eq!(mine.nodes.len(), 1);
    let request = pb::CreateFromTemplateRequest { template_id: mine.id.clone(), name: String::new() };
    let status = h.client.clone().create_from_template(authed(request, &carol)).await.unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);

    // Duplicates are the caller's, named "(copy)" within the name limit.
    let request = pb::DuplicateDesignRequest { design_id: template.id.clone(), name: String::new() };
    let copy = h
        .client
        .clone()
        .duplicate_design(authed(request, &carol))
        .await
        .unwrap()
        .into_inner()
        .design
        .unwrap();
    assert_eq!((copy.name.as_str(), copy.owner_id.as_str()), ("Starter (copy)", "carol"));

    // Listings page, most recently changed first, and search names case-insensitively.
    for i in 0..7 {
        h.create(&bob, &format!("Flow {i}")).await;
    }
    h.create(&bob, "Other").await;
    let mut names = Vec::new();
    let mut token = String::new();
    loop {
        let request = pb::ListDesignsRequest {
            filter: pb::DesignFilter::Owned as i32,
            query: "fLoW".into(),
            page_size: 3,
            page_token: token,
        };
        let page = h.client.clone().list_designs(authed(request, &bob)).await.unwrap().into_inner();
        assert!(page.designs.len() <= 3);
        names.extend(page.designs.into_iter().map(|d| d.name));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(names, (0..7).rev().map(|i| format!("Flow {i}")).collect::<Vec<_>>());
    let request = pb::ListDesignsRequest { page_token: "garbage!".into(), ..Default::default() };
    let status = h.client.clone().list_designs(authed(request, &bob)).await.unwrap_err();
    assert_eq!(violations(&status)[0].0, "page_token");

    // Transfer: never to an account that does not exist...
    let design = h.create(&alice, "Handover").await;
    let request = pb::TransferOwnershipRequest {
        design_id: design.id.clone(),
        expected_revision: 1,
        new_owner_id: "nobody-at-all".into(),
    };
    let status = h.client.clone().transfer_ownership(authed(request, &alice)).await.unwrap_err();
    assert_eq!(violations(&status), [("new_owner_id".to_owned(), "names no active user".to_owned())]);
    // ... to bob: he owns it, alice keeps editing but can no longer delete it.
    let request = pb::TransferOwnershipRequest {
        design_id: design.id.clone(),
        expected_revision: 1,
        new_owner_id: "bob".into(),
    };
    let moved = h
        .client
        .clone()
        .transfer_ownership(authed(request, &alice))
        .await
        .unwrap()
        .into_inner()
        .design
        .unwrap();
    assert_eq!(
        (moved.owner_id.as_str(), moved.revision, moved.access),
        ("bob", 2, pb::Access::Editor as i32)
    );
    assert_eq!(h.get(&bob, &design.id).await.unwrap().access, pb::Access::Owner as i32);
    h.apply(&alice, &design.id, 2, vec![rename("Handed over")]).await.unwrap();
    let request = pb::DeleteDesignRequest { design_id: design.id.clone(), expected_revision: 3 };
    let status = h.client.clone().delete_design(authed(request, &alice)).await.unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);

    // Deletion: gone for everyone, and collaborators are told.
    let request = pb::DeleteDesignRequest { design_id: design.id.clone(), expected_revision: 3 };
    h.client.clone().delete_design(authed(request, &bob)).await.unwrap();
    for token in [&alice, &bob] {
        assert_eq!(h.get(token, &design.id).await.unwrap_err().code(), Code::NotFound);
    }
    let events = env.bus().read(&csp_design::stream(&design.id), None, 100).await.unwrap();
    let last = pb::DesignChange::decode(events.last().unwrap().payload.as_ref()).unwrap();
    assert!(last.deleted);
    assert_eq!((last.revision, last.author_id.as_str()), (4, "bob"));

    // Limits, each with its field.
    let small = h.create(&alice, "Small").await;
    let ops = (0..4).map(|i| add_node(&format!("n{i}"), "sink.log", json!({}))).collect();
    let status = h.apply(&alice, &small.id, 1, ops).await.unwrap_err();
    assert_eq!(
        violations(&status),
        [("ops[3].add_node.node".to_owned(), "a design has at most 3 nodes".to_owned())]
    );
    let request = pb::CreateDesignRequest { name: "x".repeat(21), ..Default::default() };
    let status = h.client.clone().create_design(authed(request, &alice)).await.unwrap_err();
    assert_eq!(violations(&status), [("name".to_owned(), "must be at most 20 characters".to_owned())]);
    let status =
        h.apply(&alice, &small.id, 1, vec![add_connection("c", "a", "out", "b", "in")]).await.unwrap_err();
    let fields: Vec<String> = violations(&status).into_iter().map(|v| v.0).collect();
    assert_eq!(
        fields,
        ["ops[0].add_connection.connection.from.node_id", "ops[0].add_connection.connection.to.node_id"]
    );
    let status = h.apply(&alice, &small.id, 1, vec![]).await.unwrap_err();
    assert_eq!(violations(&status)[0].0, "ops");
    let status = h.apply(&alice, &small.id, 0, vec![rename("x")]).await.unwrap_err();
    assert_eq!(violations(&status)[0].0, "expected_revision");
    let status = h.get(&alice, "not-a-uuid").await.unwrap_err();
    assert_eq!(violations(&status)[0].0, "design_id");
}

/// The basic view answers the current revision and the caller's access without the nodes and
/// connections, to the same callers as the full view.
async fn the_basic_view_has_the_revision_but_not_the_document(env: TestEnv) {
    let h = start(&env, |_| {}).await;
    let alice = h.designer("alice");
    let bob = h.designer("bob");
    let design = h.create(&alice, "Pipeline").await;
    h.apply(&alice, &design.id, 1, vec![add_node("src", "source.constant", json!({ "value": 1 }))])
        .await
        .unwrap();
    let get = |token: &str, view: pb::DesignView| {
        let request = pb::GetDesignRequest { design_id: design.id.clone(), view: view as i32 };
        let mut client = h.client.clone();
        let request = authed(request, token);
        async move { client.get_design(request).await.map(|r| r.into_inner().design.unwrap()) }
    };
    let basic = get(&alice, pb::DesignView::Basic).await.unwrap();
    assert_eq!(
        (basic.name.as_str(), basic.revision, basic.access, basic.nodes.len()),
        ("Pipeline", 2, pb::Access::Owner as i32, 0)
    );
    let full = get(&alice, pb::DesignView::Full).await.unwrap();
    assert_eq!((full.revision, full.nodes.len()), (2, 1));
    assert_eq!(get(&alice, pb::DesignView::Unspecified).await.unwrap(), full);
    // A stranger learns nothing from it either.
    let status = get(&bob, pb::DesignView::Basic).await.unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    let request = pb::GetDesignRequest { design_id: design.id.clone(), view: 7 };
    let status = h.client.clone().get_design(authed(request, &alice)).await.unwrap_err();
    assert_eq!(violations(&status), [("view".to_owned(), "7 is not a DesignView".to_owned())]);
}

/// A search means the characters typed, `%` and `_` included, on both backends (SQLite has no
/// default LIKE escape character).
async fn searches_match_wildcard_characters_literally(env: TestEnv) {
    let h = start(&env, |_| {}).await;
    let dana = h.designer("dana");
    for name in ["100% pure", "a_b", "axb", "Plain", "back\\slash"] {
        h.create(&dana, name).await;
    }
    for (query, expected) in [
        ("%", vec!["100% pure"]),
        ("0% p", vec!["100% pure"]),
        ("_", vec!["a_b"]),
        ("a_b", vec!["a_b"]),
        ("\\", vec!["back\\slash"]),
        ("ain", vec!["Plain"]),
    ] {
        let request = pb::ListDesignsRequest { query: query.into(), page_size: 50, ..Default::default() };
        let page = h.client.clone().list_designs(authed(request, &dana)).await.unwrap().into_inner();
        let names: Vec<String> = page.designs.into_iter().map(|d| d.name).collect();
        assert_eq!(names, expected, "a search for {query:?}");
    }
}

/// History that cannot be read (an op, a snapshot) makes the old revision an INTERNAL error,
/// never a design that never existed.
async fn unreadable_history_is_an_error_not_a_wrong_design(env: TestEnv) {
    use sea_orm::ConnectionTrait as _;
    let h = start(&env, |s| s.design.snapshot_every = 3).await;
    let alice = h.designer("alice");
    let id = h.create(&alice, "Fragile").await.id;
    h.apply(&alice, &id, 1, vec![add_node("a", "source.constant", json!({ "value": 1 }))]).await.unwrap();
    h.apply(&alice, &id, 2, vec![add_node("b", "sink.log", json!({}))]).await.unwrap();
    h.apply(&alice, &id, 3, vec![rename("Fragile, renamed")]).await.unwrap();
    let revision = |revision: i64| {
        let mut client = h.client.clone();
        let alice = alice.clone();
        let id = id.clone();
        async move {
            let request = pb::GetRevisionRequest { design_id: id, revision };
            client.get_revision(authed(request, &alice)).await
        }
    };
    assert_eq!(revision(2).await.unwrap().into_inner().design.unwrap().nodes.len(), 1);

    let db = csp_store::connect(&h.settings, csp_platform::Service::Design).await.unwrap();
    let at_2 = format!("WHERE design_id = '{id}' AND revision = 2");
    // An op that no longer applies (the same node added twice) fails the replay...
    let doubled = format!(
        "UPDATE revisions SET ops = '[' || substr(ops, 2, length(ops) - 2) || ',' || substr(ops, 2) {at_2}"
    );
    db.conn().execute_unprepared(&doubled).await.unwrap();
    let status = revision(2).await.unwrap_err();
    assert_eq!(status.code(), Code::Internal, "{}", status.message());
    // ... and so do ops that cannot be read.
    db.conn().execute_unprepared(&format!("UPDATE revisions SET ops = 'not json' {at_2}")).await.unwrap();
    let status = revision(2).await.unwrap_err();
    assert_eq!(status.code(), Code::Internal, "{}", status.message());
    // The current revision does not depend on the history.
    assert_eq!(h.get(&alice, &id).await.unwrap().name, "Fragile, renamed");
}

csp_testkit::backend_tests!(
    unreadable_history_is_an_error_not_a_wrong_design,
    searches_match_wildcard_characters_literally,
    racing_edits_commit_exactly_once,
    history_restore_and_diff,
    hostile_imports_are_refused,
    authorization_matrix,
    validation_finds_problems,
    connections_are_checked_as_they_are_drawn,
    designs_are_shared_copied_and_listed,
    the_basic_view_has_the_revision_but_not_the_document,
);
