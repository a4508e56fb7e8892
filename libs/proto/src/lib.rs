//! Generated gRPC code for every `csp.*` protobuf package.
//!
//! One module per package, named after it (`csp_proto::auth::v1`, `csp_proto::design::v1`,
//! ...), each with its messages, a tonic client and a tonic server. [`FILE_DESCRIPTOR_SET`]
//! holds every file, for server reflection and for code that needs the schema at run time.
//!
//! The service names below are the routing keys of the gateway.

#![allow(unreachable_pub, clippy::all, clippy::pedantic, missing_docs)]

pub mod json;

/// `csp.auth.v1`: users, tokens, roles.
pub mod auth {
    /// Version 1.
    pub mod v1 {
        tonic::include_proto!("csp.auth.v1");
    }
}

/// `csp.design.v1`: designs, nodes, connections, revisions.
pub mod design {
    /// Version 1.
    pub mod v1 {
        tonic::include_proto!("csp.design.v1");
    }
}

/// `csp.registry.v1`: the component type catalogue.
pub mod registry {
    /// Version 1.
    pub mod v1 {
        tonic::include_proto!("csp.registry.v1");
    }
}

/// `csp.executor.v1`: the CSP runtime.
pub mod executor {
    /// Version 1.
    pub mod v1 {
        tonic::include_proto!("csp.executor.v1");
    }
}

/// `csp.collab.v1`: presence and live edits.
pub mod collab {
    /// Version 1.
    pub mod v1 {
        tonic::include_proto!("csp.collab.v1");
    }
}

/// `csp.ai.v1`: AI providers, conversations, usage.
pub mod ai {
    /// Version 1.
    pub mod v1 {
        tonic::include_proto!("csp.ai.v1");
    }
}

/// `csp.component.v1`: the runtime contract of remote components.
pub mod component {
    /// Version 1.
    pub mod v1 {
        tonic::include_proto!("csp.component.v1");
    }
}

/// Encoded `FileDescriptorSet` of every `.proto` under `proto/` (with their imports).
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("csp_descriptor");

/// Encoded `FileDescriptorSet` of `google/rpc/error_details.proto` (`BadRequest`, `ErrorInfo`,
/// `RetryInfo`, ...), the details error statuses carry; served by reflection so that clients
/// can decode them.
pub const ERROR_DETAILS_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("google_rpc_descriptor");

/// The fully-qualified names of the six API services, in a stable order.
pub const SERVICE_NAMES: [&str; 6] = [
    "csp.auth.v1.AuthService",
    "csp.design.v1.DesignService",
    "csp.registry.v1.RegistryService",
    "csp.executor.v1.ExecutorService",
    "csp.collab.v1.CollaborationService",
    "csp.ai.v1.AiService",
];

#[cfg(test)]
mod tests {
    use prost::Message as _;

    use super::*;

    #[test]
    fn descriptor_set_declares_every_service_name() {
        let fds =
            prost_types::FileDescriptorSet::decode(FILE_DESCRIPTOR_SET).expect("descriptor set decodes");
        let declared: Vec<String> = fds
            .file
            .iter()
            .flat_map(|f| {
                let pkg = f.package().to_owned();
                f.service.iter().map(move |s| format!("{pkg}.{}", s.name()))
            })
            .collect();
        for name in SERVICE_NAMES {
            assert!(declared.iter().any(|d| d == name), "{name} missing from {declared:?}");
        }
        assert!(declared.iter().any(|d| d == "csp.component.v1.ComponentRuntime"));
    }

    #[test]
    fn generated_names_match_the_routing_keys() {
        use tonic::server::NamedService;
        assert_eq!(
            <auth::v1::auth_service_server::AuthServiceServer<()> as NamedService>::NAME,
            SERVICE_NAMES[0]
        );
    }
}

/// Methods of a generated server trait that answer UNIMPLEMENTED, for a server that does not
/// serve them (yet) or a test stand-in that serves part of a service. Server traits have no
/// default methods, so every RPC a server does not serve is named where it is implemented:
///
/// ```ignore
/// #[tonic::async_trait]
/// impl AuthService for Keys {
///     async fn get_public_keys(/* ... */) { /* ... */ }
///     csp_proto::unimplemented_rpcs! {
///         login(LoginRequest) -> LoginResponse;
///         logout(LogoutRequest) -> LogoutResponse;
///     }
/// }
/// ```
#[macro_export]
macro_rules! unimplemented_rpcs {
    ($($name:ident($request:ty) -> $response:ty;)*) => {
        $(
            fn $name<'life0: 'async_trait, 'async_trait>(
                &'life0 self,
                _request: ::tonic::Request<$request>,
            ) -> ::std::pin::Pin<
                ::std::boxed::Box<
                    dyn ::std::future::Future<
                            Output = ::std::result::Result<::tonic::Response<$response>, ::tonic::Status>,
                        > + ::std::marker::Send
                        + 'async_trait,
                >,
            > {
                ::std::boxed::Box::pin(async {
                    ::std::result::Result::Err(::tonic::Status::unimplemented(concat!(
                        stringify!($name),
                        " is not served here"
                    )))
                })
            }
        )*
    };
}
