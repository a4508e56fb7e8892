//! The gRPC adapter of `csp.registry.v1.RegistryService`.

use std::sync::Arc;

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use chrono::{DateTime, Utc};
use csp_components::{Category, ExampleSpec, PortSpec, ReadMode, WriteMode, compat::Verdict};
use csp_platform::auth::{Permission, require};
use csp_proto::{
    json,
    registry::v1::{self as pb, registry_service_server::RegistryService},
};
use tonic::{Request, Response, Status};

use crate::{
    catalog::{Availability, Entry},
    domain::{Draft, PortRef, Registry},
    error::Error,
};

/// The service's gRPC face.
pub(crate) struct RegistryApi {
    registry: Arc<Registry>,
}

impl RegistryApi {
    pub(crate) fn new(registry: Arc<Registry>) -> Self {
        Self { registry }
    }
}

fn timestamp(time: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp { seconds: time.timestamp(), nanos: time.timestamp_subsec_nanos() as i32 }
}

fn category_to_pb(category: Category) -> pb::Category {
    match category {
        Category::Source => pb::Category::Source,
        Category::Sink => pb::Category::Sink,
        Category::Transform => pb::Category::Transform,
        Category::Validate => pb::Category::Validate,
        Category::Metrics => pb::Category::Metrics,
        Category::Ai => pb::Category::Ai,
        Category::Remote => pb::Category::Remote,
        Category::Control => pb::Category::Control,
    }
}

fn category_from_pb(raw: i32) -> Result<Option<Category>, ()> {
    Ok(match pb::Category::try_from(raw).map_err(|_| ())? {
        pb::Category::Unspecified => None,
        pb::Category::Source => Some(Category::Source),
        pb::Category::Sink => Some(Category::Sink),
        pb::Category::Transform => Some(Category::Transform),
        pb::Category::Validate => Some(Category::Validate),
        pb::Category::Metrics => Some(Category::Metrics),
        pb::Category::Ai => Some(Category::Ai),
        pb::Category::Remote => Some(Category::Remote),
        pb::Category::Control => Some(Category::Control),
    })
}

fn read_to_pb(mode: ReadMode) -> pb::ReadMode {
    match mode {
        ReadMode::None => pb::ReadMode::None,
        ReadMode::One => pb::ReadMode::One,
        ReadMode::All => pb::ReadMode::All,
        ReadMode::Any => pb::ReadMode::Any,
    }
}

fn write_to_pb(mode: WriteMode) -> pb::WriteMode {
    match mode {
        WriteMode::None => pb::WriteMode::None,
        WriteMode::One => pb::WriteMode::One,
        WriteMode::AtMostOne => pb::WriteMode::AtMostOne,
        WriteMode::Many => pb::WriteMode::Many,
    }
}

fn port_to_pb(port: &PortSpec) -> pb::Port {
    pb::Port {
        name: port.name.clone(),
        description: port.description.clone(),
        schema: Some(json::to_struct(port.schema.clone())),
        required: port.required,
        multiple: port.multiple,
    }
}

fn entry_to_pb(entry: &Entry) -> pb::ComponentType {
    let spec = &entry.spec;
    pb::ComponentType {
        r#type: spec.type_id.clone(),
        version: spec.version.clone(),
        category: category_to_pb(spec.category) as i32,
        display_name: spec.display_name.clone(),
        description: spec.description.clone(),
        icon: spec.icon.clone(),
        inputs: spec.inputs.iter().map(port_to_pb).collect(),
        outputs: spec.outputs.iter().map(port_to_pb).collect(),
        config_schema: Some(json::to_struct(spec.config_schema.clone())),
        examples: spec
            .examples
            .iter()
            .map(|e| pb::Example {
                title: e.title.clone(),
                description: e.description.clone(),
                config: Some(json::to_struct(e.config.clone())),
                input: e.input.clone().map(json::to_value),
                output: e.output.clone().map(json::to_value),
            })
            .collect(),
        behaviour: spec.behaviour.map(|behaviour| pb::PortBehaviour {
            read: read_to_pb(behaviour.read) as i32,
            write: write_to_pb(behaviour.write) as i32,
            buffers: behaviour.buffers,
        }),
        builtin: entry.builtin,
        deprecated: entry.deprecated,
        deprecation_message: entry.deprecation_message.clone(),
        remote: entry.remote.as_ref().map(|r| pb::RemoteEndpoint {
            address: r.address.clone(),
            timeout_ms: r.timeout_ms,
            availability: match r.availability {
                Availability::Available => pb::Availability::Available,
                Availability::Unavailable => pb::Availability::Unavailable,
                Availability::Unknown => pb::Availability::Unspecified,
            } as i32,
            last_checked_at: r.last_checked_at.map(timestamp),
            last_error: r.last_error.clone(),
        }),
        tags: spec.tags.clone(),
        created_at: Some(timestamp(entry.created_at)),
        dynamic_ports: spec.dynamic_ports,
    }
}

