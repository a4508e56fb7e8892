//! The design service, asked (with the caller's own token) whether a user may see a design
//! they attribute a request to, so nobody can spend another design's budget. Answers are
//! remembered for a minute.

use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant},
};

use csp_platform::{Service, Settings, client::TracedChannel, config::ConfigError};
use csp_proto::design::v1::{self as pb, design_service_client::DesignServiceClient};
use tonic::{Code, Request, metadata::AsciiMetadataValue};

use crate::error::Error;

/// How long an answer is trusted.
const TTL: Duration = Duration::from_secs(60);

/// The caller's `authorization` metadata.
pub(crate) type Credentials = Option<AsciiMetadataValue>;

/// The design service.
pub(crate) struct Designs {
    client: DesignServiceClient<TracedChannel>,
    seen: Mutex<HashMap<(String, String), Instant>>,
}

impl Designs {
    pub(crate) fn new(settings: &Settings) -> Result<Self, ConfigError> {
        let client = DesignServiceClient::new(csp_platform::client::channel(settings, Service::Design)?);
        Ok(Self { client, seen: Mutex::new(HashMap::new()) })
    }

    /// Whether the caller may see the design; NOT_FOUND when not.
    pub(crate) async fn check(
        &self,
        user_id: &str,
        credentials: &Credentials,
        id: &str,
    ) -> Result<(), Error> {
        let key = (user_id.to_owned(), id.to_owned());
        {
            let seen = self.seen.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if seen.get(&key).is_some_and(|at| at.elapsed() < TTL) {
                return Ok(());
            }
        }
        let mut request = Request::new(pb::GetDesignRequest {
            design_id: id.to_owned(),
            view: pb::DesignView::Basic as i32,
        });
        request.set_timeout(Duration::from_secs(10));
        if let Some(value) = credentials {
            request.metadata_mut().insert("authorization", value.clone());
        }
        match self.client.clone().get_design(request).await {
            Ok(_) => {
                let mut seen = self.seen.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                if seen.len() > 10_000 {
                    seen.retain(|_, at| at.elapsed() < TTL);
                }
                seen.insert(key, Instant::now());
                Ok(())
            }
            Err(status) => Err(match status.code() {
                Code::NotFound | Code::PermissionDenied => {
                    Error::NotFound(format!("no design `{}`", id.chars().take(64).collect::<String>()))
                }
                Code::InvalidArgument => Error::field("design_id", "is not a design id (a UUID)"),
                _ => Error::Unavailable(format!("the design service did not answer: {}", status.message())),
            }),
        }
    }
}
