//! `csp-bench`: the benchmark workloads. `make bench` runs them all (release build) and prints
//! one line per workload; `csp-bench <name>...` runs some.
//!
//! Workloads:
//! - `verify`: access-token verifications per second on one core — every token new (the
//!   signature is checked) and the same token again (the verifier's cache answers).
//! - `login`: Login latency through gRPC at the configured argon2 cost (OWASP's minimum by
//!   default), embedded default, p50 and p99.
//! - `chain10`, `fan`, `chain10jq`, `latency`: the runtime (see `runtime.rs`).
//! - `design`: GetDesign and ApplyOps per second through the gateway on designs of 200 nodes,
//!   PostgreSQL + Redis (`CSP_BENCH_DATABASE_URL`, `CSP_BENCH_REDIS_URL`; the local servers by
//!   default), each in a database and key prefix of its own, dropped afterwards.
//! - `executions`: small executions (input → set → output) per second, each started and
//!   watched to its end by one of many concurrent clients, on the embedded default and on
//!   PostgreSQL + Redis (see `executions.rs`).
//! - `collab`: 100 clients moving their cursors on one design over two collaboration replicas
//!   on PostgreSQL + Redis, with edits committed meanwhile: cursor and edit delivery latency,
//!   events delivered, coalesced and dropped (see `collab.rs`).
//! - `ai`: the AI service's own latency over calling a provider directly, at 200 and 1,000
//!   chats a second, and over a stream's first token (see `ai.rs`).
//! - `deadlock`: the deadlock check's search, distinct states per second and time to a
//!   verdict, on a 30-node pipeline with feedback (see `deadlock.rs`).

#![allow(clippy::print_stdout)]

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use csp_platform::{
    Settings,
    auth::{Claims, Role, TOKEN_AUDIENCE, TOKEN_ISSUER, Verifier, now_millis},
};

mod ai;
mod collab;
mod deadlock;
mod design;
mod executions;
mod runtime;

const WORKLOADS: &[&str] = &[
    "verify",
    "login",
    "design",
    "chain10",
    "fan",
    "chain10jq",
    "latency",
    "executions",
    "collab",
    "ai",
    "deadlock",
];

/// See the workspace's Cargo.toml: messages cross worker threads.
#[global_allocator]
static ALLOCATOR: csp_alloc::Counting<mimalloc::MiMalloc> = csp_alloc::Counting(mimalloc::MiMalloc);

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let chosen: Vec<&str> =
        if args.is_empty() { WORKLOADS.to_vec() } else { args.iter().map(String::as_str).collect() };
    for name in &chosen {
        if !WORKLOADS.contains(name) {
            anyhow::bail!("unknown workload `{name}` (expected one of {})", WORKLOADS.join(", "));
        }
    }
    for name in chosen {
        match name {
            "verify" => verify()?,
            "login" => login()?,
            "design" => design::run()?,
            "chain10" => runtime::chain10()?,
            "fan" => runtime::fan_workload()?,
            "chain10jq" => runtime::chain10jq()?,
            "latency" => runtime::latency()?,
            "executions" => executions::run()?,
            "collab" => collab::run()?,
            "ai" => ai::run()?,
            "deadlock" => deadlock::run()?,
            _ => unreachable!(),
        }
    }
    Ok(())
}

/// A database and key prefix of its own on the benchmark's PostgreSQL and Redis
/// (`CSP_BENCH_DATABASE_URL`, `CSP_BENCH_REDIS_URL`; the local servers by default).
async fn external_env() -> csp_testkit::TestEnv {
    let database = std::env::var("CSP_BENCH_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    let redis = std::env::var("CSP_BENCH_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/0".into());
    csp_testkit::TestEnv::external_at(&database, &redis).await
}

/// Tokens verified per second on one thread: new tokens (signature checked), then one token
/// repeatedly (cache hit).
fn verify() -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async {
        let ring = csp_auth::keys::KeyRing::from_signing_key(ed25519_dalek::SigningKey::from_bytes(&[3; 32]))?;
        let verifier = Verifier::new(Arc::new(ring.clone()));
        const N: usize = 20_000;
        let now = now_millis();
        let tokens: Vec<String> = (0..N)
            .map(|i| {
                ring.sign(&Claims {
                    iss: TOKEN_ISSUER.into(),
                    aud: TOKEN_AUDIENCE.into(),
                    sub: format!("user-{i}"),
                    name: format!("user{i}"),
                    roles: vec![Role::Designer],
                    iat: now / 1000,
                    iat_ms: now,
                    nbf: now / 1000,
                    exp: now / 1000 + 900,
                    jti: format!("jti-{i}"),
                })
            })
            .collect::<Result<_, _>>()
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        verifier.verify(&tokens[0]).await?;

        let started = Instant::now();
        for token in &tokens[1..] {
            verifier.verify(token).await?;
        }
        let cold = (N - 1) as f64 / started.elapsed().as_secs_f64();

        let repeats = 1_000_000;
        let started = Instant::now();
        for _ in 0..repeats {
            verifier.verify(&tokens[7]).await?;
        }
        let warm = repeats as f64 / started.elapsed().as_secs_f64();
        println!(
            "verify: {cold:.0} tokens/s per core with the signature checked; {warm:.0} tokens/s per core for a token seen before"
        );
        Ok(())
    })
}

/// Login latency at the configured argon2 cost, through gRPC, on the embedded default.
fn login() -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async {
        let dir = tempfile::tempdir()?;
        let mut settings = Settings::load(None)?;
        settings.database.url = None;
        settings.database.host = None;
        settings.database.data_dir = dir.path().join("data");
        settings.log.level = "error".into();
        let password = "correct horse battery staple";
        csp_auth::create_user(&settings, "bench", "bench@example.com", password, vec![Role::Designer])
            .await?;

        let bus: csp_bus::SharedBus = Arc::new(csp_bus::MemoryBus::new());
        let listener = csp_platform::server::bind("auth", "127.0.0.1:0".parse()?).await?;
        let app = csp_auth::Application::with_listener(&settings, bus, listener).await?;
        let addr = app.local_addr();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(app.run_until_stopped(async {
            let _ = stopped.await;
        }));
        let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))?.connect().await?;
        let mut client = csp_proto::auth::v1::auth_service_client::AuthServiceClient::new(channel);

        let mut samples = Vec::new();
        for i in 0..60 {
            let request = csp_proto::auth::v1::LoginRequest {
                login: "bench".into(),
                password: password.into(),
                api_key: String::new(),
            };
            let started = Instant::now();
            client.login(request).await?;
            if i >= 10 {
                samples.push(started.elapsed());
            }
        }
        samples.sort();
        let percentile = |p: f64| samples[((samples.len() - 1) as f64 * p).round() as usize];
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        let a = &settings.auth.argon2;
        println!(
            "login: p50 {:.1} ms, p99 {:.1} ms (argon2id m={} KiB, t={}, p={}; SQLite)",
            ms(percentile(0.5)),
            ms(percentile(0.99)),
            a.memory_kib,
            a.iterations,
            a.parallelism
        );
        let _ = stop.send(());
        let _ = server.await;
        Ok(())
    })
}