fn port_from_pb(port: pb::Port) -> PortSpec {
    PortSpec {
        name: port.name,
        description: port.description,
        schema: port.schema.map(json::from_struct).unwrap_or_else(|| serde_json::json!({})),
        required: port.required,
        multiple: port.multiple,
    }
}

fn draft_from_pb(component_type: Option<pb::ComponentType>) -> Result<Draft, Status> {
    let t = component_type.ok_or_else(|| Status::from(Error::field("component_type", "is required")))?;
    let category = category_from_pb(t.category)
        .map_err(|()| Status::from(Error::field("component_type.category", "is not a category")))?;
    let behaviour = t.behaviour.unwrap_or_default();
    let read = match pb::ReadMode::try_from(behaviour.read).unwrap_or(pb::ReadMode::Unspecified) {
        pb::ReadMode::Unspecified => None,
        pb::ReadMode::None => Some(ReadMode::None),
        pb::ReadMode::One => Some(ReadMode::One),
        pb::ReadMode::All => Some(ReadMode::All),
        pb::ReadMode::Any => Some(ReadMode::Any),
    };
    let write = match pb::WriteMode::try_from(behaviour.write).unwrap_or(pb::WriteMode::Unspecified) {
        pb::WriteMode::Unspecified => None,
        pb::WriteMode::None => Some(WriteMode::None),
        pb::WriteMode::One => Some(WriteMode::One),
        pb::WriteMode::AtMostOne => Some(WriteMode::AtMostOne),
        pb::WriteMode::Many => Some(WriteMode::Many),
    };
    let remote = t.remote.unwrap_or_default();
    Ok(Draft {
        type_id: t.r#type,
        version: t.version,
        category,
        display_name: t.display_name,
        description: t.description,
        icon: t.icon,
        inputs: t.inputs.into_iter().map(port_from_pb).collect(),
        outputs: t.outputs.into_iter().map(port_from_pb).collect(),
        config_schema: t.config_schema.map(json::from_struct).unwrap_or_else(|| serde_json::json!({})),
        examples: t
            .examples
            .into_iter()
            .map(|e| ExampleSpec {
                title: e.title,
                description: e.description,
                config: e.config.map(json::from_struct).unwrap_or_else(|| serde_json::json!({})),
                input: e.input.map(json::from_value),
                output: e.output.map(json::from_value),
            })
            .collect(),
        read,
        write,
        buffers: behaviour.buffers,
        tags: t.tags,
        remote_address: remote.address,
        remote_timeout_ms: remote.timeout_ms,
    })
}

