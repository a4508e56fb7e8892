//! What the black-box tests share: the `csp` binary started as a user starts it, pointed at a
//! test environment, and the first calls every client makes.

#![allow(dead_code, unreachable_pub, clippy::unwrap_used)]

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::Path,
    process::{Child, Command, ExitStatus, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use csp_testkit::{Backend, TestEnv};
use http_body_util::BodyExt as _;
use hyper_util::{client::legacy::Client, rt::TokioExecutor};
use secrecy::ExposeSecret;
use tonic::transport::Channel;

pub const BIN: &str = env!("CARGO_BIN_EXE_csp");

/// Variables of the developer's shell that would change what the binary does.
pub const CLEARED: &[&str] = &[
    "DATABASE_URL",
    "DB_HOST",
    "DB_PORT",
    "DB_NAME",
    "DB_USER",
    "DB_PASSWORD",
    "REDIS_URL",
    "REDIS_HOST",
    "REDIS_PORT",
    "REDIS_DB",
    "REDIS_PASSWORD",
    "ENVIRONMENT",
    "LOG_LEVEL",
    "LOG_FORMAT",
    "CSP_CONFIG",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "ENABLE_METRICS",
];

pub fn csp(dir: &Path) -> Command {
    let mut command = Command::new(BIN);
    command.current_dir(dir).stdin(Stdio::null());
    for var in CLEARED {
        command.env_remove(var);
    }
    command
}

/// Environment variables pointing the binary at a test environment.
pub fn env_vars(env: &TestEnv) -> Vec<(String, String)> {
    let settings = env.settings();
    let mut vars = vec![
        ("CSP_GATEWAY__LISTEN".to_owned(), "127.0.0.1:0".to_owned()),
        ("LOG_LEVEL".into(), "warn".into()),
    ];
    match env.backend() {
        Backend::Embedded => {
            vars.push(("CSP_DATABASE__DATA_DIR".into(), env.dir().join("data").display().to_string()))
        }
        Backend::External => {
            vars.push(("DATABASE_URL".into(), settings.database.url.unwrap().expose_secret().to_owned()));
            vars.push(("REDIS_URL".into(), settings.redis.url.unwrap().expose_secret().to_owned()));
            vars.push(("CSP_REDIS__KEY_PREFIX".into(), settings.redis.key_prefix));
        }
    }
    vars
}

/// A running `csp serve`, stopped with SIGTERM when dropped.
pub struct Running {
    pub child: Child,
    pub gateway: SocketAddr,
    /// What it printed on stdout so far (when started with [`Running::start`]).
    pub stdout: Arc<Mutex<Vec<String>>>,
}

impl Running {
    pub fn start(dir: &Path, vars: &[(String, String)], args: &[&str]) -> Running {
        let stdout = Arc::new(Mutex::new(Vec::new()));
        let (child, addr) =
            Self::spawn_recording(dir, vars, args, "gateway listening on http://", stdout.clone());
        Running { child, gateway: addr.parse().unwrap(), stdout }
    }

    /// A process started elsewhere, as a `Running` that stops it when dropped.
    pub fn of(child: Child) -> Running {
        Running { child, gateway: "127.0.0.1:0".parse().unwrap(), stdout: Default::default() }
    }

    /// Starts `csp` and waits for the stdout line that starts with `announce`; returns the
    /// process and the address that follows.
    pub fn spawn(
        dir: &Path,
        vars: &[(String, String)],
        args: &[&str],
        announce: &'static str,
    ) -> (Child, String) {
        Self::spawn_recording(dir, vars, args, announce, Default::default())
    }

    fn spawn_recording(
        dir: &Path,
        vars: &[(String, String)],
        args: &[&str],
        announce: &'static str,
        recorded: Arc<Mutex<Vec<String>>>,
    ) -> (Child, String) {
        let mut child = csp(dir)
            .args(args)
            .envs(vars.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(rest) = line.strip_prefix(announce) {
                    let addr = rest.split_whitespace().next().unwrap_or_default().to_owned();
                    let _ = tx.send(addr);
                }
                recorded.lock().unwrap().push(line);
            }
        });
        let addr = rx.recv_timeout(Duration::from_secs(60)).expect("csp announced its address");
        (child, addr)
    }

    pub fn terminate(&mut self) -> ExitStatus {
        let _ = Command::new("kill").arg("-TERM").arg(self.child.id().to_string()).status();
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(started.elapsed() < Duration::from_secs(20), "csp did not stop after SIGTERM");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

pub async fn channel(addr: SocketAddr) -> Channel {
    Channel::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap()
}

pub const ADMIN_PASSWORD: &str = "Tr1cky-Lantern-Oboe-42";

/// `csp admin create-user`, as the README shows it.
pub fn create_admin(env: &TestEnv, vars: &[(String, String)]) {
    create_admin_in(env.dir(), vars);
}

pub fn create_admin_in(dir: &Path, vars: &[(String, String)]) {
    let output = csp(dir)
        .args([
            "admin",
            "create-user",
            "--username",
            "admin",
            "--email",
            "admin@example.com",
            "--role",
            "admin",
        ])
        .envs(vars.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .env("CSP_ADMIN_PASSWORD", ADMIN_PASSWORD)
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert!(String::from_utf8_lossy(&output.stdout).contains("created user admin"));
}

pub async fn login(
    addr: SocketAddr,
    login: &str,
    password: &str,
) -> Result<csp_proto::auth::v1::LoginResponse, tonic::Status> {
    let mut auth = csp_proto::auth::v1::auth_service_client::AuthServiceClient::new(channel(addr).await);
    let request = csp_proto::auth::v1::LoginRequest {
        login: login.into(),
        password: password.into(),
        api_key: String::new(),
    };
    Ok(auth.login(request).await?.into_inner())
}

/// A new designer, created by the admin; their access token.
pub async fn new_designer(addr: SocketAddr) -> String {
    let admin = login(addr, "admin", ADMIN_PASSWORD).await.unwrap().tokens.unwrap().access_token;
    let mut auth = csp_proto::auth::v1::auth_service_client::AuthServiceClient::new(channel(addr).await);
    let request = csp_proto::auth::v1::CreateUserRequest {
        username: "erin".into(),
        email: "erin@example.com".into(),
        password: "correct horse battery staple".into(),
        roles: vec![csp_proto::auth::v1::Role::Designer as i32],
        ..Default::default()
    };
    auth.create_user(csp_testkit::authed(request, &admin)).await.unwrap();
    login(addr, "erin", "correct horse battery staple").await.unwrap().tokens.unwrap().access_token
}

/// A plain HTTP GET: the status and the body.
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let client = Client::builder(TokioExecutor::new()).build_http::<http_body_util::Empty<bytes::Bytes>>();
    let response = client.get(format!("http://{addr}{path}").parse().unwrap()).await.unwrap();
    let status = response.status().as_u16();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// A design of `nodes` chained `out` → `in` in order; its id.
pub async fn design_of(addr: SocketAddr, token: &str, nodes: &[(&str, &str, serde_json::Value)]) -> String {
    use csp_proto::design::v1 as dpb;
    let mut designs = dpb::design_service_client::DesignServiceClient::new(channel(addr).await);
    let request = dpb::CreateDesignRequest { name: "Run me".into(), ..Default::default() };
    let design = designs
        .create_design(csp_testkit::authed(request, token))
        .await
        .unwrap()
        .into_inner()
        .design
        .unwrap();
    let mut ops: Vec<dpb::Op> = nodes
        .iter()
        .map(|(id, type_id, config)| dpb::Op {
            op: Some(dpb::op::Op::AddNode(dpb::AddNodeOp {
                node: Some(dpb::Node {
                    id: (*id).into(),
                    r#type: (*type_id).into(),
                    config: Some(csp_proto::json::to_struct(config.clone())),
                    ..Default::default()
                }),
            })),
        })
        .collect();
    for (i, pair) in nodes.windows(2).enumerate() {
        ops.push(dpb::Op {
            op: Some(dpb::op::Op::AddConnection(dpb::AddConnectionOp {
                connection: Some(dpb::Connection {
                    id: format!("c{}", i + 1),
                    from: Some(dpb::PortAddress { node_id: pair[0].0.into(), port: "out".into() }),
                    to: Some(dpb::PortAddress { node_id: pair[1].0.into(), port: "in".into() }),
                    ..Default::default()
                }),
            })),
        });
    }
    let request =
        dpb::ApplyOpsRequest { design_id: design.id.clone(), expected_revision: design.revision, ops };
    designs.apply_ops(csp_testkit::authed(request, token)).await.unwrap();
    design.id
}

/// The Python that `make test` prepares for the tests' peers (grpcio, grpcio-tools, the
/// OpenTelemetry protos); `None` (skip) outside CI when it is missing.
pub fn peers_python() -> Option<std::path::PathBuf> {
    let path = std::env::var_os("CSP_TEST_PYTHON")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join(".tools/peers/bin/python"));
    if path.exists() {
        return Some(path);
    }
    assert!(!csp_testkit::external_required(), "{} is missing: `make test` installs it", path.display());
    eprintln!("skipped: {} is missing (`make test` installs it)", path.display());
    None
}

/// A peer process (tests/peers/*.py) that prints `listening on <port>` first; its other stdout
/// lines are collected. Killed when dropped.
pub struct Peer {
    pub child: Child,
    pub port: u16,
    pub lines: Arc<Mutex<Vec<String>>>,
}

impl Peer {
    pub fn start(python: &Path, script: &str, args: &[&str]) -> Peer {
        let mut child = Command::new(python)
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/peers").join(script))
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let collected = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                match line.strip_prefix("listening on ") {
                    Some(port) => {
                        let _ = tx.send(port.parse::<u16>().unwrap());
                    }
                    None => collected.lock().unwrap().push(line),
                }
            }
        });
        let port =
            rx.recv_timeout(Duration::from_secs(60)).unwrap_or_else(|_| panic!("{script} did not start"));
        Peer { child, port, lines }
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
