//! Who may say where a call came from: `x-forwarded-for` is believed only from the peers of
//! `server.trusted_proxies` (the gateway, which sets it from the connection it accepted); from
//! anyone else it is dropped before any handler reads it, so a direct caller cannot pose as
//! many addresses (and dodge a per-address lockout). Calls from this process (the gateway
//! serving in-process) carry no peer and keep it.

use std::{
    net::IpAddr,
    sync::Arc,
    task::{Context, Poll},
};

use http::Request;
use ipnet::IpNet;
use tonic::transport::server::TcpConnectInfo;
use tower::{Layer, Service};

/// Drops `x-forwarded-for` from calls whose peer is not a trusted proxy.
#[derive(Debug, Clone)]
pub struct TrustedProxiesLayer {
    trusted: Arc<Vec<IpNet>>,
}

impl TrustedProxiesLayer {
    /// Believes the header from peers in `trusted`.
    pub fn new(trusted: Vec<IpNet>) -> Self {
        Self { trusted: Arc::new(trusted) }
    }
}

impl<S> Layer<S> for TrustedProxiesLayer {
    type Service = TrustedProxies<S>;

    fn layer(&self, inner: S) -> Self::Service {
        TrustedProxies { inner, trusted: self.trusted.clone() }
    }
}

/// The service made by [`TrustedProxiesLayer`].
#[derive(Debug, Clone)]
pub struct TrustedProxies<S> {
    inner: S,
    trusted: Arc<Vec<IpNet>>,
}

impl<S, B> Service<Request<B>> for TrustedProxies<S>
where
    S: Service<Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        let peer: Option<IpAddr> =
            request.extensions().get::<TcpConnectInfo>().and_then(|info| info.remote_addr()).map(|a| a.ip());
        if let Some(peer) = peer
            && !self.trusted.iter().any(|net| net.contains(&peer))
        {
            request.headers_mut().remove("x-forwarded-for");
        }
        self.inner.call(request)
    }
}
