//! The configured providers and their models: which names a request may use, what a model
//! costs, how large its context is, and what to fall back to.

use std::{collections::BTreeMap, sync::Arc};

use csp_platform::config::{AiSettings, ModelSettings, ProviderSettings};

use crate::{
    error::Error,
    model::{Route, Tokens},
    providers::{self, Provider},
};

struct Entry {
    settings: ProviderSettings,
    provider: Arc<dyn Provider>,
}

/// A model as ListModels shows it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ModelInfo {
    pub(crate) route: Route,
    pub(crate) settings: ModelSettings,
    pub(crate) available: bool,
}

/// Providers and models, from the settings.
pub(crate) struct Catalog {
    providers: BTreeMap<String, Entry>,
    default_provider: String,
    fallbacks: BTreeMap<Route, Vec<Route>>,
}

fn route(text: &str) -> Option<Route> {
    let (provider, model) = text.split_once('/')?;
    Some(Route { provider: provider.to_owned(), model: model.to_owned() })
}

impl Catalog {
    pub(crate) fn new(settings: &AiSettings) -> Result<Self, String> {
        let mut built = providers::build(settings)?;
        let providers = settings
            .effective_providers()
            .into_iter()
            .filter_map(|(name, settings)| {
                let provider = built.remove(&name)?;
                Some((name, Entry { settings, provider }))
            })
            .collect();
        let fallbacks = settings
            .fallbacks
            .iter()
            .filter_map(|(from, to)| Some((route(from)?, to.iter().filter_map(|t| route(t)).collect())))
            .collect();
        Ok(Self { providers, default_provider: settings.default_provider.clone(), fallbacks })
    }

    /// The provider and model a request names (empty: the defaults); INVALID_ARGUMENT naming
    /// `provider` or `model` when there is no such one.
    pub(crate) fn resolve(&self, provider: &str, model: &str) -> Result<Route, Error> {
        let provider = if provider.is_empty() { self.default_provider.as_str() } else { provider };
        let Some(entry) = self.providers.get(provider) else {
            let known: Vec<&str> = self.providers.keys().map(String::as_str).collect();
            return Err(Error::field(
                "provider",
                format!("is not a configured provider (these are: {})", known.join(", ")),
            ));
        };
        let model = if model.is_empty() { entry.settings.default_model.as_str() } else { model };
        if !entry.settings.models.contains_key(model) {
            let known: Vec<&str> = entry.settings.models.keys().map(String::as_str).collect();
            return Err(Error::field(
                "model",
                format!("is not a model of `{provider}` (its models are: {})", known.join(", ")),
            ));
        }
        Ok(Route { provider: provider.to_owned(), model: model.to_owned() })
    }

    pub(crate) fn provider(&self, name: &str) -> Option<Arc<dyn Provider>> {
        self.providers.get(name).map(|e| e.provider.clone())
    }

    /// A resolved model's settings.
    pub(crate) fn model(&self, route: &Route) -> ModelSettings {
        self.providers
            .get(&route.provider)
            .and_then(|e| e.settings.models.get(&route.model))
            .copied()
            .unwrap_or(ModelSettings {
                context_window: u32::MAX,
                input_per_1k: 0.0,
                output_per_1k: 0.0,
                tools: true,
            })
    }

    /// The route, then its fallbacks.
    pub(crate) fn chain(&self, route: &Route) -> Vec<Route> {
        let mut chain = vec![route.clone()];
        chain.extend(self.fallbacks.get(route).cloned().unwrap_or_default());
        chain
    }

    /// What tokens cost on a model, in US dollars.
    pub(crate) fn cost(&self, route: &Route, tokens: Tokens) -> f64 {
        let model = self.model(route);
        (tokens.prompt as f64 * model.input_per_1k + tokens.completion as f64 * model.output_per_1k) / 1000.0
    }

    /// The models of one provider (or all), by provider then name.
    pub(crate) fn models(&self, provider: &str) -> Vec<ModelInfo> {
        self.providers
            .iter()
            .filter(|(name, _)| provider.is_empty() || name.as_str() == provider)
            .flat_map(|(name, entry)| {
                entry.settings.models.iter().map(move |(model, settings)| ModelInfo {
                    route: Route { provider: name.clone(), model: model.clone() },
                    settings: *settings,
                    available: entry.provider.available(),
                })
            })
            .collect()
    }

    pub(crate) fn default_provider(&self) -> &str {
        &self.default_provider
    }

    pub(crate) fn knows_provider(&self, name: &str) -> bool {
        self.providers.contains_key(name)
    }
}
