//! The AI service's settings: providers with their models and prices, limits and budgets,
//! timeouts, retries and fallbacks.

use std::{collections::BTreeMap, path::PathBuf, time::Duration};

use secrecy::SecretString;
use serde::Deserialize;

use super::ConfigError;

/// AI providers, limits and budgets.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AiSettings {
    /// OpenAI API key (for the built-in `openai` provider).
    pub openai_api_key: Option<SecretString>,
    /// Anthropic API key (for the built-in `anthropic` provider).
    pub anthropic_api_key: Option<SecretString>,
    /// The provider of requests that name none.
    pub default_provider: String,
    /// How long one call to a provider may take (each attempt).
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// Attempts after the first on a rate limit (429) or a provider failure (5xx, timeout).
    pub max_retries: u32,
    /// The text of one request's messages, in bytes.
    pub max_prompt_bytes: usize,
    /// Output tokens of a request that sets none (and the most one may ask for).
    pub max_output_tokens: u32,
    /// Tokens of history a conversation sends by default (oldest messages are left out).
    pub conversation_token_budget: u32,
    /// Providers besides (or replacing) the built-in `offline`, `openai` and `anthropic`.
    pub providers: BTreeMap<String, ProviderSettings>,
    /// For `provider/model`, the ordered `provider/model`s to try when it fails.
    pub fallbacks: BTreeMap<String, Vec<String>>,
    /// Per-user limits and optional spend budgets.
    pub limits: AiLimits,
}

impl Default for AiSettings {
    fn default() -> Self {
        Self {
            openai_api_key: None,
            anthropic_api_key: None,
            default_provider: "offline".into(),
            request_timeout: Duration::from_secs(60),
            max_retries: 2,
            max_prompt_bytes: 1024 * 1024,
            max_output_tokens: 4096,
            conversation_token_budget: 4000,
            providers: BTreeMap::new(),
            fallbacks: BTreeMap::new(),
            limits: AiLimits::default(),
        }
    }
}

/// What speaks to a provider.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProviderKind {
    /// Deterministic answers computed here: no network, no key.
    Offline,
    /// The OpenAI chat completions API, or any endpoint that speaks it (`base_url`).
    Openai,
    /// The Anthropic Messages API.
    Anthropic,
}

/// One provider.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderSettings {
    /// What speaks to it.
    pub kind: ProviderKind,
    /// Its API's base URL, e.g. `http://localhost:11434/v1` for a local OpenAI-compatible
    /// server; the kind's public API when unset.
    #[serde(default)]
    pub base_url: Option<String>,
    /// Its API key.
    #[serde(default)]
    pub api_key: Option<SecretString>,
    /// A file holding its API key (a mounted Kubernetes secret).
    #[serde(default)]
    pub api_key_file: Option<PathBuf>,
    /// The model of requests that name none.
    pub default_model: String,
    /// Its models.
    pub models: BTreeMap<String, ModelSettings>,
}

/// One model.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSettings {
    /// Tokens it takes in and gives out together.
    pub context_window: u32,
    /// US dollars per 1,000 input tokens.
    pub input_per_1k: f64,
    /// US dollars per 1,000 output tokens.
    pub output_per_1k: f64,
    /// Whether it can call tools.
    #[serde(default = "yes")]
    pub tools: bool,
}

fn yes() -> bool {
    true
}

/// Per-user limits and spend budgets, held across replicas.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AiLimits {
    /// Requests per user per minute.
    pub requests_per_minute: u64,
    /// Tokens (input and output) per user per day (UTC).
    pub tokens_per_day: u64,
    /// US dollars per user per day.
    pub user_spend_per_day_usd: Option<f64>,
    /// US dollars per user per month.
    pub user_spend_per_month_usd: Option<f64>,
    /// US dollars per design per day.
    pub design_spend_per_day_usd: Option<f64>,
    /// US dollars per design per month.
    pub design_spend_per_month_usd: Option<f64>,
}

impl Default for AiLimits {
    fn default() -> Self {
        Self {
            requests_per_minute: 60,
            tokens_per_day: 1_000_000,
            user_spend_per_day_usd: None,
            user_spend_per_month_usd: None,
            design_spend_per_day_usd: None,
            design_spend_per_month_usd: None,
        }
    }
}

fn model(context_window: u32, input_per_1k: f64, output_per_1k: f64) -> ModelSettings {
    ModelSettings { context_window, input_per_1k, output_per_1k, tools: true }
}