fn port_ref(port: Option<pb::PortRef>) -> PortRef {
    let port = port.unwrap_or_default();
    PortRef { type_id: port.r#type, version: port.version, port: port.port }
}

#[tonic::async_trait]
impl RegistryService for RegistryApi {
    #[tracing::instrument(skip_all)]
    async fn list_component_types(
        &self,
        request: Request<pb::ListComponentTypesRequest>,
    ) -> Result<Response<pb::ListComponentTypesResponse>, Status> {
        require(&request, Permission::ComponentsRead)?;
        let r = request.into_inner();
        let category = category_from_pb(r.category)
            .map_err(|()| Status::from(Error::field("category", "is not a category")))?;
        let after = if r.page_token.is_empty() {
            None
        } else {
            let decoded = URL_SAFE_NO_PAD.decode(&r.page_token).ok().and_then(|b| String::from_utf8(b).ok());
            Some(decoded.ok_or_else(|| {
                Status::from(Error::field("page_token", "is not a token from a previous page"))
            })?)
        };
        let (entries, next) =
            self.registry.list(category, r.query, r.include_deprecated, r.page_size, after)?;
        Ok(Response::new(pb::ListComponentTypesResponse {
            component_types: entries.iter().map(|e| entry_to_pb(e)).collect(),
            next_page_token: next.map(|n| URL_SAFE_NO_PAD.encode(n)).unwrap_or_default(),
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn get_component_type(
        &self,
        request: Request<pb::GetComponentTypeRequest>,
    ) -> Result<Response<pb::GetComponentTypeResponse>, Status> {
        require(&request, Permission::ComponentsRead)?;
        let r = request.into_inner();
        let (entry, versions) = self.registry.get(&r.r#type, &r.version)?;
        Ok(Response::new(pb::GetComponentTypeResponse {
            component_type: Some(entry_to_pb(&entry)),
            versions,
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn list_categories(
        &self,
        request: Request<pb::ListCategoriesRequest>,
    ) -> Result<Response<pb::ListCategoriesResponse>, Status> {
        require(&request, Permission::ComponentsRead)?;
        let categories = self
            .registry
            .categories()
            .into_iter()
            .map(|(c, count)| pb::CategoryInfo {
                category: category_to_pb(c) as i32,
                display_name: c.display_name().into(),
                description: c.description().into(),
                count: count as i32,
            })
            .collect();
        Ok(Response::new(pb::ListCategoriesResponse { categories }))
    }

    #[tracing::instrument(skip_all)]
    async fn validate_config(
        &self,
        request: Request<pb::ValidateConfigRequest>,
    ) -> Result<Response<pb::ValidateConfigResponse>, Status> {
        require(&request, Permission::ComponentsRead)?;
        let r = request.into_inner();
        let config = r.config.map(json::from_struct).unwrap_or_else(|| serde_json::json!({}));
        let verdict = self.registry.validate_config(&r.r#type, &r.version, &config)?;
        Ok(Response::new(pb::ValidateConfigResponse {
            valid: verdict.violations.is_empty(),
            violations: verdict
                .violations
                .into_iter()
                .map(|v| pb::ConfigViolation { pointer: v.pointer, message: v.message, keyword: v.keyword })
                .collect(),
            effective_config: verdict.effective.map(json::to_struct),
            inputs: verdict.inputs.iter().map(port_to_pb).collect(),
            outputs: verdict.outputs.iter().map(port_to_pb).collect(),
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn check_compatibility(
        &self,
        request: Request<pb::CheckCompatibilityRequest>,
    ) -> Result<Response<pb::CheckCompatibilityResponse>, Status> {
        require(&request, Permission::ComponentsRead)?;
        let r = request.into_inner();
        let response = match self.registry.check_compatibility(&port_ref(r.from), &port_ref(r.to))? {
            Verdict::Compatible => pb::CheckCompatibilityResponse { compatible: true, ..Default::default() },
            Verdict::Unchecked { pointer } => pb::CheckCompatibilityResponse {
                compatible: true,
                checked_at_run_time: true,
                reason:
                    "the output promises less than the input asks; its messages are checked when they arrive"
                        .into(),
                pointer,
            },
            Verdict::Incompatible { pointer, reason } => pb::CheckCompatibilityResponse {
                compatible: false,
                checked_at_run_time: false,
                reason,
                pointer,
            },
        };
        Ok(Response::new(response))
    }

    #[tracing::instrument(skip_all)]
    async fn register_component_type(
        &self,
        request: Request<pb::RegisterComponentTypeRequest>,
    ) -> Result<Response<pb::RegisterComponentTypeResponse>, Status> {
        let principal = require(&request, Permission::ComponentsRegister)?;
        let draft = draft_from_pb(request.into_inner().component_type)?;
        let entry = self.registry.register(draft, &principal.user_id).await?;
        Ok(Response::new(pb::RegisterComponentTypeResponse { component_type: Some(entry_to_pb(&entry)) }))
    }

    #[tracing::instrument(skip_all)]
    async fn update_component_type(
        &self,
        request: Request<pb::UpdateComponentTypeRequest>,
    ) -> Result<Response<pb::UpdateComponentTypeResponse>, Status> {
        let principal = require(&request, Permission::ComponentsRegister)?;
        let draft = draft_from_pb(request.into_inner().component_type)?;
        let entry = self.registry.update(draft, &principal).await?;
        Ok(Response::new(pb::UpdateComponentTypeResponse { component_type: Some(entry_to_pb(&entry)) }))
    }

    #[tracing::instrument(skip_all)]
    async fn deprecate_component_type(
        &self,
        request: Request<pb::DeprecateComponentTypeRequest>,
    ) -> Result<Response<pb::DeprecateComponentTypeResponse>, Status> {
        let principal = require(&request, Permission::ComponentsRegister)?;
        let r = request.into_inner();
        let entry = self.registry.deprecate(&r.r#type, &r.version, &r.message, &principal).await?;
        Ok(Response::new(pb::DeprecateComponentTypeResponse { component_type: Some(entry_to_pb(&entry)) }))
    }
}
