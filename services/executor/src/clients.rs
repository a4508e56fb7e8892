//! The services the executor calls: design (what to run, and who may), registry (where custom
//! components run), AI (for `ai.*` nodes). Every call forwards the caller's credentials.

use std::{sync::Arc, time::Duration};

use secrecy::{ExposeSecret as _, SecretString};

use csp_platform::{Service, Settings, client::TracedChannel, config::ConfigError};
use csp_proto::{
    ai::v1::{self as ai, ai_service_client::AiServiceClient},
    auth::v1::{self as auth, auth_service_client::AuthServiceClient},
    design::v1::{self as design, design_service_client::DesignServiceClient},
    registry::v1::{self as registry, registry_service_client::RegistryServiceClient},
};
use tonic::{Code, Request, Status, metadata::AsciiMetadataValue};

use crate::{error::Error, runtime};

/// The caller's `authorization` metadata.
pub(crate) type Credentials = Option<AsciiMetadataValue>;

fn request<T>(message: T, credentials: &Credentials, timeout: Duration) -> Request<T> {
    let mut request = Request::new(message);
    request.set_timeout(timeout);
    if let Some(value) = credentials {
        request.metadata_mut().insert("authorization", value.clone());
    }
    request
}

/// A design service answer as the executor's error.
fn design_error(status: Status, id: &str) -> Error {
    match status.code() {
        Code::NotFound => Error::NotFound(format!("no design `{id}`")),
        Code::InvalidArgument => Error::field("design_id", status.message().to_owned()),
        Code::PermissionDenied => Error::Forbidden(status.message().to_owned()),
        Code::Unauthenticated => Error::Forbidden(status.message().to_owned()),
        _ => Error::Unavailable(format!("the design service did not answer: {}", status.message())),
    }
}

/// What a user may do with a design, as the design service says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Access {
    Viewer,
    Editor,
}

/// How long an access check is trusted.
const ACCESS_TTL: Duration = Duration::from_secs(10);

/// The design service.
pub(crate) struct Designs {
    client: DesignServiceClient<TracedChannel>,
    /// Access checks, trusted for [`ACCESS_TTL`].
    access: moka::sync::Cache<(String, String), Access>,
}

impl Designs {
    pub(crate) fn new(settings: &Settings) -> Result<Self, ConfigError> {
        let client = DesignServiceClient::new(csp_platform::client::channel(settings, Service::Design)?)
            .max_decoding_message_size(settings.server.max_message_bytes);
        let access = moka::sync::Cache::builder().max_capacity(10_000).time_to_live(ACCESS_TTL).build();
        Ok(Self { client, access })
    }

    /// A design at a revision (0: the current one), as the caller may see it.
    pub(crate) async fn design(
        &self,
        credentials: &Credentials,
        id: &str,
        revision: i64,
    ) -> Result<design::Design, Error> {
        self.fetch(credentials, id, revision, design::DesignView::Full).await
    }

    /// The errors ValidateDesign reports for a design revision, each as `node: message` (or
    /// the message alone); empty when it may run.
    pub(crate) async fn errors(
        &self,
        credentials: &Credentials,
        id: &str,
        revision: i64,
    ) -> Result<Vec<String>, Error> {
        let message = design::ValidateDesignRequest { design_id: id.to_owned(), revision };
        let response = self
            .client
            .clone()
            .validate_design(request(message, credentials, Duration::from_secs(10)))
            .await
            .map_err(|status| design_error(status, id))?
            .into_inner();
        Ok(response
            .findings
            .into_iter()
            .filter(|f| f.severity == design::Severity::Error as i32)
            .map(|f| if f.node_id.is_empty() { f.message } else { format!("{}: {}", f.node_id, f.message) })
            .collect())
    }

    /// A design's current revision and the caller's access, without its nodes and connections.
    pub(crate) async fn current(&self, credentials: &Credentials, id: &str) -> Result<design::Design, Error> {
        self.fetch(credentials, id, 0, design::DesignView::Basic).await
    }

    async fn fetch(
        &self,
        credentials: &Credentials,
        id: &str,
        revision: i64,
        view: design::DesignView,
    ) -> Result<design::Design, Error> {
        let timeout = Duration::from_secs(10);
        let found = if revision == 0 {
            let message = design::GetDesignRequest { design_id: id.to_owned(), view: view as i32 };
            self.client
                .clone()
                .get_design(request(message, credentials, timeout))
                .await
                .map(|r| r.into_inner().design)
        } else {
            let message = design::GetRevisionRequest { design_id: id.to_owned(), revision };
            self.client
                .clone()
                .get_revision(request(message, credentials, timeout))
                .await
                .map(|r| r.into_inner().design)
        };
        match found {
            Ok(Some(design)) => {
                self.remember(credentials, id, &design);
                Ok(design)
            }
            Ok(None) => Err(Error::Internal("the design service sent no design".into())),
            Err(status) if status.code() == Code::InvalidArgument && revision != 0 => {
                Err(Error::field("design_revision", status.message().to_owned()))
            }
            Err(status) => Err(design_error(status, id)),
        }
    }

