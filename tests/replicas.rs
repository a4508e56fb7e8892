//! Executor replicas as separate processes on PostgreSQL + Redis, killed (SIGKILL), stopped
//! (SIGTERM), paused (SIGSTOP) and restarted for real: every execution ends exactly once, with
//! its own outputs, and its stream carries exactly one final status.

#![allow(clippy::unwrap_used, clippy::print_stdout)]

mod common;

use std::{
    collections::{HashMap, HashSet},
    net::SocketAddr,
    path::Path,
    process::{Child, Command},
    time::{Duration, Instant},
};

use common::{Running, channel, create_admin, design_of, env_vars, http_get, new_designer};
use csp_proto::executor::v1::{self as pb, executor_service_client::ExecutorServiceClient};
use csp_testkit::{Backend, TestEnv, authed};
use futures::StreamExt as _;
use pb::execution_event::Kind;
use prost::Message as _;
use serde_json::{Value, json};
use tonic::transport::Channel;

/// An executor replica of its own (`csp serve --target executor`), named by its host name.
struct Replica {
    child: Child,
    addr: SocketAddr,
    name: String,
}

impl Replica {
    fn start(dir: &Path, vars: &[(String, String)], gateway: SocketAddr, name: &str) -> Replica {
        let mut vars = vars.to_vec();
        vars.push(("CSP_SERVICES__EXECUTOR__LISTEN".into(), "127.0.0.1:0".into()));
        for service in ["DESIGN", "AUTH", "REGISTRY", "AI"] {
            vars.push((format!("CSP_SERVICES__{service}__ADDRESS"), format!("http://{gateway}")));
        }
        vars.push(("HOSTNAME".into(), name.into()));
        let (child, addr) =
            Running::spawn(dir, &vars, &["serve", "--target", "executor"], "executor listening on ");
        Replica { child, addr: addr.parse().unwrap(), name: name.into() }
    }

    fn signal(&self, signal: &str) {
        let status = Command::new("kill").arg(format!("-{signal}")).arg(self.child.id().to_string()).status();
        assert!(status.unwrap().success(), "kill -{signal}");
    }

    /// SIGKILL: no goodbye, no hand-back.
    fn kill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// SIGTERM, then its exit (after its drain), which must be clean.
    fn terminate(mut self) -> Duration {
        let asked = Instant::now();
        self.signal("TERM");
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                assert!(status.success(), "{} exited with {status}", self.name);
                return asked.elapsed();
            }
            assert!(asked.elapsed() < Duration::from_secs(30), "{} did not stop after SIGTERM", self.name);
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .arg("-CONT")
            .arg(self.child.id().to_string())
            .stderr(std::process::Stdio::null())
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The test's view: the gateway, a designer and a design that takes a few hundred ms.
struct Setup {
    executor: ExecutorServiceClient<Channel>,
    token: String,
    design: String,
}

async fn setup(gateway: SocketAddr, delay_ms: u64, jitter_ms: u64) -> Setup {
    let token = new_designer(gateway).await;
    let design = design_of(
        gateway,
        &token,
        &[
            ("input", "source.input", json!({})),
            ("wait", "control.delay", json!({ "delay_ms": delay_ms, "jitter_ms": jitter_ms })),
            ("result", "sink.output", json!({})),
        ],
    )
    .await;
    Setup { executor: ExecutorServiceClient::new(channel(gateway).await), token, design }
}

impl Setup {
    /// Starts one execution whose input (and so output) is `value`.
    async fn start(&self, value: u64) -> String {
        let mut executor = self.executor.clone();
        let request = pb::StartExecutionRequest {
            design_id: self.design.clone(),
            inputs: HashMap::from([(
                "input".to_owned(),
                prost_types::ListValue { values: vec![csp_proto::json::to_value(json!(value))] },
            )]),
            idempotency_key: format!("start-{value}"),
            ..Default::default()
        };
        executor
            .start_execution(authed(request, &self.token))
            .await
            .unwrap()
            .into_inner()
            .execution
            .unwrap()
            .id
    }

