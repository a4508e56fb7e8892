//! Model providers behind one trait: each turns a [`ProviderRequest`] into a [`Reply`] or a
//! stream of [`Piece`]s in its own wire format, and its failures into [`ProviderError`]s that
//! say what the caller can do (wait and retry, fix the key, shorten the prompt) without a key
//! or a raw upstream body in them.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use async_trait::async_trait;
use csp_platform::config::{AiSettings, ProviderKind, ProviderSettings};
use futures::stream::BoxStream;
use secrecy::SecretString;

use crate::model::{Message, Piece, Reply, ResponseFormat, ToolSpec};

mod anthropic;
mod offline;
mod openai;

pub(crate) use offline::Offline;

/// One call to a provider.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ProviderRequest {
    pub(crate) model: String,
    pub(crate) messages: Vec<Message>,
    pub(crate) tools: Vec<ToolSpec>,
    pub(crate) temperature: Option<f64>,
    pub(crate) max_tokens: u32,
    pub(crate) response: ResponseFormat,
}

/// Why a provider call failed. Messages are safe to show: no key, no raw upstream body.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub(crate) enum ProviderError {
    /// The provider's rate limit (429); wait this long when it said.
    #[error("the provider's rate limit was reached")]
    RateLimited { retry_after: Option<Duration> },
    /// The provider failed or could not be reached (5xx, connection, timeout).
    #[error("the provider is unavailable: {0}")]
    Unavailable(String),
    /// The provider refused the key (401, 403).
    #[error("the provider refused this service's API key")]
    BadKey,
    /// The provider does not know the model.
    #[error("the provider does not know model `{0}`")]
    UnknownModel(String),
    /// The prompt and output do not fit the model's context window.
    #[error("the messages do not fit the model's context window")]
    ContextTooLong,
    /// The provider refused the request for another reason (other 4xx).
    #[error("the provider refused the request: {0}")]
    Rejected(String),
    /// The provider's answer could not be read (a malformed body or stream).
    #[error("the provider's answer could not be read: {0}")]
    Malformed(String),
}

impl ProviderError {
    /// Whether trying again (after a pause) may succeed.
    pub(crate) fn retryable(&self) -> bool {
        matches!(self, ProviderError::RateLimited { .. } | ProviderError::Unavailable(_))
    }

    /// A short stable code for metrics and usage records.
    pub(crate) fn code(&self) -> &'static str {
        match self {
            ProviderError::RateLimited { .. } => "rate_limited",
            ProviderError::Unavailable(_) => "unavailable",
            ProviderError::BadKey => "bad_key",
            ProviderError::UnknownModel(_) => "unknown_model",
            ProviderError::ContextTooLong => "context_too_long",
            ProviderError::Rejected(_) => "rejected",
            ProviderError::Malformed(_) => "malformed",
        }
    }
}

/// A provider's reply, streamed.
pub(crate) type PieceStream = BoxStream<'static, Result<Piece, ProviderError>>;

/// A model provider.
#[async_trait]
pub(crate) trait Provider: Send + Sync {
    /// Whether it can be used (it has a key, when it needs one).
    fn available(&self) -> bool;

    /// One reply.
    async fn complete(&self, request: &ProviderRequest) -> Result<Reply, ProviderError>;

    /// A reply as it is generated; the last piece is `Done` with the usage.
    async fn stream(&self, request: &ProviderRequest) -> Result<PieceStream, ProviderError>;
}

/// Cuts an upstream text to a length safe to show in an error.
pub(crate) fn clip(text: &str) -> String {
    const MAX: usize = 200;
    let text = text.trim();
    if text.chars().count() <= MAX {
        return text.to_owned();
    }
    format!("{}…", text.chars().take(MAX).collect::<String>())
}

/// A provider's key: its own, from its file, or the built-in provider's seed variable.
fn key(name: &str, settings: &ProviderSettings, ai: &AiSettings) -> Result<Option<SecretString>, String> {
    if let Some(key) = &settings.api_key {
        return Ok(Some(key.clone()));
    }
    if let Some(path) = &settings.api_key_file {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("ai.providers.{name}.api_key_file: cannot read {}: {e}", path.display()))?;
        return Ok(Some(SecretString::from(text.trim().to_owned())));
    }
    Ok(match (name, settings.kind) {
        ("openai", ProviderKind::Openai) => ai.openai_api_key.clone(),
        ("anthropic", ProviderKind::Anthropic) => ai.anthropic_api_key.clone(),
        _ => None,
    })
}

/// Every configured provider, by name.
pub(crate) fn build(ai: &AiSettings) -> Result<BTreeMap<String, Arc<dyn Provider>>, String> {
    let mut providers: BTreeMap<String, Arc<dyn Provider>> = BTreeMap::new();
    for (name, settings) in ai.effective_providers() {
        let key = key(&name, &settings, ai)?;
        let provider: Arc<dyn Provider> = match settings.kind {
            ProviderKind::Offline => Arc::new(Offline),
            ProviderKind::Openai => {
                Arc::new(openai::OpenAi::new(settings.base_url.as_deref(), key, ai.request_timeout))
            }
            ProviderKind::Anthropic => {
                Arc::new(anthropic::Anthropic::new(settings.base_url.as_deref(), key, ai.request_timeout)?)
            }
        };
        providers.insert(name, provider);
    }
    Ok(providers)
}
