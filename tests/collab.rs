//! Collaboration, black-box: a browser's protocol (grpc-web, spoken by `buf curl`, a client
//! this project did not write) following a design through the gateway, and a collaboration
//! replica killed with SIGKILL whose sessions the others announce as left.

#![allow(clippy::unwrap_used, clippy::print_stdout)]

mod common;

use std::{
    io::Read as _,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use common::{Running, channel, create_admin, env_vars, http_get, new_designer};
use csp_proto::{
    collab::v1::{self as pb, collaboration_service_client::CollaborationServiceClient},
    design::v1 as dpb,
};
use csp_testkit::{Backend, TestEnv, authed};
use pb::collab_event::Kind;
use serde_json::Value;

/// `buf`, as `make test` installs it; `None` (skip) outside CI when it is missing.
fn buf() -> Option<PathBuf> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(".tools/node_modules/.bin/buf");
    if path.exists() {
        return Some(path);
    }
    assert!(!csp_testkit::external_required(), "{} is missing: `make test` installs it", path.display());
    eprintln!("skipped: {} is missing (`make test` installs it)", path.display());
    None
}

/// A `buf curl` call whose JSON output is collected as it streams.
struct Curl {
    child: Child,
    output: Arc<Mutex<String>>,
}

impl Curl {
    fn start(buf: &Path, gateway: SocketAddr, token: &str, method: &str, body: &Value) -> Curl {
        let mut child = Command::new(buf)
            .args(["curl", "--protocol", "grpcweb", "--schema"])
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("proto"))
            .args(["-H", &format!("Authorization: Bearer {token}"), "-d", &body.to_string()])
            .arg(format!("http://{gateway}/{method}"))
            .stdout(Stdio::piped())
            // Its last words when the test ends the call are no concern of the test.
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut stdout = child.stdout.take().unwrap();
        let output = Arc::new(Mutex::new(String::new()));
        let sink = output.clone();
        std::thread::spawn(move || {
            let mut chunk = [0u8; 4096];
            while let Ok(n) = stdout.read(&mut chunk) {
                if n == 0 {
                    break;
                }
                sink.lock().unwrap().push_str(&String::from_utf8_lossy(&chunk[..n]));
            }
        });
        Curl { child, output }
    }

    /// The JSON messages printed so far.
    fn messages(&self) -> Vec<Value> {
        let text = self.output.lock().unwrap().clone();
        serde_json::Deserializer::from_str(&text).into_iter::<Value>().map_while(Result::ok).collect()
    }

    /// Waits until a printed message satisfies `wanted`.
    async fn until(&self, what: &str, wanted: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(found) = self.messages().into_iter().find(|m| wanted(m)) {
                return found;
            }
            assert!(Instant::now() < deadline, "buf curl never printed {what}: {:#?}", self.messages());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Curl {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn design(addr: SocketAddr, token: &str) -> String {
    let mut designs = dpb::design_service_client::DesignServiceClient::new(channel(addr).await);
    let request = dpb::CreateDesignRequest { name: "Shared canvas".into(), ..Default::default() };
    designs.create_design(authed(request, token)).await.unwrap().into_inner().design.unwrap().id
}

async fn edit(addr: SocketAddr, token: &str, design: &str, revision: i64, node: &str) {
    let mut designs = dpb::design_service_client::DesignServiceClient::new(channel(addr).await);
    let op = dpb::Op {
        op: Some(dpb::op::Op::AddNode(dpb::AddNodeOp {
            node: Some(dpb::Node { id: node.into(), r#type: "sink.log".into(), ..Default::default() }),
        })),
    };
    let request =
        dpb::ApplyOpsRequest { design_id: design.into(), expected_revision: revision, ops: vec![op] };
    designs.apply_ops(authed(request, token)).await.unwrap();
}

/// A Join over grpc-web (as a browser makes it) through the gateway receives its snapshot,
/// then another client's cursor and edit as they happen.
async fn a_browser_follows_a_design_through_the_gateway(env: TestEnv) {
    let Some(buf) = buf() else { return };
    let vars = env_vars(&env);
    create_admin(&env, &vars);
    let csp = Running::start(env.dir(), &vars, &["serve"]);
    let addr = csp.gateway;
    let token = new_designer(addr).await;
    let design = design(addr, &token).await;

    let browser = Curl::start(
        &buf,
        addr,
        &token,
        "csp.collab.v1.CollaborationService/Join",
        &serde_json::json!({ "design_id": design }),
    );
    let snapshot = browser.until("a snapshot", |m| m["event"]["snapshot"].is_object()).await;
    assert_eq!(snapshot["event"]["snapshot"]["designRevision"], "1");

    // Another tab of the same user, over gRPC: it moves its cursor and edits.
    let mut collab = CollaborationServiceClient::new(channel(addr).await);
    let request = pb::JoinRequest { design_id: design.clone(), ..Default::default() };
    let mut tab = collab.join(authed(request, &token)).await.unwrap().into_inner();
    let first = tab.message().await.unwrap().unwrap().event.unwrap();
    let Some(Kind::Snapshot(mine)) = first.kind else { panic!("{first:?}") };
    let request = pb::UpdatePresenceRequest {
        session_id: mine.session_id.clone(),
        presence: Some(pb::Presence { cursor: Some(pb::Cursor { x: 12.5, y: 3.0 }), ..Default::default() }),
    };
    collab.update_presence(authed(request, &token)).await.unwrap();
    edit(addr, &token, &design, 1, "added-elsewhere").await;

    let joined = browser.until("the tab joining", |m| m["event"]["participantJoined"].is_object()).await;
    assert_eq!(joined["event"]["participantJoined"]["participant"]["sessionId"], mine.session_id.as_str());
    let moved = browser.until("the tab's cursor", |m| m["event"]["presenceChanged"].is_object()).await;
    assert_eq!(moved["event"]["presenceChanged"]["presence"]["cursor"]["x"], 12.5);
    let changed = browser.until("the edit", |m| m["event"]["designChanged"].is_object()).await;
    let change = &changed["event"]["designChanged"];
    assert_eq!((change["revision"].as_str(), change["previousRevision"].as_str()), (Some("2"), Some("1")));
    assert_eq!(change["ops"][0]["addNode"]["node"]["id"], "added-elsewhere");

    // What it took shows on /metrics.
    let (status, metrics) = http_get(addr, "/metrics").await;
    assert_eq!(status, 200);
    for name in [
        "csp_collab_connections_active 2",
        "csp_collab_joins_total 2",
        "csp_collab_events_sent_total",
        "csp_collab_presence_updates_total 1",
        "csp_collab_fanout_latency_seconds_bucket",
    ] {
        assert!(metrics.contains(name), "{name} is not on /metrics");
    }
}

/// A collaboration replica killed with SIGKILL: the sessions it held are announced as timed
/// out by the surviving replica, to clients of that replica, within the session timeout.
async fn a_killed_replicas_sessions_are_announced(env: TestEnv) {
    let mut vars = env_vars(&env);
    vars.push(("CSP_COLLAB__SESSION_TIMEOUT".into(), "2s".into()));
    vars.push(("CSP_COLLAB__HEARTBEAT_INTERVAL".into(), "1s".into()));
    vars.push(("CSP_COLLAB__SWEEP_INTERVAL".into(), "200ms".into()));
    create_admin(&env, &vars);
    let csp = Running::start(env.dir(), &vars, &["serve"]);
    let gateway = csp.gateway;
    // A second collaboration replica, its own process, reaching the rest through the gateway.
    let mut replica = vars.clone();
    replica.push(("CSP_SERVICES__COLLAB__LISTEN".into(), "127.0.0.1:0".into()));
    replica.push(("CSP_SERVICES__DESIGN__ADDRESS".into(), format!("http://{gateway}")));
    replica.push(("CSP_SERVICES__AUTH__ADDRESS".into(), format!("http://{gateway}")));
    let (mut doomed, doomed_addr) =
        Running::spawn(env.dir(), &replica, &["serve", "--target", "collab"], "collab listening on ");
    let doomed_addr: SocketAddr = doomed_addr.parse().unwrap();

    let token = new_designer(gateway).await;
    let design = design(gateway, &token).await;
    let mut here = CollaborationServiceClient::new(channel(gateway).await);
    let mut there = CollaborationServiceClient::new(channel(doomed_addr).await);
    let request = pb::JoinRequest { design_id: design.clone(), ..Default::default() };
    let mut ada = here.join(authed(request.clone(), &token)).await.unwrap().into_inner();
    let Some(Kind::Snapshot(ada_snapshot)) = ada.message().await.unwrap().unwrap().event.unwrap().kind else {
        panic!("no snapshot")
    };
    let mut bob = there.join(authed(request, &token)).await.unwrap().into_inner();
    let Some(Kind::Snapshot(bob_snapshot)) = bob.message().await.unwrap().unwrap().event.unwrap().kind else {
        panic!("no snapshot")
    };
    // Ada, on the surviving replica, sees Bob join on the other one; she keeps her session alive.
    let joined = loop {
        let event =
            tokio::time::timeout(Duration::from_secs(10), ada.message()).await.unwrap().unwrap().unwrap();
        if let Some(Kind::ParticipantJoined(j)) = event.event.unwrap().kind {
            break j.participant.unwrap();
        }
    };
    assert_eq!(joined.session_id, bob_snapshot.session_id);
    let heartbeats = {
        let (mut here, token, session) = (here.clone(), token.clone(), ada_snapshot.session_id.clone());
        tokio::spawn(async move {
            loop {
                let request = pb::HeartbeatRequest { session_id: session.clone() };
                let _ = here.heartbeat(authed(request, &token)).await;
                tokio::time::sleep(Duration::from_millis(400)).await;
            }
        })
    };

    doomed.kill().unwrap(); // SIGKILL: no leave, no goodbye
    doomed.wait().unwrap();
    let killed = Instant::now();
    let left = loop {
        let event =
            tokio::time::timeout(Duration::from_secs(10), ada.message()).await.unwrap().unwrap().unwrap();
        if let Some(Kind::ParticipantLeft(left)) = event.event.unwrap().kind {
            break left;
        }
    };
    let after = killed.elapsed();
    heartbeats.abort();
    println!("a killed replica's session was announced {after:?} after the kill (timeout 2s)");
    assert_eq!(left.session_id, bob_snapshot.session_id);
    assert_eq!(left.leave_reason, pb::LeaveReason::TimedOut as i32);
    assert!(after < Duration::from_secs(4), "{after:?}");
    drop(csp);
}

csp_testkit::backend_tests!(a_browser_follows_a_design_through_the_gateway);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_replicas_sessions_are_announced_external() {
    // Replicas share Redis; the embedded default is one process by design.
    csp_testkit::run(Backend::External, a_killed_replicas_sessions_are_announced).await;
}