    async fn get(&self, id: &str) -> pb::Execution {
        let mut executor = self.executor.clone();
        let request = pb::GetExecutionRequest { execution_id: id.into() };
        executor.get_execution(authed(request, &self.token)).await.unwrap().into_inner().execution.unwrap()
    }

    /// How many of the design's executions are queued or running.
    async fn live(&self) -> usize {
        let mut live = 0;
        for status in [pb::ExecutionStatus::Queued, pb::ExecutionStatus::Running, pb::ExecutionStatus::Paused]
        {
            let mut executor = self.executor.clone();
            let request = pb::ListExecutionsRequest {
                design_id: self.design.clone(),
                status: status as i32,
                page_size: 500,
                ..Default::default()
            };
            live += executor
                .list_executions(authed(request, &self.token))
                .await
                .unwrap()
                .into_inner()
                .executions
                .len();
        }
        live
    }

    async fn until_all_ended(&self, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let live = self.live().await;
            if live == 0 {
                return;
            }
            assert!(Instant::now() < deadline, "{live} executions still queued or running");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// What an execution's stream holds.
#[derive(Debug, Default)]
struct Stream {
    finals: Vec<i32>,
    running: usize,
    logs: Vec<String>,
    outputs: usize,
    after_final: usize,
}

async fn stream_of(env: &TestEnv, id: &str) -> Stream {
    let events = env.bus().read(&csp_executor::stream(id), None, 100_000).await.unwrap();
    let mut seen = Stream::default();
    for event in events {
        let decoded = pb::ExecutionEvent::decode(event.payload.as_ref()).unwrap();
        if !seen.finals.is_empty() {
            seen.after_final += 1;
        }
        match decoded.kind.unwrap() {
            Kind::StatusChanged(s) if s.status == pb::ExecutionStatus::Running as i32 => seen.running += 1,
            Kind::StatusChanged(s) if s.status != pb::ExecutionStatus::Queued as i32 => {
                seen.finals.push(s.status)
            }
            Kind::Log(line) => seen.logs.push(line.message),
            Kind::Output(_) => seen.outputs += 1,
            _ => {}
        }
    }
    seen
}

/// Checks one execution that should have succeeded with output `value`; returns its attempt
/// and, if it was taken over, the replica its log names as the one that stopped.
async fn check(env: &TestEnv, setup: &Setup, id: &str, value: u64) -> (i32, Option<String>) {
    let execution = setup.get(id).await;
    assert_eq!(execution.status, pb::ExecutionStatus::Succeeded as i32, "{execution:?}");
    let outputs: Vec<Value> =
        execution.outputs["result"].values.iter().cloned().map(csp_proto::json::from_value).collect();
    assert_eq!(outputs, [json!(value)], "{id}: its own output, once");
    let stream = stream_of(env, id).await;
    assert_eq!(stream.finals, [pb::ExecutionStatus::Succeeded as i32], "{id}: one final status: {stream:?}");
    assert_eq!(stream.after_final, 0, "{id}: nothing after the final status: {stream:?}");
    // A replica killed between its start and its first publication leaves no RUNNING.
    assert!(
        (1..=execution.attempt as usize).contains(&stream.running),
        "{id}: at most one RUNNING per attempt: {stream:?}"
    );
    let stopped = stream.logs.iter().find_map(|line| {
        line.split_once(" stopped before it ended; ")
            .map(|(head, _)| head.rsplit(' ').next().unwrap().to_owned())
    });
    if execution.attempt > 1 {
        assert!(stopped.is_some(), "{id}: attempt {} without a takeover: {stream:?}", execution.attempt);
    }
    (execution.attempt, stopped)
}

fn base_vars(env: &TestEnv, lease: &str) -> Vec<(String, String)> {
    let mut vars = env_vars(env);
    vars.push(("CSP_EXECUTOR__LEASE".into(), lease.into()));
    vars.push(("CSP_EXECUTOR__DRAIN_TIMEOUT".into(), "10s".into()));
    vars.push(("CSP_EXECUTOR__THREADS".into(), "1".into()));
    // One designer starts and watches every execution, thousands in seconds: above the
    // default per-user rate limit, which is not what these tests are about.
    vars.push(("CSP_GATEWAY__RATE_LIMIT__USER_PER_SECOND".into(), "100000".into()));
    vars.push(("CSP_GATEWAY__RATE_LIMIT__USER_BURST".into(), "100000".into()));
    vars
}

fn named(vars: &[(String, String)], name: &str) -> Vec<(String, String)> {
    let mut vars = vars.to_vec();
    vars.push(("HOSTNAME".into(), name.into()));
    vars
}

/// The consumer-name prefix of a replica (its host name and a dash).
fn of(replica: &str, runner: &str) -> bool {
    runner.strip_prefix(replica).is_some_and(|rest| rest.starts_with('-') && rest.len() == 9)
}

/// These tests run one at a time: each starts several processes, and their timing is what
/// they check.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const EXECUTIONS: u64 = 1000;
const ROUNDS: u64 = 5;

/// Three replicas (the whole system, and two executors of their own) run 1,000 executions of a
/// few hundred ms; mid-run one is killed (SIGKILL) and another stopped (SIGTERM), and both are
/// started again. Every execution ends SUCCEEDED exactly once with its own output; none stays
/// queued or running; every stream has one final status; attempts above 1 are exactly the
/// executions the killed replica was running. Five rounds in a row.
async fn three_replicas_lose_nothing_and_finish_everything_once(env: TestEnv) {
    let vars = base_vars(&env, "2s");
    create_admin(&env, &vars);
    let csp = Running::start(env.dir(), &named(&vars, "replica-0"), &["serve"]);
    let gateway = csp.gateway;
    let setup = setup(gateway, 250, 100).await;
    let mut doomed = Replica::start(env.dir(), &vars, gateway, "replica-1-r0");
    let mut stopping = Replica::start(env.dir(), &vars, gateway, "replica-2-r0");

    for round in 0..ROUNDS {
        let started_at = Instant::now();
        let values: Vec<u64> = (round * EXECUTIONS..(round + 1) * EXECUTIONS).collect();
        let starts = {
            let setup = Setup {
                executor: setup.executor.clone(),
                token: setup.token.clone(),
                design: setup.design.clone(),
            };
            let values = values.clone();
            tokio::spawn(async move {
                futures::stream::iter(values)
                    .map(|value| {
                        let setup = &setup;
                        async move { (setup.start(value).await, value) }
                    })
                    .buffer_unordered(32)
                    .collect::<Vec<(String, u64)>>()
                    .await
            })
        };
        // Mid-run: once the doomed replica is running several executions, kill it; stop the
        // other.
        let doomed_name = doomed.name.clone();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let (_, metrics) = http_get(doomed.addr, "/metrics").await;
            let running = metrics
                .lines()
                .find_map(|l| l.strip_prefix("csp_executor_running "))
                .and_then(|v| v.trim().parse::<f64>().ok())
                .unwrap_or(0.0);
            if running >= 5.0 {
                break;
            }
            assert!(Instant::now() < deadline, "replica {doomed_name} never ran anything");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        doomed.kill();
        let stopping_name = stopping.name.clone();
        let drained_in = stopping.terminate();
        doomed = Replica::start(env.dir(), &vars, gateway, &format!("replica-1-r{}", round + 1));
        stopping = Replica::start(env.dir(), &vars, gateway, &format!("replica-2-r{}", round + 1));

        let ids = starts.await.unwrap();
        assert_eq!(ids.len() as u64, EXECUTIONS);
        setup.until_all_ended(Duration::from_secs(120)).await;
        let took = started_at.elapsed();

        let checks = futures::stream::iter(ids.clone())
            .map(|(id, value)| {
                let (env, setup) = (&env, &setup);
                async move { (id.clone(), check(env, setup, &id, value).await) }
            })
            .buffer_unordered(32)
            .collect::<Vec<_>>()
            .await;
        let mut taken_over = 0;
        for (id, (attempt, stopped)) in &checks {
            if *attempt > 1 {
                taken_over += 1;
                let stopped = stopped.as_deref().unwrap();
                assert!(
                    of(&doomed_name, stopped),
                    "{id} was rerun, but its previous replica {stopped} was not the one killed ({doomed_name})"
                );
            }
        }
        let distinct: HashSet<&String> = checks.iter().map(|(id, _)| id).collect();
        assert_eq!(distinct.len() as u64, EXECUTIONS);
        assert!(taken_over > 0, "the killed replica was running executions: they must have been rerun");
        if round == 0 {
            // The worker's numbers, on every replica's /metrics (here, the system's).
            let (_, metrics) = http_get(gateway, "/metrics").await;
            for name in [
                "csp_executor_queue_waiting ",
                "csp_executor_queue_pending ",
                "csp_executor_running ",
                "csp_executor_job_deliveries_total ",
                "csp_executor_job_claims_total ",
                "csp_executor_lease_expiries_total ",
                "csp_executor_fenced_writes_total{write=\"finish\"} ",
                "csp_executor_drains_total ",
                "csp_executor_dead_letters_total ",
            ] {
                assert!(metrics.lines().any(|l| l.starts_with(name)), "{name}is not on /metrics");
            }
        }
        println!(
            "round {round}: {EXECUTIONS} executions in {took:?}; {taken_over} rerun after {doomed_name} was killed; {stopping_name} drained in {drained_in:?}"
        );
    }
    drop(doomed);
    drop(stopping);
    drop(csp);
}

/// A replica paused (SIGSTOP) past its lease while it runs executions: another replica takes
/// them over; resumed (SIGCONT), the paused one finds itself fenced — it writes and publishes
/// nothing more: one final status per stream, outputs once, attempt 2.
async fn a_paused_owner_is_fenced(env: TestEnv) {
    let vars = base_vars(&env, "2s");
    create_admin(&env, &vars);
    // The system's own executor runs two at a time: the paused replica gets the rest.
    let mut main = named(&vars, "replica-0");
    main.push(("CSP_EXECUTOR__MAX_CONCURRENT".into(), "2".into()));
    let csp = Running::start(env.dir(), &main, &["serve"]);
    let gateway = csp.gateway;
    let setup = setup(gateway, 2500, 0).await;
    // Its own renewals far apart (every 10 s): resumed, it learns nothing from a renewal first,
    // so only the fencing of its writes and publications stops it.
    let mut late = vars.clone();
    late.push(("CSP_EXECUTOR__LEASE".into(), "30s".into()));
    let paused = Replica::start(env.dir(), &late, gateway, "replica-1");

    let mut ids = Vec::new();
    for value in 0..6 {
        ids.push((setup.start(value).await, value));
    }
    // Until all run, at least three of them on the replica to pause.
    let deadline = Instant::now() + Duration::from_secs(20);
    let on_paused: Vec<String> = loop {
        let mut on_paused = Vec::new();
        let mut running = 0;
        for (id, _) in &ids {
            let execution = setup.get(id).await;
            if execution.status == pb::ExecutionStatus::Running as i32 {
                running += 1;
                if of("replica-1", &execution.runner) {
                    on_paused.push(id.clone());
                }
            }
        }
        if running == ids.len() && on_paused.len() >= 3 {
            break on_paused;
        }
        assert!(Instant::now() < deadline, "the executions did not all start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    paused.signal("STOP");
    // Taken over: attempt 2, on the system's replica.
    let deadline = Instant::now() + Duration::from_secs(30);
    for id in &on_paused {
        loop {
            let execution = setup.get(id).await;
            if execution.attempt == 2 {
                assert!(of("replica-0", &execution.runner), "{execution:?}");
                break;
            }
            assert!(Instant::now() < deadline, "{id} was never taken over: {execution:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    // Resumed: its runs' delays are long over, so they try to finish at once — fenced.
    paused.signal("CONT");
    setup.until_all_ended(Duration::from_secs(60)).await;
    for (id, value) in &ids {
        let (attempt, stopped) = check(&env, &setup, id, *value).await;
        if on_paused.contains(id) {
            assert_eq!(attempt, 2, "{id}");
            assert!(of("replica-1", stopped.as_deref().unwrap()));
        } else {
            assert_eq!(attempt, 1, "{id}");
        }
        let stream = stream_of(&env, id).await;
        assert!(
            stream.outputs <= attempt as usize,
            "{id}: at most one output per attempt, none after the end"
        );
    }
    // The paused replica noticed, and says so on /metrics.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, metrics) = http_get(paused.addr, "/metrics").await;
        let noticed = metrics.lines().any(|l| {
            (l.starts_with("csp_executor_lease_expiries_total ")
                || l.starts_with("csp_executor_fenced_writes_total{"))
                && !l.ends_with(" 0")
        });
        if noticed {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no lease expiry or fenced write on the paused replica:\n{metrics}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    drop(paused);
    drop(csp);
}

/// Executions whose replica is killed, cancelled while nobody runs them: the replica that
/// claims them ends them CANCELLED with the user's reason, without running them again.
async fn a_cancel_during_a_takeover_is_honoured(env: TestEnv) {
    let vars = base_vars(&env, "3s");
    create_admin(&env, &vars);
    // The system's replica runs one at a time: the doomed one gets the others.
    let mut main = named(&vars, "replica-0");
    main.push(("CSP_EXECUTOR__MAX_CONCURRENT".into(), "1".into()));
    let csp = Running::start(env.dir(), &main, &["serve"]);
    let gateway = csp.gateway;
    let setup = setup(gateway, 60_000, 0).await;
    let doomed = Replica::start(env.dir(), &vars, gateway, "replica-1");
    let mut ids = Vec::new();
    for value in 0..3 {
        ids.push(setup.start(value).await);
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    let orphans: Vec<String> = loop {
        let mut running = Vec::new();
        for id in &ids {
            let execution = setup.get(id).await;
            if execution.status == pb::ExecutionStatus::Running as i32 {
                running.push((id.clone(), execution.runner));
            }
        }
        if running.len() == ids.len() {
            break running
                .into_iter()
                .filter(|(_, runner)| of("replica-1", runner))
                .map(|(id, _)| id)
                .collect();
        }
        assert!(Instant::now() < deadline, "the executions did not all start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(orphans.len() >= 2, "at most one runs on the system's replica");
    doomed.kill();
    let cancelled = Instant::now();
    let mut executor = setup.executor.clone();
    for id in &ids {
        let request =
            pb::CancelExecutionRequest { execution_id: id.clone(), reason: "changed my mind".into() };
        executor.cancel_execution(authed(request, &setup.token)).await.unwrap();
    }
    setup.until_all_ended(Duration::from_secs(30)).await;
    println!(
        "cancelled during the takeover; all ended {:?} after the cancel (lease 3s)",
        cancelled.elapsed()
    );

    for id in &ids {
        let execution = setup.get(id).await;
        assert_eq!(execution.status, pb::ExecutionStatus::Cancelled as i32, "{execution:?}");
        assert_eq!(execution.attempt, 1, "not run again: {execution:?}");
        assert_eq!(execution.error.unwrap().message, "cancelled by erin: changed my mind");
        let stream = stream_of(&env, id).await;
        assert_eq!(stream.finals, [pb::ExecutionStatus::Cancelled as i32], "{stream:?}");
        assert!(stream.running <= 1, "never run again: {stream:?}");
    }
    drop(csp);
}

/// A replica stopped (SIGTERM) with executions it cannot finish within its drain timeout hands
/// them back: another replica takes them over at once — not after the 30 s lease — and they
/// end once.
async fn a_stopping_replica_hands_back_what_it_cannot_finish(env: TestEnv) {
    let mut vars = base_vars(&env, "30s");
    vars.push(("CSP_EXECUTOR__DRAIN_TIMEOUT".into(), "1s".into()));
    create_admin(&env, &vars);
    let csp = Running::start(env.dir(), &named(&vars, "replica-0"), &["serve"]);
    let gateway = csp.gateway;
    let setup = setup(gateway, 4000, 0).await;
    let stopping = Replica::start(env.dir(), &vars, gateway, "replica-1");
    let mut ids = Vec::new();
    for value in 0..8 {
        ids.push((setup.start(value).await, value));
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    let on_stopping: Vec<String> = loop {
        let mut running = Vec::new();
        for (id, _) in &ids {
            let execution = setup.get(id).await;
            if execution.status == pb::ExecutionStatus::Running as i32 {
                running.push((id.clone(), execution.runner));
            }
        }
        if running.len() == ids.len() {
            break running
                .into_iter()
                .filter(|(_, runner)| of("replica-1", runner))
                .map(|(id, _)| id)
                .collect();
        }
        assert!(Instant::now() < deadline, "the executions did not all start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(!on_stopping.is_empty(), "nothing ran on the replica to stop");
    let asked = Instant::now();
    let drained_in = stopping.terminate();
    assert!(drained_in < Duration::from_secs(5), "drained in {drained_in:?} (drain timeout 1s)");
    for id in &on_stopping {
        loop {
            let execution = setup.get(id).await;
            if execution.attempt == 2 && of("replica-0", &execution.runner) {
                break;
            }
            assert!(
                asked.elapsed() < Duration::from_secs(10),
                "{id} was not taken over at once: {execution:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let taken_over_in = asked.elapsed();
    setup.until_all_ended(Duration::from_secs(30)).await;
    for (id, value) in &ids {
        let (attempt, _) = check(&env, &setup, id, *value).await;
        let handed_back = on_stopping.contains(id);
        assert_eq!(attempt, if handed_back { 2 } else { 1 }, "{id}");
        if handed_back {
            let stream = stream_of(&env, id).await;
            assert!(
                stream.logs.iter().any(|l| l.contains("is stopping: the execution goes to another replica")),
                "{stream:?}"
            );
        }
    }
    println!(
        "SIGTERM: drained in {drained_in:?} (drain timeout 1s); {} handed back and running elsewhere {taken_over_in:?} after the signal (lease 30s)",
        on_stopping.len()
    );
    drop(csp);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_replica_hands_back_what_it_cannot_finish_external() {
    let _alone = ONE_AT_A_TIME.lock().await;
    csp_testkit::run(Backend::External, a_stopping_replica_hands_back_what_it_cannot_finish).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_replicas_lose_nothing_and_finish_everything_once_external() {
    let _alone = ONE_AT_A_TIME.lock().await;
    // Replicas share PostgreSQL and Redis; the embedded default is one process by design.
    csp_testkit::run(Backend::External, three_replicas_lose_nothing_and_finish_everything_once).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_owner_is_fenced_external() {
    let _alone = ONE_AT_A_TIME.lock().await;
    csp_testkit::run(Backend::External, a_paused_owner_is_fenced).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_during_a_takeover_is_honoured_external() {
    let _alone = ONE_AT_A_TIME.lock().await;
    csp_testkit::run(Backend::External, a_cancel_during_a_takeover_is_honoured).await;
}
