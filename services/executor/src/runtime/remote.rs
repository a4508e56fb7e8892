//! Custom components served at a gRPC address (`csp.component.v1.ComponentRuntime`): one
//! `Process` stream per node and execution. Inputs go out as they arrive (the stream's own
//! flow control is the back-pressure); outputs come back on their ports; an error names the
//! input it concerns, which is retried, skipped, routed or fails the node by its policy.

use std::{
    collections::{HashMap, VecDeque},
    time::Duration,
};

use csp_proto::{
    component::v1::{self as pb, component_runtime_client::ComponentRuntimeClient},
    json as pbjson,
};
use serde_json::Value;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::{
    RemoteEndpoint, Services,
    channel::{Msg, Received},
    components::Emit,
    node::{Driver, NodeFailed},
};

/// Inputs kept for retries, by sequence number.
const KEPT: usize = 1024;

/// A remote node.
pub(crate) struct Remote {
    endpoint: RemoteEndpoint,
    node_id: String,
    config: Value,
    execution_id: String,
    traceparent: String,
    inputs: Vec<String>,
    outputs: Vec<String>,
}

fn request(kind: pb::process_request::Kind) -> pb::ProcessRequest {
    pb::ProcessRequest { kind: Some(kind) }
}

impl Remote {
    pub(crate) fn new(
        endpoint: RemoteEndpoint,
        node_id: &str,
        config: Value,
        services: &Services,
        inputs: &[String],
        outputs: &[String],
    ) -> Self {
        Self {
            endpoint,
            node_id: node_id.to_owned(),
            config,
            execution_id: services.execution_id.clone(),
            traceparent: services.traceparent.clone(),
            inputs: inputs.to_vec(),
            outputs: outputs.to_vec(),
        }
    }

    async fn connect(&self) -> Result<ComponentRuntimeClient<tonic::transport::Channel>, String> {
        let endpoint = tonic::transport::Endpoint::from_shared(self.endpoint.address.clone())
            .map_err(|e| format!("`{}` is not a usable address: {e}", self.endpoint.address))?
            .connect_timeout(Duration::from_secs(5))
            .tcp_nodelay(true);
        let channel = endpoint
            .connect()
            .await
            .map_err(|e| format!("cannot reach the component at {}: {e}", self.endpoint.address))?;
        Ok(ComponentRuntimeClient::new(channel))
    }

    /// Retries one message on streams of its own (Start, the message, end of input) until it
    /// passes or the policy gives up.
    #[allow(clippy::too_many_arguments)]
    async fn retry_alone(
        &self,
        client: &mut ComponentRuntimeClient<tonic::transport::Channel>,
        driver: &mut Driver,
        port: usize,
        msg: Msg,
        mut attempt: u32,
        mut error: String,
        emit: &mut Emit,
    ) -> Result<(), NodeFailed> {
        loop {
            if attempt > driver.policy.max_retries {
                return driver.give_up(error, msg, attempt, emit).await;
            }
            driver.retry_wait(&error, attempt).await;
            attempt += 1;
            let mut requests = vec![request(pb::process_request::Kind::Start(self.start()))];
            requests.push(request(pb::process_request::Kind::Message(pb::Message {
                port: self.inputs.get(port).cloned().unwrap_or_default(),
                payload: Some(pbjson::to_value((*msg).clone())),
                sequence: 1,
            })));
            for name in &self.inputs {
                requests.push(request(pb::process_request::Kind::InputClosed(pb::InputClosed {
                    port: name.clone(),
                })));
            }
            let idle = Duration::from_millis(self.endpoint.timeout_ms.max(1));
            let mut responses = match client.process(futures::stream::iter(requests)).await {
                Ok(r) => r.into_inner(),
                Err(status) => {
                    error = status.message().to_owned();
                    continue;
                }
            };
            let mut outputs = Vec::new();
            let outcome = loop {
                match tokio::time::timeout(idle, responses.message()).await {
                    Err(_) => break Err((format!("did not answer within {} ms", idle.as_millis()), true)),
                    Ok(Err(status)) => break Err((status.message().to_owned(), true)),
                    Ok(Ok(None)) => {
                        break Err(("ended its stream before saying it was done".to_owned(), true));
                    }
                    Ok(Ok(Some(answer))) => match answer.kind {
                        Some(pb::process_response::Kind::Message(m)) => outputs.push(m),
                        Some(pb::process_response::Kind::Error(e)) => break Err((e.message, e.retryable)),
                        Some(pb::process_response::Kind::Done(_)) => break Ok(()),
                        None => {}
                    },
                }
            };
            match outcome {
                Ok(()) => {
                    for m in outputs {
                        if let Some(port) = self.outputs.iter().position(|p| *p == m.port) {
                            emit.value(port, m.payload.map(pbjson::from_value).unwrap_or(Value::Null));
                        }
                    }
                    return Ok(());
                }
                Err((why, retryable)) => {
                    error = why;
                    if !retryable {
                        return driver.give_up(error, msg, attempt, emit).await;
                    }
                }
            }
        }
    }

