//! The deployment manifests boot the system: the Helm chart (as `helm template` renders it) and
//! docker-compose.yml (as `docker-compose config` resolves it) are read as an orchestrator
//! would, and every workload is started as a local process with exactly that configuration —
//! its arguments, its environment (ConfigMap and Secret references resolved), its ports and its
//! probes — against the local PostgreSQL and Redis, each pod's or service's ports mapped to
//! free loopback ports. Every probe must pass, and a design must run end to end through the
//! gateway. A wrong port, a missing variable or a probe pointed at nothing fails.
//!
//! The one addition to the manifests' configuration is the test's Redis key prefix
//! (`CSP_REDIS__KEY_PREFIX`), which keeps tests sharing one Redis apart.

#![allow(clippy::unwrap_used, clippy::print_stdout)]

mod common;

use std::{
    collections::{BTreeMap, HashMap},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use common::{ADMIN_PASSWORD, Running, channel, csp, design_of, login};
use csp_proto::executor::v1 as pb;
use csp_testkit::{Backend, TestEnv, authed};
use secrecy::ExposeSecret as _;
use serde_json::{Value, json};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A tool `make deploy-check` installs (or one on the PATH); `None` (skip) outside CI.
fn tool(local: &str, name: &str) -> Option<PathBuf> {
    let path = Path::new(ROOT).join(local);
    if path.exists() {
        return Some(path);
    }
    if Command::new(name).arg("--version").output().is_ok_and(|o| o.status.success()) {
        return Some(PathBuf::from(name));
    }
    assert!(!csp_testkit::external_required(), "{name} is missing: `make deploy-check` installs it");
    eprintln!("skipped: {name} is missing (`make deploy-check` installs it)");
    None
}

/// A health check an orchestrator would make, on a mapped port.
#[derive(Debug, Clone)]
struct Probe {
    kind: String,
    port: u16,
    /// The `grpc.health.v1` service asked about.
    service: String,
    /// A compose health check: the command itself (after `CMD`), run with the port mapped.
    command: Option<Vec<String>>,
}

/// One workload (a Deployment's pod, a compose service) as the test runs it.
#[derive(Debug, Clone, Default)]
struct Workload {
    name: String,
    /// Arguments to the image's entrypoint (`csp`).
    args: Vec<String>,
    env: BTreeMap<String, String>,
    /// Container port → loopback port.
    ports: BTreeMap<u16, u16>,
    probes: Vec<Probe>,
}

impl Workload {
    fn command(&self, dir: &Path, env: &TestEnv) -> Command {
        let mut command = self.with_its_environment(dir, env);
        command.args(&self.args);
        command
    }

    /// `csp` with the workload's environment and other arguments (`docker compose run
    /// <service> <args>`, `kubectl exec`).
    fn with_its_environment(&self, dir: &Path, env: &TestEnv) -> Command {
        let mut command = csp(dir);
        command.envs(&self.env).env("CSP_REDIS__KEY_PREFIX", env.settings().redis.key_prefix);
        command
    }

    /// Maps `0.0.0.0:<port>` (or `[::]:`) listen addresses in its environment to loopback:
    /// the port must be one the workload declares.
    fn map_listen_addresses(&mut self) {
        for (key, value) in self.env.iter_mut() {
            if key.ends_with("__LISTEN") {
                assert!(
                    value.starts_with("0.0.0.0:") || value.starts_with("[::]:"),
                    "{}: {key}={value} is unreachable from other hosts",
                    self.name
                );
            }
            let Some(port) = value.strip_prefix("0.0.0.0:").or_else(|| value.strip_prefix("[::]:")) else {
                continue;
            };
            let port: u16 = port.parse().unwrap_or_else(|_| panic!("{}: {key}={value}", self.name));
            let mapped = self.ports.get(&port).unwrap_or_else(|| {
                panic!("{}: {key} listens on {port}, which the workload does not declare", self.name)
            });
            *value = format!("127.0.0.1:{mapped}");
        }
    }
}

/// Rewrites `http://<host>:<port>` service addresses with `resolve` (host, port) → loopback port.
fn map_service_urls(workload: &mut Workload, resolve: &impl Fn(&str, u16) -> Option<u16>) {
    for (key, value) in workload.env.iter_mut() {
        let Some(rest) = value.strip_prefix("http://") else { continue };
        let Some((host, port)) = rest.split_once(':') else { continue };
        let port: u16 = port.trim_end_matches('/').parse().unwrap_or_else(|_| panic!("{key}={value}"));
        let mapped = resolve(host, port).unwrap_or_else(|| {
            panic!("{}: {key}={value} points at nothing the manifests run", workload.name)
        });
        *value = format!("http://127.0.0.1:{mapped}");
    }
}

async fn passes(dir: &Path, probe: &Probe) -> bool {
    let Some(command) = &probe.command else { return serving(probe.port, &probe.service).await };
    assert_eq!(command[0], "csp", "{command:?}: the image has only csp");
    csp(dir).args(&command[1..]).stdout(Stdio::null()).stderr(Stdio::null()).status().unwrap().success()
}

async fn serving(port: u16, service: &str) -> bool {
    let Ok(channel) = tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{port}"))
        .unwrap()
        .connect_timeout(Duration::from_millis(500))
        .connect()
        .await
    else {
        return false;
    };
    let request = HealthCheckRequest { service: service.to_owned() };
    HealthClient::new(channel)
        .check(request)
        .await
        .is_ok_and(|r| r.into_inner().status == ServingStatus::Serving as i32)
}

/// Starts the workloads (after running `jobs` to completion), waits for every probe, and runs
/// a design through `gateway`.
async fn boot(env: &TestEnv, jobs: &[Workload], workloads: &[Workload], gateway: &str) {
    let dir = env.dir();
    for job in jobs {
        let status = job.command(dir, env).stdout(Stdio::null()).status().unwrap();
        assert!(status.success(), "{} failed: {status}", job.name);
    }
    let mut running = Vec::new();
    for workload in workloads {
        let child = workload.command(dir, env).stdout(Stdio::null()).spawn().unwrap();
        running.push(Running::of(child));
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    for workload in workloads {
        assert!(!workload.probes.is_empty(), "{} has no probes", workload.name);
        for probe in &workload.probes {
            while !passes(dir, probe).await {
                assert!(
                    Instant::now() < deadline,
                    "{}: the {} probe (port {}, service `{}`) never passed",
                    workload.name,
                    probe.kind,
                    probe.port,
                    probe.service
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }

    // The first admin, as the docs say, with a workload's own configuration; then a designer's
    // first run through the gateway.
    let admin_env = &jobs[0];
    let output = admin_env
        .with_its_environment(dir, env)
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
        .env("CSP_ADMIN_PASSWORD", ADMIN_PASSWORD)
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let gateway: SocketAddr = gateway.parse().unwrap();
    let token = login(gateway, "admin", ADMIN_PASSWORD).await.unwrap().tokens.unwrap().access_token;
    let design = design_of(
        gateway,
        &token,
        &[
            ("input", "source.input", json!({})),
            ("greet", "transform.template", json!({ "template": "Hello, {{name}}!" })),
            ("result", "sink.output", json!({})),
        ],
    )
    .await;
    let mut executor = pb::executor_service_client::ExecutorServiceClient::new(channel(gateway).await);
    let request = pb::StartExecutionRequest {
        design_id: design,
        inputs: HashMap::from([(
            "input".to_owned(),
            prost_types::ListValue { values: vec![csp_proto::json::to_value(json!({ "name": "Ada" }))] },
        )]),
        ..Default::default()
    };
    let id =
        executor.start_execution(authed(request, &token)).await.unwrap().into_inner().execution.unwrap().id;
    let deadline = Instant::now() + Duration::from_secs(30);
    let done = loop {
        let request = pb::GetExecutionRequest { execution_id: id.clone() };
        let execution =
            executor.get_execution(authed(request, &token)).await.unwrap().into_inner().execution.unwrap();
        if execution.finished_at.is_some() {
            break execution;
        }
        assert!(Instant::now() < deadline, "the execution never ended: {execution:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(done.status, pb::ExecutionStatus::Succeeded as i32, "{done:?}");
    let outputs: Vec<Value> =
        done.outputs["result"].values.iter().cloned().map(csp_proto::json::from_value).collect();
    assert_eq!(outputs, [json!("Hello, Ada!")]);
    drop(running);
}

fn external_urls(env: &TestEnv) -> (String, String) {
    let settings = env.settings();
    (
        settings.database.url.unwrap().expose_secret().to_owned(),
        settings.redis.url.unwrap().expose_secret().to_owned(),
    )
}

// --- Helm ---

fn docs_of_kind<'a>(docs: &'a [Value], kind: &str) -> Vec<&'a Value> {
    docs.iter().filter(|d| d["kind"] == kind).collect()
}

fn str_of(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

/// A pod spec's container as a workload: env from ConfigMaps, Secrets and values.
fn pod_workload(name: &str, pod: &Value, docs: &[Value]) -> Workload {
    let containers = pod["containers"].as_array().unwrap();
    assert_eq!(containers.len(), 1, "{name}: one container");
    let container = &containers[0];
    assert!(container.get("command").is_none(), "{name}: the image's entrypoint (csp) runs");
    let mut workload = Workload {
        name: name.to_owned(),
        args: container["args"].as_array().unwrap().iter().map(str_of).collect(),
        ..Default::default()
    };
    let find = |kind: &str, wanted: &str| {
        docs_of_kind(docs, kind)
            .into_iter()
            .find(|d| d["metadata"]["name"] == wanted)
            .unwrap_or_else(|| panic!("{name} refers to {kind} {wanted}, which the chart does not make"))
    };
    for source in container["envFrom"].as_array().into_iter().flatten() {
        let map = find("ConfigMap", source["configMapRef"]["name"].as_str().unwrap());
        for (k, v) in map["data"].as_object().into_iter().flatten() {
            workload.env.insert(k.clone(), str_of(v));
        }
    }
    for var in container["env"].as_array().into_iter().flatten() {
        let key = var["name"].as_str().unwrap().to_owned();
        if let Some(value) = var.get("value") {
            workload.env.insert(key, str_of(value));
            continue;
        }
        let reference = &var["valueFrom"]["secretKeyRef"];
        let secret = find("Secret", reference["name"].as_str().unwrap());
        let data = &secret["stringData"][reference["key"].as_str().unwrap()];
        if data.is_null() {
            assert_eq!(reference["optional"], true, "{name}: {key} names a key the Secret lacks");
            continue;
        }
        let value = str_of(data);
        if !value.is_empty() {
            workload.env.insert(key, value);
        }
    }
    for port in container["ports"].as_array().into_iter().flatten() {
        workload.ports.insert(port["containerPort"].as_u64().unwrap() as u16, free_port());
    }
    for kind in ["startupProbe", "readinessProbe", "livenessProbe"] {
        let probe = &container[kind];
        if probe.is_null() {
            continue;
        }
        let grpc = &probe["grpc"];
        assert!(!grpc.is_null(), "{name}: the {kind} is not a gRPC health probe");
        let port = grpc["port"].as_u64().unwrap() as u16;
        let mapped = *workload.ports.get(&port).unwrap_or_else(|| {
            panic!("{name}: the {kind} probes port {port}, which the container does not declare")
        });
        workload.probes.push(Probe {
            kind: kind.into(),
            port: mapped,
            service: str_of(&grpc["service"]),
            command: None,
        });
    }
    workload
}

async fn the_chart_boots_the_system(env: TestEnv) {
    let Some(helm) = tool(".tools/bin/helm", "helm") else { return };
    let (database_url, redis_url) = external_urls(&env);
    let chart = Path::new(ROOT).join("helm/csp-designer");
    let output = Command::new(helm)
        .args(["template", "csp"])
        .arg(&chart)
        .args(["--namespace", "csp", "-f"])
        .arg(chart.join("ci/test-values.yaml"))
        .args(["--set-string", &format!("secrets.databaseUrl={database_url}")])
        .args(["--set-string", &format!("secrets.redisUrl={redis_url}")])
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let docs: Vec<Value> = serde_saphyr::from_multiple(&String::from_utf8(output.stdout).unwrap()).unwrap();
    let docs: Vec<Value> = docs.into_iter().filter(|d| !d.is_null()).collect();

    let deployments = docs_of_kind(&docs, "Deployment");
    assert_eq!(deployments.len(), 7, "one Deployment per target");
    let mut workloads: Vec<Workload> = deployments
        .iter()
        .map(|d| pod_workload(d["metadata"]["name"].as_str().unwrap(), &d["spec"]["template"]["spec"], &docs))
        .collect();
    let jobs: Vec<Workload> = docs_of_kind(&docs, "Job")
        .iter()
        .map(|j| pod_workload(j["metadata"]["name"].as_str().unwrap(), &j["spec"]["template"]["spec"], &docs))
        .collect();
    assert_eq!(jobs.len(), 1, "the migration Job");
    assert_eq!(jobs[0].args, ["migrate"]);

    // Services → the pods they select → the mapped port of their target port.
    let services = docs_of_kind(&docs, "Service");
    let pod_labels: Vec<(String, &Value)> = deployments
        .iter()
        .map(|d| {
            (d["metadata"]["name"].as_str().unwrap().to_owned(), &d["spec"]["template"]["metadata"]["labels"])
        })
        .collect();
    let by_name: HashMap<String, Workload> = workloads.iter().map(|w| (w.name.clone(), w.clone())).collect();
    let containers: HashMap<String, Value> = deployments
        .iter()
        .map(|d| {
            (
                d["metadata"]["name"].as_str().unwrap().to_owned(),
                d["spec"]["template"]["spec"]["containers"][0].clone(),
            )
        })
        .collect();
    let resolve = |host: &str, port: u16| -> Option<u16> {
        let service = services.iter().find(|s| s["metadata"]["name"] == host)?;
        let spec_port = service["spec"]["ports"].as_array()?.iter().find(|p| p["port"] == port)?;
        let selector = service["spec"]["selector"].as_object()?;
        let (pod, _) = pod_labels.iter().find(|(_, labels)| selector.iter().all(|(k, v)| labels[k] == *v))?;
        let target = &spec_port["targetPort"];
        let container_port = match target {
            Value::String(name) => containers[pod]["ports"]
                .as_array()?
                .iter()
                .find(|p| p["name"] == name.as_str())?["containerPort"]
                .as_u64()? as u16,
            other => other.as_u64()? as u16,
        };
        by_name[pod].ports.get(&container_port).copied()
    };
    for workload in workloads.iter_mut() {
        workload.map_listen_addresses();
        map_service_urls(workload, &resolve);
    }
    let mut jobs = jobs;
    for job in jobs.iter_mut() {
        map_service_urls(job, &resolve);
    }
    let gateway = workloads.iter().find(|w| w.args.contains(&"gateway".to_owned())).unwrap();
    let gateway = format!("127.0.0.1:{}", gateway.ports.values().next().unwrap());
    boot(&env, &jobs, &workloads, &gateway).await;
}

// --- docker compose ---

async fn docker_compose_boots_the_system(env: TestEnv) {
    let Some(compose) = tool(".tools/none", "docker-compose") else { return };
    let (database_url, redis_url) = external_urls(&env);
    let output = Command::new(compose)
        .arg("-f")
        .arg(Path::new(ROOT).join("docker-compose.yml"))
        .args(["config"])
        .env_remove("POSTGRES_PASSWORD")
        .env_remove("SECRET_KEY")
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let config: Value = serde_saphyr::from_str(&String::from_utf8(output.stdout).unwrap()).unwrap();
    let services = config["services"].as_object().unwrap();

    // PostgreSQL and Redis are the local ones; each csp service listens where its environment
    // says, on a port of its own.
    let mut workloads = Vec::new();
    let mut jobs = Vec::new();
    for (name, service) in services {
        if ["postgres", "redis", "otel-collector"].contains(&name.as_str()) {
            continue;
        }
        assert!(service.get("entrypoint").is_none(), "{name}: the image's entrypoint (csp) runs");
        let mut workload = Workload {
            name: name.clone(),
            args: service["command"].as_array().unwrap().iter().map(str_of).collect(),
            ..Default::default()
        };
        for (key, value) in service["environment"].as_object().into_iter().flatten() {
            let value = str_of(value);
            if !value.is_empty() {
                workload.env.insert(key.clone(), value);
            }
        }
        let database =
            workload.env.get("DATABASE_URL").unwrap_or_else(|| panic!("{name} has no DATABASE_URL"));
        assert!(database.contains("@postgres:5432/"), "{name}: DATABASE_URL points at the postgres service");
        assert_eq!(workload.env.get("REDIS_URL").map(String::as_str), Some("redis://redis:6379/0"), "{name}");
        workload.env.insert("DATABASE_URL".into(), database_url.clone());
        workload.env.insert("REDIS_URL".into(), redis_url.clone());
        for value in workload.env.values() {
            if let Some(port) = value.strip_prefix("0.0.0.0:") {
                workload.ports.insert(port.parse().unwrap(), free_port());
            }
        }
        if let Some(test) = service["healthcheck"]["test"].as_array() {
            let test: Vec<String> = test.iter().map(str_of).collect();
            assert_eq!(test[..3], ["CMD", "csp", "health"], "{name}: the health check runs `csp health`");
            let addr = test.iter().skip_while(|a| *a != "--addr").nth(1).unwrap();
            let port: u16 = addr.rsplit_once(':').unwrap().1.parse().unwrap();
            let mapped = *workload.ports.get(&port).unwrap_or_else(|| {
                panic!("{name}: the health check asks port {port}, where nothing listens")
            });
            let mut command: Vec<String> = test[1..].to_vec();
            for arg in command.iter_mut() {
                if *arg == *addr {
                    *arg = format!("127.0.0.1:{mapped}");
                }
            }
            workload.probes.push(Probe {
                kind: "healthcheck".into(),
                port: mapped,
                service: String::new(),
                command: Some(command),
            });
        }
        if service["restart"] == "no" {
            jobs.push(workload);
        } else {
            workloads.push(workload);
        }
    }
    assert_eq!(jobs.len(), 1, "the migrate step");
    assert_eq!(workloads.len(), 7, "one service per target");
    let listening: HashMap<String, BTreeMap<u16, u16>> =
        workloads.iter().map(|w| (w.name.clone(), w.ports.clone())).collect();
    let resolve = |host: &str, port: u16| listening.get(host).and_then(|ports| ports.get(&port)).copied();
    for workload in workloads.iter_mut().chain(jobs.iter_mut()) {
        workload.map_listen_addresses();
        map_service_urls(workload, &resolve);
    }
    // Published on 8080: the gateway.
    let gateway = &services["gateway"]["ports"][0];
    let published = match gateway {
        Value::String(s) => s.rsplit(':').next().unwrap().parse::<u16>().unwrap(),
        other => other["target"].as_u64().unwrap() as u16,
    };
    let gateway = workloads.iter().find(|w| w.name == "gateway").unwrap();
    let gateway = format!("127.0.0.1:{}", gateway.ports[&published]);
    boot(&env, &jobs, &workloads, &gateway).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_chart_boots_the_system_external() {
    csp_testkit::run(Backend::External, the_chart_boots_the_system).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_compose_boots_the_system_external() {
    csp_testkit::run(Backend::External, docker_compose_boots_the_system).await;
}
