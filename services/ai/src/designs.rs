//! The design service, asked (with the caller's own token) whether a user may see a design
//! they attribute a request to, so nobody can spend another design's budget. Answers are
//! remembered for a minute.

use std::time::Duration;

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
    /// (user, design) pairs allowed lately.
    seen: moka::sync::Cache<(String, String), ()>,
}

impl Designs {
    pub(crate) fn new(settings: &Settings) -> Result<Self, ConfigError> {
        let client = DesignServiceClient::new(csp_platform::client::channel(settings, Service::Design)?);
        let seen = moka::sync::Cache::builder().max_capacity(10_000).time_to_live(TTL).build();
        Ok(Self { client, seen })
    }

    /// Whether the caller may see the design; NOT_FOUND when not.
    pub(crate) async fn check(
        &self,
        user_id: &str,
        credentials: &Credentials,
        id: &str,
    ) -> Result<(), Error> {
        let key = (user_id.to_owned(), id.to_owned());
        if self.seen.contains_key(&key) {
            return Ok(());
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
                self.seen.insert(key, ());
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