    fn start(&self) -> pb::Start {
        pb::Start {
            execution_id: self.execution_id.clone(),
            node_id: self.node_id.clone(),
            config: Some(pbjson::to_struct(self.config.clone())),
            traceparent: self.traceparent.clone(),
        }
    }

    /// How long the component may take to answer, while it owes an answer: the node's
    /// `timeout_ms`, or the node policy's per-message timeout when that is shorter.
    fn idle(&self, policy: &super::Policy) -> Duration {
        let own = Duration::from_millis(self.endpoint.timeout_ms.max(1));
        policy.timeout.map_or(own, |policy| own.min(policy.max(Duration::from_millis(1))))
    }

    /// Opens a `Process` stream and sends its Start. The response headers are awaited with
    /// the first answer, not before the inputs: grpc-python and grpc-go servers send them only
    /// with their first answer, which comes only once they have a message to answer.
    async fn open(&self, client: &ComponentRuntimeClient<tonic::transport::Channel>) -> Stream {
        let (tx, rx) = mpsc::channel::<pb::ProcessRequest>(64);
        let _ = tx.send(request(pb::process_request::Kind::Start(self.start()))).await;
        let mut client = client.clone();
        let call = Box::pin(async move { client.process(ReceiverStream::new(rx)).await });
        Stream { tx, call: Some(call), responses: None }
    }

