//! Calls to a server in this same process.
//!
//! `csp serve --target all` runs every service in one process, each on its own port. A call
//! from one of them to another needs no socket there: every [`GrpcServer`](crate::GrpcServer)
//! registers its whole stack (observe, auth, concurrency limit, routes) under the addresses it
//! listens on, and a [`client::channel`](crate::client::channel) to such an address hands the
//! request to that stack directly. It is the same gRPC call — protobuf encoded, with its
//! headers, deadline, credentials, server span and metrics — without HTTP/2 framing and two
//! trips through the kernel.
//!
//! A server leaves the registry when it starts draining, so later calls go over the network and
//! fail as they would from another process. Services in separate processes never see each
//! other here and talk over the network as before.

use std::{
    collections::HashMap,
    convert::Infallible,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::{LazyLock, RwLock},
    task::{Context, Poll},
    time::Duration,
};

use futures::future::BoxFuture;
use http::{HeaderMap, Request, Response};
use tonic::{TimeoutExpired, body::Body};
use tower::Service as _;

use crate::server::HttpService;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A server reachable in process: its stack and its own deadline for calls.
#[derive(Clone)]
struct Entry {
    id: u64,
    service: HttpService,
    timeout: Duration,
}

static SERVERS: LazyLock<RwLock<HashMap<String, Entry>>> = LazyLock::new(Default::default);
static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// The `host:port` forms a client may use for a server listening on `addr`.
fn authorities(addr: SocketAddr) -> Vec<String> {
    let port = addr.port();
    let mut hosts: Vec<IpAddr> = vec![addr.ip()];
    if addr.ip().is_unspecified() {
        hosts = vec![IpAddr::V4(Ipv4Addr::LOCALHOST), IpAddr::V6(Ipv6Addr::LOCALHOST)];
    }
    let mut names: Vec<String> = hosts.iter().map(|ip| SocketAddr::new(*ip, port).to_string()).collect();
    if hosts.iter().any(IpAddr::is_loopback) {
        names.push(format!("localhost:{port}"));
    }
    names
}

/// A server's place in the registry; dropping it takes the server out.
#[must_use = "the server leaves the registry when this is dropped"]
pub(crate) struct Registration {
    id: u64,
    names: Vec<String>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut servers = SERVERS.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        for name in &self.names {
            // Only our own entry: a later server may have taken the port since.
            if servers.get(name).is_some_and(|entry| entry.id == self.id) {
                servers.remove(name);
            }
        }
    }
}

/// Makes the server listening on `addr` reachable in process, answering with `service` and
/// giving every call at most `timeout` (or the caller's shorter `grpc-timeout`).
pub(crate) fn register(addr: SocketAddr, service: HttpService, timeout: Duration) -> Registration {
    let id = NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let names = authorities(addr);
    let mut servers = SERVERS.write().unwrap_or_else(std::sync::PoisonError::into_inner);
    for name in &names {
        servers.insert(name.clone(), Entry { id, service: service.clone(), timeout });
    }
    Registration { id, names }
}

/// The server at `authority` (`host:port`) if it runs in this process.
pub(crate) fn find(authority: &str) -> Option<LocalServer> {
    let servers = SERVERS.read().unwrap_or_else(std::sync::PoisonError::into_inner);
    servers.get(authority).map(|entry| LocalServer { entry: entry.clone() })
}

/// A handle on a server in this process, used like a network channel.
pub(crate) struct LocalServer {
    entry: Entry,
}

impl std::fmt::Debug for LocalServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalServer").field("id", &self.entry.id).finish_non_exhaustive()
    }
}

impl LocalServer {
    pub(crate) fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.entry.service.poll_ready(cx).map_err(|never: Infallible| match never {})
    }

    /// Calls the server; the call ends with TimeoutExpired (a CANCELLED status for the caller,
    /// as over the network) when its deadline passes before the response headers.
    pub(crate) fn call(
        &mut self,
        request: Request<Body>,
    ) -> BoxFuture<'static, Result<Response<Body>, BoxError>> {
        let deadline = match grpc_timeout(request.headers()) {
            Some(asked) => asked.min(self.entry.timeout),
            None => self.entry.timeout,
        };
        let call = self.entry.service.call(request);
        Box::pin(async move {
            match tokio::time::timeout(deadline, call).await {
                Ok(Ok(response)) => Ok(response),
                Ok(Err(never)) => match never {},
                Err(_) => Err(Box::new(TimeoutExpired(())) as BoxError),
            }
        })
    }
}

/// The caller's deadline from `grpc-timeout` (`<at most 8 digits><H|M|S|m|u|n>`); a malformed
/// one is ignored, as the network server does.
fn grpc_timeout(headers: &HeaderMap) -> Option<Duration> {
    let text = headers.get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = text.split_at(text.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 {
        return None;
    }
    let value: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(value * 3600),
        "M" => Duration::from_secs(value * 60),
        "S" => Duration::from_secs(value),
        "m" => Duration::from_millis(value),
        "u" => Duration::from_micros(value),
        "n" => Duration::from_nanos(value),
        _ => return None,
    })
}

/// Whether a server at `authority` runs in this process.
#[cfg(test)]
fn is_registered(authority: &str) -> bool {
    SERVERS.read().unwrap_or_else(std::sync::PoisonError::into_inner).contains_key(authority)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn grpc_timeouts_parse_as_the_spec_says() {
        let at = |value: &str| {
            let mut headers = HeaderMap::new();
            headers.insert("grpc-timeout", value.parse().unwrap());
            grpc_timeout(&headers)
        };
        assert_eq!(at("5S"), Some(Duration::from_secs(5)));
        assert_eq!(at("250m"), Some(Duration::from_millis(250)));
        assert_eq!(at("2H"), Some(Duration::from_secs(7200)));
        assert_eq!(at("100u"), Some(Duration::from_micros(100)));
        assert_eq!(at("123456789S"), None, "more than 8 digits");
        assert_eq!(at("S"), None);
        assert_eq!(at("5x"), None);
        assert_eq!(grpc_timeout(&HeaderMap::new()), None);
    }

    #[test]
    fn a_server_on_every_interface_is_found_by_loopback_names() {
        let names = authorities("0.0.0.0:4100".parse().unwrap());
        assert!(names.contains(&"127.0.0.1:4100".to_owned()));
        assert!(names.contains(&"localhost:4100".to_owned()));
        assert!(names.contains(&"[::1]:4100".to_owned()));
        assert_eq!(authorities("10.1.2.3:4100".parse().unwrap()), vec!["10.1.2.3:4100".to_owned()]);
    }

    #[test]
    fn a_registration_removes_only_its_own_entry() {
        let addr: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let service = || {
            HttpService::new(tower::service_fn(|_: Request<Body>| async {
                Ok::<_, Infallible>(Response::new(Body::empty()))
            }))
        };
        let first = register(addr, service(), Duration::from_secs(1));
        let second = register(addr, service(), Duration::from_secs(1));
        drop(first);
        assert!(is_registered("127.0.0.1:1"), "the newer server stays");
        drop(second);
        assert!(!is_registered("127.0.0.1:1"));
        assert!(!is_registered("localhost:1"));
    }
}
