//! The design service, asked with the caller's own token whether they may see a design.

use std::time::Duration;

use csp_platform::{Service, Settings, client::TracedChannel, config::ConfigError};
use csp_proto::design::v1::{self as pb, design_service_client::DesignServiceClient};
use tonic::{Code, Request, metadata::AsciiMetadataValue};

use crate::{error::Error, model::Access};

/// The caller's `authorization` metadata.
pub(crate) type Credentials = Option<AsciiMetadataValue>;

/// The design service.
pub(crate) struct Designs {
    client: DesignServiceClient<TracedChannel>,
}

impl Designs {
    pub(crate) fn new(settings: &Settings) -> Result<Self, ConfigError> {
        let client = DesignServiceClient::new(csp_platform::client::channel(settings, Service::Design)?);
        Ok(Self { client })
    }

    /// The caller's access to a design and its current revision. A design the caller may not
    /// see is NOT_FOUND, as the design service says.
    pub(crate) async fn access(&self, credentials: &Credentials, id: &str) -> Result<(Access, i64), Error> {
        let mut request = Request::new(pb::GetDesignRequest {
            design_id: id.to_owned(),
            view: pb::DesignView::Basic as i32,
        });
        request.set_timeout(Duration::from_secs(10));
        if let Some(value) = credentials {
            request.metadata_mut().insert("authorization", value.clone());
        }
        match self.client.clone().get_design(request).await {
            Ok(response) => {
                let design = response.into_inner().design.unwrap_or_default();
                let access = match pb::Access::try_from(design.access).unwrap_or_default() {
                    pb::Access::Owner => Access::Owner,
                    pb::Access::Editor => Access::Editor,
                    pb::Access::Viewer => Access::Viewer,
                    pb::Access::Unspecified => return Err(Error::NotFound(format!("no design `{id}`"))),
                };
                Ok((access, design.revision))
            }
            Err(status) => Err(match status.code() {
                Code::NotFound => Error::NotFound(format!("no design `{id}`")),
                Code::InvalidArgument => Error::field("design_id", "is not a design id (a UUID)"),
                Code::PermissionDenied | Code::Unauthenticated => {
                    Error::Forbidden(status.message().to_owned())
                }
                _ => Error::Unavailable(format!("the design service did not answer: {}", status.message())),
            }),
        }
    }
}