    pub(crate) async fn run(self, mut driver: Driver) -> Result<(), NodeFailed> {
        let client = self.connect().await.map_err(NodeFailed)?;
        let mut stream = self.open(&client).await;
        let idle = self.idle(&driver.policy);
        let mut emit = Emit::new(driver.outputs_len());
        let mut batch: Vec<Msg> = Vec::new();
        let mut sent: HashMap<u64, (usize, Msg, u32)> = HashMap::new();
        let mut order: VecDeque<u64> = VecDeque::new();
        let mut sequence = 0u64;
        // The highest input sequence an answer (output or error) has named.
        let mut answered = 0u64;
        let mut inputs_open = true;
        // Something sent that nothing has answered yet: the component must answer in time.
        let mut awaiting = false;
        let max = driver.shared.batch;
        loop {
            tokio::select! {
                received = driver.inputs.recv(None, false, &mut batch, max, &driver.waits, false), if inputs_open => {
                    match received {
                        Received::Port(port) => {
                            driver.stats.messages_in.fetch_add(batch.len() as u64, std::sync::atomic::Ordering::Relaxed);
                            for msg in batch.drain(..) {
                                sequence += 1;
                                let message = pb::Message {
                                    port: self.inputs.get(port).cloned().unwrap_or_default(),
                                    payload: Some(pbjson::to_value((*msg).clone())),
                                    sequence,
                                };
                                sent.insert(sequence, (port, msg, 1));
                                order.push_back(sequence);
                                if order.len() > KEPT && let Some(old) = order.pop_front() {
                                    sent.remove(&old);
                                }
                                awaiting = true;
                                if stream.tx.send(request(pb::process_request::Kind::Message(message))).await.is_err() {
                                    return Err(NodeFailed(format!("the component at {} hung up", self.endpoint.address)));
                                }
                            }
                        }
                        Received::Closed => {
                            inputs_open = false;
                            awaiting = true;
                            self.close_inputs(&stream.tx).await;
                        }
                    }
                }
                answer = async {
                    if awaiting { tokio::time::timeout(idle, stream.next()).await } else { Ok(stream.next().await) }
                } => {
                    awaiting = !inputs_open;
                    let answer = match answer {
                        Err(_) => {
                            // Not answered in time: what it has not answered goes to a new
                            // stream, each message with one attempt more, under the node's retry
                            // policy and then its error policy (at least once: a message it was
                            // still working on may be processed twice).
                            let error = format!("the component at {} did not answer within {} ms", self.endpoint.address, idle.as_millis());
                            let owed: Vec<u64> = order.iter().copied().filter(|s| *s > answered).collect();
                            stream = self.open(&client).await;
                            let mut waited = false;
                            for seq in owed {
                                let Some((port, msg, attempt)) = sent.get(&seq).cloned() else { continue };
                                if attempt > driver.policy.max_retries {
                                    sent.remove(&seq);
                                    driver.give_up(error.clone(), msg, attempt, &mut emit).await?;
                                    continue;
                                }
                                if !waited {
                                    driver.retry_wait(&error, attempt).await;
                                    waited = true;
                                }
                                sent.insert(seq, (port, msg.clone(), attempt + 1));
                                let again = pb::Message {
                                    port: self.inputs.get(port).cloned().unwrap_or_default(),
                                    payload: Some(pbjson::to_value((*msg).clone())),
                                    sequence: seq,
                                };
                                let _ = stream.tx.send(request(pb::process_request::Kind::Message(again))).await;
                                awaiting = true;
                            }
                            if !inputs_open {
                                self.close_inputs(&stream.tx).await;
                                awaiting = true;
                            }
                            driver.flush(&mut emit).await;
                            continue;
                        }
                        Ok(Err(status)) => return Err(NodeFailed(format!("the component at {} failed: {}", self.endpoint.address, status.message()))),
                        Ok(Ok(None)) => return Err(NodeFailed(format!("the component at {} ended its stream before saying it was done", self.endpoint.address))),
                        Ok(Ok(Some(answer))) => answer,
                    };
                    match answer.kind {
                        Some(pb::process_response::Kind::Message(m)) => {
                            answered = answered.max(m.sequence);
                            let Some(port) = self.outputs.iter().position(|p| *p == m.port) else {
                                return Err(NodeFailed(format!("the component sent to `{}`, which is not one of its outputs", m.port)));
                            };
                            emit.value(port, m.payload.map(pbjson::from_value).unwrap_or(Value::Null));
                        }
                        Some(pb::process_response::Kind::Error(e)) => {
                            answered = answered.max(e.sequence);
                            let Some((port, msg, attempt)) = sent.get(&e.sequence).cloned() else {
                                driver.give_up(e.message, super::channel::msg(Value::Null), 1, &mut emit).await?;
                                continue;
                            };
                            if e.retryable && attempt <= driver.policy.max_retries && !inputs_open {
                                // The component was told its inputs closed: a message sent now
                                // would break the protocol, so retries run on streams of their own.
                                let mut alone = client.clone();
                                self.retry_alone(&mut alone, &mut driver, port, msg, attempt, e.message, &mut emit).await?;
                            } else if e.retryable && attempt <= driver.policy.max_retries {
                                driver.retry_wait(&e.message, attempt).await;
                                sent.insert(e.sequence, (port, msg.clone(), attempt + 1));
                                let again = pb::Message {
                                    port: self.inputs.get(port).cloned().unwrap_or_default(),
                                    payload: Some(pbjson::to_value((*msg).clone())),
                                    sequence: e.sequence,
                                };
                                awaiting = true;
                                let _ = stream.tx.send(request(pb::process_request::Kind::Message(again))).await;
                            } else {
                                driver.give_up(e.message, msg, attempt, &mut emit).await?;
                            }
                        }
                        Some(pb::process_response::Kind::Done(_)) => {
                            driver.flush(&mut emit).await;
                            break;
                        }
                        None => {}
                    }
                    driver.flush(&mut emit).await;
                }
            }
        }
        driver.outputs.close();
        Ok(())
    }

    async fn close_inputs(&self, tx: &mpsc::Sender<pb::ProcessRequest>) {
        for port in &self.inputs {
            let closed = pb::InputClosed { port: port.clone() };
            let _ = tx.send(request(pb::process_request::Kind::InputClosed(closed))).await;
        }
    }
}

type Call = std::pin::Pin<
    Box<
        dyn std::future::Future<
                Output = Result<tonic::Response<tonic::Streaming<pb::ProcessResponse>>, tonic::Status>,
            > + Send,
    >,
>;

/// One `Process` stream: where requests go, and the answers (after the response headers).
struct Stream {
    tx: mpsc::Sender<pb::ProcessRequest>,
    call: Option<Call>,
    responses: Option<tonic::Streaming<pb::ProcessResponse>>,
}

impl Stream {
    /// The next answer, the response headers first if they have not come yet.
    async fn next(&mut self) -> Result<Option<pb::ProcessResponse>, tonic::Status> {
        if let Some(call) = self.call.as_mut() {
            let responses = call.await?.into_inner();
            self.call = None;
            self.responses = Some(responses);
        }
        match self.responses.as_mut() {
            Some(responses) => responses.message().await,
            None => Ok(None),
        }
    }
}
