//! Outages under load, on servers of the test's own (a `redis-server` and an `initdb` cluster
//! on free ports, never the shared ones): Redis killed for seconds, PostgreSQL restarted, while
//! three executor replicas run a thousand executions. Replicas report NOT_SERVING while Redis
//! is away, and no execution is lost or finished twice.

#![allow(clippy::unwrap_used, clippy::print_stdout)]

mod common;

use std::{
    collections::HashMap,
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use common::{Running, channel, create_admin, design_of, env_vars, http_get, new_designer};
use csp_proto::executor::v1::{self as pb, executor_service_client::ExecutorServiceClient};
use csp_testkit::{TestEnv, authed};
use futures::StreamExt as _;
use prost::Message as _;
use serde_json::{Value, json};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn running_as_root() -> bool {
    Command::new("id").arg("-u").output().is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// A PostgreSQL binary: on the PATH, or in the newest `/usr/lib/postgresql/*/bin`.
fn pg_bin(name: &str) -> PathBuf {
    if Command::new(name).arg("--version").output().is_ok_and(|o| o.status.success()) {
        return PathBuf::from(name);
    }
    let mut dirs: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|d| d.filter_map(Result::ok).map(|e| e.path().join("bin")).collect())
        .unwrap_or_default();
    dirs.sort();
    dirs.pop().map(|d| d.join(name)).unwrap_or_else(|| panic!("{name} is not installed"))
}

/// Runs a PostgreSQL tool as the `postgres` user when the test runs as root (it refuses root).
fn pg_command(name: &str) -> Command {
    if running_as_root() {
        let mut command = Command::new("runuser");
        command.args(["-u", "postgres", "--"]).arg(pg_bin(name));
        command
    } else {
        Command::new(pg_bin(name))
    }
}

/// A PostgreSQL cluster of the test's own.
struct OwnPostgres {
    dir: PathBuf,
    port: u16,
}

impl OwnPostgres {
    fn start(parent: &Path) -> OwnPostgres {
        let dir = parent.join("pg");
        std::fs::create_dir_all(&dir).unwrap();
        if running_as_root() {
            assert!(
                Command::new("chown")
                    .args(["-R", "postgres:postgres"])
                    .arg(parent)
                    .status()
                    .unwrap()
                    .success()
            );
        }
        let status = pg_command("initdb")
            .arg("-D")
            .arg(&dir)
            .args(["-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-locale"])
            .stdout(Stdio::null())
            .status()
            .unwrap();
        assert!(status.success(), "initdb");
        let pg = OwnPostgres { dir, port: free_port() };
        pg.ctl(&["start"]);
        pg
    }

    fn ctl(&self, action: &[&str]) {
        let options =
            format!("-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off", self.port, self.dir.display());
        let status = pg_command("pg_ctl")
            .arg("-D")
            .arg(&self.dir)
            .arg("-l")
            .arg(self.dir.join("server.log"))
            .args(["-w", "-m", "fast", "-o", &options])
            .args(action)
            .stdout(Stdio::null())
            .status()
            .unwrap();
        assert!(status.success(), "pg_ctl {action:?}");
    }

    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }
}

impl Drop for OwnPostgres {
    fn drop(&mut self) {
        let _ = pg_command("pg_ctl").arg("-D").arg(&self.dir).args(["-m", "immediate", "stop"]).status();
    }
}

/// A Redis of the test's own, persisting every write (as a queue should), killed and started
/// again on the same port.
struct OwnRedis {
    child: Option<Child>,
    dir: PathBuf,
    port: u16,
}

impl OwnRedis {
    fn start(parent: &Path) -> OwnRedis {
        let dir = parent.join("redis");
        std::fs::create_dir_all(&dir).unwrap();
        let mut redis = OwnRedis { child: None, dir, port: free_port() };
        redis.up();
        redis
    }

