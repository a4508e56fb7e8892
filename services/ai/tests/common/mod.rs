//! AI replicas with a real design service (for design access), and a fake upstream that
//! speaks a provider's wire format.

#![allow(dead_code, unreachable_pub, clippy::unwrap_used)]

use std::{
    collections::VecDeque,
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::Bytes;

use csp_platform::{Settings, auth::Role, server::bind};
use csp_proto::{
    ai::v1::{self as pb, ai_service_client::AiServiceClient},
    design::v1::{self as dpb, design_service_client::DesignServiceClient},
};
use csp_testkit::{TestEnv, TestIssuer, authed};
use futures::StreamExt as _;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;

use serde_json::Value;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

pub type Client = AiServiceClient<Channel>;

pub struct Harness {
    pub replicas: Vec<Client>,
    pub designs: DesignServiceClient<Channel>,
    pub issuer: TestIssuer,
    pub settings: Settings,
    stop: CancellationToken,
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

pub async fn connect(addr: SocketAddr) -> Channel {
    Channel::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap()
}

/// Starts a registry, the design service and `replicas` AI replicas.
pub async fn start(env: &TestEnv, replicas: usize, tweak: impl FnOnce(&mut Settings)) -> Harness {
    let issuer = TestIssuer::start().await;
    let mut settings = env.settings();
    issuer.point(&mut settings);
    tweak(&mut settings);
    let stop = CancellationToken::new();
    let listener = bind("registry", "127.0.0.1:0".parse().unwrap()).await.unwrap();
    let registry = csp_registry::Application::with_listener(&settings, env.bus(), listener).await.unwrap();
    settings.services.registry.address = format!("http://{}", registry.local_addr());
    tokio::spawn(registry.run_until_stopped(stop.clone().cancelled_owned()));
    let listener = bind("design", "127.0.0.1:0".parse().unwrap()).await.unwrap();
    let design = csp_design::Application::with_listener(&settings, env.bus(), listener).await.unwrap();
    let design_addr = design.local_addr();
    settings.services.design.address = format!("http://{design_addr}");
    tokio::spawn(design.run_until_stopped(stop.clone().cancelled_owned()));
    let mut clients = Vec::new();
    for _ in 0..replicas {
        let listener = bind("ai", "127.0.0.1:0".parse().unwrap()).await.unwrap();
        let app = csp_ai::Application::with_listener(&settings, env.own_bus().await, listener).await.unwrap();
        let addr = app.local_addr();
        tokio::spawn(app.run_until_stopped(stop.clone().cancelled_owned()));
        clients.push(AiServiceClient::new(connect(addr).await));
    }
    Harness {
        replicas: clients,
        designs: DesignServiceClient::new(connect(design_addr).await),
        issuer,
        settings,
        stop,
    }
}

impl Harness {
    pub fn designer(&self, user: &str) -> String {
        self.issuer.token(user, &[Role::Designer])
    }

    pub fn ai(&self) -> Client {
        self.replicas[0].clone()
    }

    pub async fn design(&self, token: &str) -> String {
        let request = dpb::CreateDesignRequest { name: "For AI".into(), ..Default::default() };
        self.designs
            .clone()
            .create_design(authed(request, token))
            .await
            .unwrap()
            .into_inner()
            .design
            .unwrap()
            .id
    }
}

pub fn user(text: &str) -> pb::ChatMessage {
    pb::ChatMessage { role: pb::MessageRole::User as i32, content: text.into(), ..Default::default() }
}

pub fn system(text: &str) -> pb::ChatMessage {
    pb::ChatMessage { role: pb::MessageRole::System as i32, content: text.into(), ..Default::default() }
}

pub fn chat(messages: Vec<pb::ChatMessage>) -> pb::ChatRequest {
    pb::ChatRequest { messages, ..Default::default() }
}

// --- a fake upstream, speaking a provider's wire format ---

/// What the fake upstream answers one request with.
#[derive(Debug, Clone)]
pub enum Answer {
    /// A status, headers and a JSON body.
    Json(u16, Vec<(&'static str, String)>, Value),
    /// A 200 event stream: (event name or "", data) pairs, then the end — or, with `cut`, the
    /// connection closes abruptly after them.
    Sse(Vec<(&'static str, String)>, bool),
    /// No answer for this long.
    Hang(Duration),
}

/// A request the fake upstream received.
#[derive(Debug, Clone)]
pub struct Received {
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: Value,
}

impl Received {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }
}

/// A local HTTP server answering from a script; once the script runs out, the last answer
/// repeats.
#[derive(Clone)]
pub struct Upstream {
    pub addr: SocketAddr,
    script: Arc<Mutex<VecDeque<Answer>>>,
    last: Arc<Mutex<Option<Answer>>>,
    pub received: Arc<Mutex<Vec<Received>>>,
}

impl Upstream {
    pub async fn start(script: Vec<Answer>) -> Upstream {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let upstream = Upstream {
            addr,
            script: Arc::new(Mutex::new(script.into())),
            last: Arc::new(Mutex::new(None)),
            received: Arc::default(),
        };
        let serving = upstream.clone();
        tokio::spawn(async move {
            loop {
                let Ok((socket, _)) = listener.accept().await else { return };
                let serving = serving.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |request| {
                        let serving = serving.clone();
                        async move { Ok::<_, Infallible>(serving.answer(request).await) }
                    });
                    let _ =
                        hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new())
                            .serve_connection(hyper_util::rt::TokioIo::new(socket), service)
                            .await;
                });
            }
        });
        upstream
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn received(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }

    async fn answer(
        &self,
        request: hyper::Request<hyper::body::Incoming>,
    ) -> hyper::Response<http_body_util::combinators::BoxBody<Bytes, std::io::Error>> {
        let path = request.uri().path().to_owned();
        let headers = request
            .headers()
            .iter()
            .map(|(n, v)| (n.as_str().to_owned(), v.to_str().unwrap_or_default().to_owned()))
            .collect();
        let body = request.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
        let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        self.received.lock().unwrap().push(Received { path, headers, body });
        let next = self.script.lock().unwrap().pop_front();
        let answer = match next {
            Some(answer) => {
                *self.last.lock().unwrap() = Some(answer.clone());
                answer
            }
            None => self.last.lock().unwrap().clone().expect("the fake upstream has an answer"),
        };
        match answer {
            Answer::Json(status, headers, body) => {
                let mut response =
                    hyper::Response::builder().status(status).header("content-type", "application/json");
                for (name, value) in headers {
                    response = response.header(name, value);
                }
                let body = http_body_util::Full::new(Bytes::from(body.to_string())).map_err(|e| match e {});
                response.body(body.boxed()).unwrap()
            }
            Answer::Hang(wait) => {
                tokio::time::sleep(wait).await;
                let body = http_body_util::Full::new(Bytes::new()).map_err(|e| match e {});
                hyper::Response::builder().status(504).body(body.boxed()).unwrap()
            }
            Answer::Sse(events, cut) => {
                let mut frames: Vec<Result<Frame<Bytes>, std::io::Error>> = events
                    .into_iter()
                    .map(|(event, data)| {
                        let text = if event.is_empty() {
                            format!("data: {data}\n\n")
                        } else {
                            format!("event: {event}\ndata: {data}\n\n")
                        };
                        Ok(Frame::data(Bytes::from(text)))
                    })
                    .collect();
                if cut {
                    frames.push(Err(std::io::Error::other("connection cut")));
                }
                let stream = futures::stream::iter(frames).then(|frame| async move {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    frame
                });
                hyper::Response::builder()
                    .status(200)
                    .header("content-type", "text/event-stream")
                    .body(BodyExt::boxed(StreamBody::new(stream)))
                    .unwrap()
            }
        }
    }
}