/// The providers every installation has: `offline` (the default; its prices are nominal, so
/// that accounting works offline), `openai` and `anthropic` (usable once their key is set).
pub fn builtin_providers() -> BTreeMap<String, ProviderSettings> {
    let provider = |kind, default_model: &str, models: &[(&str, ModelSettings)]| ProviderSettings {
        kind,
        base_url: None,
        api_key: None,
        api_key_file: None,
        default_model: default_model.into(),
        models: models.iter().map(|(name, m)| ((*name).to_owned(), *m)).collect(),
    };
    BTreeMap::from([
        (
            "offline".to_owned(),
            provider(ProviderKind::Offline, "offline-1", &[("offline-1", model(32_768, 0.0001, 0.0002))]),
        ),
        (
            "openai".to_owned(),
            provider(
                ProviderKind::Openai,
                "gpt-4o-mini",
                &[
                    ("gpt-4o", model(128_000, 0.0025, 0.01)),
                    ("gpt-4o-mini", model(128_000, 0.00015, 0.0006)),
                    ("gpt-3.5-turbo", model(16_385, 0.0005, 0.0015)),
                ],
            ),
        ),
        (
            "anthropic".to_owned(),
            provider(
                ProviderKind::Anthropic,
                "claude-3-5-haiku-latest",
                &[
                    ("claude-3-5-sonnet-latest", model(200_000, 0.003, 0.015)),
                    ("claude-3-5-haiku-latest", model(200_000, 0.0008, 0.004)),
                ],
            ),
        ),
    ])
}

impl AiSettings {
    /// The providers in effect: the built-in ones, overridden and extended by `providers`.
    pub fn effective_providers(&self) -> BTreeMap<String, ProviderSettings> {
        let mut providers = builtin_providers();
        providers.extend(self.providers.clone());
        providers
    }

    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key, message: String| Err(ConfigError::Invalid { key, message });
        let providers = self.effective_providers();
        if !providers.contains_key(&self.default_provider) {
            return invalid(
                "ai.default_provider",
                format!("`{}` is not a configured provider", self.default_provider),
            );
        }
        if self.max_output_tokens == 0 || self.conversation_token_budget == 0 {
            return invalid(
                "ai",
                "max_output_tokens and conversation_token_budget must be at least 1".into(),
            );
        }
        if self.max_prompt_bytes < 1024 {
            return invalid("ai.max_prompt_bytes", "must be at least 1024".into());
        }
        if self.request_timeout < Duration::from_millis(100) {
            return invalid("ai.request_timeout", "must be at least 100ms".into());
        }
        for (name, provider) in &providers {
            if !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') || name.is_empty() {
                return invalid(
                    "ai.providers",
                    format!("`{name}`: a provider name is letters, digits, '-' and '_'"),
                );
            }
            if provider.models.is_empty() {
                return invalid("ai.providers", format!("{name}: has no models"));
            }
            if !provider.models.contains_key(&provider.default_model) {
                return invalid(
                    "ai.providers",
                    format!("{name}: default_model `{}` is not one of its models", provider.default_model),
                );
            }
            if let Some(url) = &provider.base_url
                && url::Url::parse(url).map(|u| !matches!(u.scheme(), "http" | "https")).unwrap_or(true)
            {
                return invalid("ai.providers", format!("{name}: base_url must be an http(s) URL"));
            }
            for (model, m) in &provider.models {
                let price = |p: f64| p.is_finite() && p >= 0.0;
                if m.context_window == 0 || !price(m.input_per_1k) || !price(m.output_per_1k) {
                    return invalid(
                        "ai.providers",
                        format!(
                            "{name}/{model}: context_window must be at least 1 and prices finite and not negative"
                        ),
                    );
                }
            }
        }
        let known = |target: &str| {
            target
                .split_once('/')
                .is_some_and(|(p, m)| providers.get(p).is_some_and(|p| p.models.contains_key(m)))
        };
        for (from, to) in &self.fallbacks {
            if let Some(bad) = std::iter::once(from).chain(to).find(|t| !known(t)) {
                return invalid("ai.fallbacks", format!("`{bad}` is not a configured provider/model"));
            }
        }
        let l = &self.limits;
        if l.requests_per_minute == 0 || l.tokens_per_day == 0 {
            return invalid("ai.limits", "requests_per_minute and tokens_per_day must be at least 1".into());
        }
        for budget in [
            l.user_spend_per_day_usd,
            l.user_spend_per_month_usd,
            l.design_spend_per_day_usd,
            l.design_spend_per_month_usd,
        ]
        .into_iter()
        .flatten()
        {
            if !budget.is_finite() || budget < 0.0 {
                return invalid("ai.limits", "spend budgets must be finite and not negative".into());
            }
        }
        Ok(())
    }
}
