//! Who the users a request names are, asked of the auth service (`LookupUsers`) with the
//! caller's token: a design is never handed to an account that does not exist.

use csp_platform::{Service, Settings, client::TracedChannel, config::ConfigError};
use csp_proto::auth::v1::{LookupUsersRequest, auth_service_client::AuthServiceClient};
use tonic::Request;

use crate::{error::Error, validate::Credentials};

pub(crate) struct Users {
    client: AuthServiceClient<TracedChannel>,
}

impl Users {
    pub(crate) fn new(settings: &Settings) -> Result<Self, ConfigError> {
        Ok(Self { client: AuthServiceClient::new(csp_platform::client::channel(settings, Service::Auth)?) })
    }

    /// Whether `id` names an active account.
    pub(crate) async fn exists(&self, credentials: &Credentials, id: &str) -> Result<bool, Error> {
        let mut request = Request::new(LookupUsersRequest { user_ids: vec![id.to_owned()] });
        request.set_timeout(std::time::Duration::from_secs(10));
        if let Some(value) = credentials {
            request.metadata_mut().insert("authorization", value.clone());
        }
        match self.client.clone().lookup_users(request).await {
            Ok(response) => Ok(response.into_inner().users.iter().any(|u| u.id == id)),
            Err(status) => Err(Error::Unavailable(format!(
                "the auth service cannot say who {id} is: {}",
                status.message()
            ))),
        }
    }
}