    fn key(credentials: &Credentials, id: &str) -> (String, String) {
        (credentials.as_ref().and_then(|c| c.to_str().ok()).unwrap_or_default().to_owned(), id.to_owned())
    }

    fn remember(&self, credentials: &Credentials, id: &str, design: &design::Design) {
        let access =
            if design.access >= design::Access::Editor as i32 { Access::Editor } else { Access::Viewer };
        self.access.insert(Self::key(credentials, id), access);
    }

    /// The caller's access to a design as last seen, if that was recent.
    pub(crate) fn known_access(&self, credentials: &Credentials, id: &str) -> Option<Access> {
        self.access.get(&Self::key(credentials, id))
    }

    /// The caller's access to a design; NOT_FOUND when they have none.
    pub(crate) async fn access(&self, credentials: &Credentials, id: &str) -> Result<Access, Error> {
        if let Some(access) = self.known_access(credentials, id) {
            return Ok(access);
        }
        let design = self.current(credentials, id).await?;
        Ok(if design.access >= design::Access::Editor as i32 { Access::Editor } else { Access::Viewer })
    }
}

/// The registry, for custom component types.
pub(crate) struct Registry {
    client: RegistryServiceClient<TracedChannel>,
}

impl Registry {
    pub(crate) fn new(settings: &Settings) -> Result<Self, ConfigError> {
        let client = RegistryServiceClient::new(csp_platform::client::channel(settings, Service::Registry)?);
        Ok(Self { client })
    }

    /// A custom type's endpoint and ports.
    pub(crate) async fn endpoint(
        &self,
        credentials: &Credentials,
        type_id: &str,
        version: &str,
        node_id: &str,
    ) -> Result<runtime::RemoteEndpoint, Error> {
        let message =
            registry::GetComponentTypeRequest { r#type: type_id.to_owned(), version: version.to_owned() };
        let found = self
            .client
            .clone()
            .get_component_type(request(message, credentials, Duration::from_secs(10)))
            .await;
        let spec = match found {
            Ok(response) => response.into_inner().component_type.unwrap_or_default(),
            Err(status) if matches!(status.code(), Code::NotFound | Code::InvalidArgument) => {
                return Err(Error::precondition(
                    "DESIGN_INVALID",
                    format!("the design cannot run: node `{node_id}`: {}", status.message()),
                ));
            }
            Err(status) => {
                return Err(Error::Unavailable(format!(
                    "the component registry did not answer: {}",
                    status.message()
                )));
            }
        };
        let Some(remote) = spec.remote else {
            return Err(Error::precondition(
                "DESIGN_INVALID",
                format!("the design cannot run: node `{node_id}`: `{type_id}` has no endpoint to run it"),
            ));
        };
        Ok(runtime::RemoteEndpoint {
            address: remote.address,
            timeout_ms: if remote.timeout_ms > 0 { remote.timeout_ms as u64 } else { 30_000 },
            inputs: spec.inputs.into_iter().map(|p| p.name).collect(),
            outputs: spec.outputs.into_iter().map(|p| p.name).collect(),
        })
    }
}

/// The executor's own identity towards the AI service: an access token obtained with its
/// service account's API key (`executor.ai_api_key`), signed in again before it expires.
pub(crate) struct ServiceLogin {
    auth: AuthServiceClient<TracedChannel>,
    api_key: SecretString,
    token: tokio::sync::Mutex<Option<(AsciiMetadataValue, i64)>>,
}

impl ServiceLogin {
    /// The login, when an API key is configured.
    pub(crate) fn new(settings: &Settings) -> Result<Option<Self>, ConfigError> {
        let Some(api_key) = settings.executor.ai_api_key.clone() else { return Ok(None) };
        let auth = AuthServiceClient::new(csp_platform::client::channel(settings, Service::Auth)?);
        Ok(Some(Self { auth, api_key, token: tokio::sync::Mutex::new(None) }))
    }