    fn up(&mut self) {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1", "--save", ""])
            .args(["--appendonly", "yes", "--appendfsync", "always"])
            .arg("--dir")
            .arg(&self.dir)
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.answers() {
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL: every connection cut at once.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }

    fn answers(&self) -> bool {
        let Ok(mut stream) = TcpStream::connect(("127.0.0.1", self.port)) else { return false };
        let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
        let mut reply = [0u8; 7];
        stream.write_all(b"PING\r\n").is_ok()
            && stream.read_exact(&mut reply).is_ok()
            && &reply == b"+PONG\r\n"
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        self.kill();
    }
}

async fn health(addr: SocketAddr) -> u16 {
    http_get(addr, "/health").await.0
}

async fn until_health(addr: SocketAddr, wanted: impl Fn(u16) -> bool, what: &str) -> Duration {
    let started = Instant::now();
    loop {
        if wanted(health(addr).await) {
            return started.elapsed();
        }
        assert!(started.elapsed() < Duration::from_secs(30), "{addr} never reported {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

const EXECUTIONS: u64 = 1000;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_and_postgres_outages_lose_and_duplicate_nothing() {
    if !csp_testkit::external_required() && Command::new("redis-server").arg("--version").output().is_err() {
        eprintln!("skipped: redis-server is not installed");
        return;
    }
    let servers = tempfile::tempdir().unwrap();
    let pg = OwnPostgres::start(servers.path());
    let mut redis = OwnRedis::start(servers.path());
    let env = TestEnv::external_at(&pg.url(), &redis.url()).await;

    let mut vars = env_vars(&env);
    vars.push(("CSP_EXECUTOR__LEASE".into(), "10s".into()));
    vars.push(("CSP_EXECUTOR__THREADS".into(), "1".into()));
    vars.push(("CSP_SERVER__HEALTH_CHECK_INTERVAL".into(), "250ms".into()));
    create_admin(&env, &vars);
    let csp = Running::start(env.dir(), &vars, &["serve"]);
    let gateway = csp.gateway;
    let mut replicas = Vec::new();
    for name in ["replica-1", "replica-2"] {
        let mut own = vars.clone();
        own.push(("CSP_SERVICES__EXECUTOR__LISTEN".into(), "127.0.0.1:0".into()));
        for service in ["DESIGN", "AUTH", "REGISTRY", "AI"] {
            own.push((format!("CSP_SERVICES__{service}__ADDRESS"), format!("http://{gateway}")));
        }
        own.push(("HOSTNAME".into(), name.into()));
        let (child, addr) =
            Running::spawn(env.dir(), &own, &["serve", "--target", "executor"], "executor listening on ");
        let mut replica = Running::of(child);
        replica.gateway = addr.parse::<SocketAddr>().unwrap();
        replicas.push(replica);
    }
    let token = new_designer(gateway).await;
    let design = design_of(
        gateway,
        &token,
        &[
            ("input", "source.input", json!({})),
            ("wait", "control.delay", json!({ "delay_ms": 1500, "jitter_ms": 1000 })),
            ("result", "sink.output", json!({})),
        ],
    )
    .await;
    let executor = ExecutorServiceClient::new(channel(gateway).await);
    let started_at = Instant::now();
    let ids: Vec<(String, u64)> = futures::stream::iter(0..EXECUTIONS)
        .map(|value| {
            let (mut executor, token, design) = (executor.clone(), token.clone(), design.clone());
            async move {
                let request = pb::StartExecutionRequest {
                    design_id: design,
                    inputs: HashMap::from([(
                        "input".to_owned(),
                        prost_types::ListValue { values: vec![csp_proto::json::to_value(json!(value))] },
                    )]),
                    ..Default::default()
                };
                let started = executor.start_execution(authed(request, &token)).await.unwrap();
                (started.into_inner().execution.unwrap().id, value)
            }
        })
        .buffer_unordered(32)
        .collect()
        .await;
    println!("{EXECUTIONS} queued in {:?}", started_at.elapsed());

    // Redis away for seconds: the replicas say so, then carry on.
    redis.kill();
    let killed = Instant::now();
    let noticed = until_health(replicas[0].gateway, |status| status != 200, "NOT_SERVING").await;
    tokio::time::sleep(Duration::from_secs(4).saturating_sub(killed.elapsed())).await;
    redis.up();
    let back = until_health(replicas[0].gateway, |status| status == 200, "SERVING").await;
    println!(
        "Redis killed for {:?}: NOT_SERVING after {noticed:?}, SERVING again {back:?} after its return",
        killed.elapsed() - back
    );
    for replica in &replicas {
        until_health(replica.gateway, |status| status == 200, "SERVING").await;
    }

    // PostgreSQL restarted under the same load.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let restart = Instant::now();
    pg.ctl(&["restart"]);
    println!("PostgreSQL restarted in {:?}", restart.elapsed());

    // Everything ends, once.
    let bus = env.bus();
    let deadline = Instant::now() + Duration::from_secs(180);
    let mut executor_client = executor.clone();
    for (id, value) in &ids {
        let execution = loop {
            let request = pb::GetExecutionRequest { execution_id: id.clone() };
            let execution = executor_client
                .get_execution(authed(request, &token))
                .await
                .unwrap()
                .into_inner()
                .execution
                .unwrap();
            if execution.finished_at.is_some() {
                break execution;
            }
            assert!(Instant::now() < deadline, "{id} never ended: {execution:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        assert_eq!(execution.status, pb::ExecutionStatus::Succeeded as i32, "{execution:?}");
        let outputs: Vec<Value> =
            execution.outputs["result"].values.iter().cloned().map(csp_proto::json::from_value).collect();
        assert_eq!(outputs, [json!(value)], "{id}");
        let events = bus.read(&csp_executor::stream(id), None, 100_000).await.unwrap();
        let finals: Vec<i32> = events
            .iter()
            .filter_map(|e| match pb::ExecutionEvent::decode(e.payload.as_ref()).unwrap().kind {
                Some(pb::execution_event::Kind::StatusChanged(s))
                    if s.status > pb::ExecutionStatus::Paused as i32 =>
                {
                    Some(s.status)
                }
                _ => None,
            })
            .collect();
        assert_eq!(finals, [pb::ExecutionStatus::Succeeded as i32], "{id}: one final status");
    }
    let attempts_over_one = {
        let mut n = 0;
        for (id, _) in &ids {
            let request = pb::GetExecutionRequest { execution_id: id.clone() };
            let execution = executor_client
                .get_execution(authed(request, &token))
                .await
                .unwrap()
                .into_inner()
                .execution
                .unwrap();
            n += usize::from(execution.attempt > 1);
        }
        n
    };
    println!(
        "all {EXECUTIONS} succeeded once in {:?} ({attempts_over_one} taken over after the outages)",
        started_at.elapsed()
    );
    drop(replicas);
    drop(csp);
    env.teardown().await;
}