    /// A valid `authorization` value for the service account.
    async fn credentials(&self) -> Result<AsciiMetadataValue, runtime::AiError> {
        let mut token = self.token.lock().await;
        if let Some((value, expires)) = token.as_ref()
            && *expires - csp_platform::auth::now_seconds() > 60
        {
            return Ok(value.clone());
        }
        let mut request = Request::new(auth::LoginRequest {
            login: String::new(),
            password: String::new(),
            api_key: self.api_key.expose_secret().to_owned(),
        });
        request.set_timeout(Duration::from_secs(10));
        let failed = |why: String| (why, true);
        let tokens = self
            .auth
            .clone()
            .login(request)
            .await
            .map_err(|s| {
                failed(format!("the executor cannot sign in to call the AI service: {}", s.message()))
            })?
            .into_inner()
            .tokens
            .unwrap_or_default();
        let value: AsciiMetadataValue = format!("Bearer {}", tokens.access_token)
            .parse()
            .map_err(|_| failed("the auth service sent an unusable token".into()))?;
        let expires = tokens.access_token_expires_at.map_or(0, |t| t.seconds);
        *token = Some((value.clone(), expires));
        Ok(value)
    }
}

/// The AI service, called for one execution: as the executor's service account on behalf of
/// whoever started it (when an API key is configured), else with the starter's credentials.
pub(crate) struct Ai {
    client: AiServiceClient<TracedChannel>,
    credentials: Credentials,
    login: Option<Arc<ServiceLogin>>,
    started_by: String,
    design_id: String,
    execution_id: String,
}

impl Ai {
    pub(crate) fn new(
        settings: &Settings,
        login: Option<Arc<ServiceLogin>>,
        credentials: Credentials,
        row: &crate::entity::execution::Model,
    ) -> Result<Self, ConfigError> {
        let client = AiServiceClient::new(csp_platform::client::channel(settings, Service::Ai)?);
        Ok(Self {
            client,
            credentials,
            login,
            started_by: row.started_by.clone(),
            design_id: row.design_id.clone(),
            execution_id: row.id.clone(),
        })
    }

    fn failed(status: Status) -> runtime::AiError {
        let retryable =
            matches!(status.code(), Code::Unavailable | Code::ResourceExhausted | Code::DeadlineExceeded);
        let why = match status.code() {
            Code::Unimplemented => format!("the AI service is not available: {}", status.message()),
            Code::Unauthenticated => "the AI service refused the credentials of whoever started the execution (they may have expired; configure executor.ai_api_key)".into(),
            _ => format!("the AI service failed: {}", status.message()),
        };
        (why, retryable)
    }

    /// The request with its attribution, and the credentials to send it with.
    async fn prepare<T>(&self, message: T) -> Result<Request<T>, runtime::AiError> {
        let credentials = match &self.login {
            Some(login) => Some(login.credentials().await?),
            None => self.credentials.clone(),
        };
        Ok(request(message, &credentials, Duration::from_secs(300)))
    }

    /// Who the request is for: the starter, when the executor calls as itself.
    fn on_behalf_of(&self) -> String {
        if self.login.is_some() { self.started_by.clone() } else { String::new() }
    }
}

#[tonic::async_trait]
impl runtime::Ai for Ai {
    async fn chat(&self, mut message: ai::ChatRequest) -> Result<ai::ChatResponse, runtime::AiError> {
        message.design_id.clone_from(&self.design_id);
        message.execution_id.clone_from(&self.execution_id);
        message.on_behalf_of = self.on_behalf_of();
        let call = self.prepare(message).await?;
        self.client.clone().chat(call).await.map(tonic::Response::into_inner).map_err(Self::failed)
    }

    async fn analyze(
        &self,
        mut message: ai::AnalyzeRequest,
    ) -> Result<ai::AnalyzeResponse, runtime::AiError> {
        message.design_id.clone_from(&self.design_id);
        message.execution_id.clone_from(&self.execution_id);
        message.on_behalf_of = self.on_behalf_of();
        let call = self.prepare(message).await?;
        self.client.clone().analyze(call).await.map(tonic::Response::into_inner).map_err(Self::failed)
    }

    async fn generate_code(
        &self,
        mut message: ai::GenerateCodeRequest,
    ) -> Result<ai::GenerateCodeResponse, runtime::AiError> {
        message.design_id.clone_from(&self.design_id);
        message.execution_id.clone_from(&self.execution_id);
        message.on_behalf_of = self.on_behalf_of();
        let call = self.prepare(message).await?;
        self.client.clone().generate_code(call).await.map(tonic::Response::into_inner).map_err(Self::failed)
    }
}
