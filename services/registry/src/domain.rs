//! What the registry does, free of gRPC types.

use std::{
    collections::BTreeSet,
    sync::{Arc, RwLock},
    time::Duration,
};

use chrono::Utc;
use csp_bus::{NewEvent, SharedBus};
use csp_components::{
    Behaviour, Category, ComponentSpec, ExampleSpec, PortSpec, ReadMode, Violation, WriteMode,
    compat::Verdict,
};
use csp_platform::{FieldViolation, auth::Principal, config::RegistrySettings};
use futures::StreamExt as _;
use sea_orm::{
    ActiveValue::Set, ColumnTrait as _, DatabaseConnection, EntityTrait as _, QueryFilter as _,
    QueryOrder as _, sea_query::OnConflict,
};
use semver::Version;
use serde_json::Value;

use crate::{
    catalog::{Availability, Catalog, Entry, Query},
    entity::component_type,
    error::Error,
    remote,
};

/// The bus stream announcing catalogue changes to the other replicas.
const CHANGES: &str = "registry:changes";
const DEFAULT_PAGE: usize = 50;
const MAX_PAGE: usize = 500;

/// A type as submitted for registration, before validation.
#[derive(Debug, Clone, Default)]
pub(crate) struct Draft {
    pub(crate) type_id: String,
    pub(crate) version: String,
    pub(crate) category: Option<Category>,
    pub(crate) display_name: String,
    pub(crate) description: String,
    pub(crate) icon: String,
    pub(crate) inputs: Vec<PortSpec>,
    pub(crate) outputs: Vec<PortSpec>,
    pub(crate) config_schema: Value,
    pub(crate) examples: Vec<ExampleSpec>,
    pub(crate) read: Option<ReadMode>,
    pub(crate) write: Option<WriteMode>,
    pub(crate) buffers: bool,
    pub(crate) tags: Vec<String>,
    pub(crate) remote_address: String,
    pub(crate) remote_timeout_ms: i32,
}

/// The verdict on a configuration.
#[derive(Debug, Clone)]
pub(crate) struct ConfigVerdict {
    pub(crate) violations: Vec<Violation>,
    pub(crate) effective: Option<Value>,
    pub(crate) inputs: Vec<PortSpec>,
    pub(crate) outputs: Vec<PortSpec>,
}

/// A port of a type.
#[derive(Debug, Clone, Default)]
pub(crate) struct PortRef {
    pub(crate) type_id: String,
    pub(crate) version: String,
    pub(crate) port: String,
}

/// The catalogue and its operations.
pub(crate) struct Registry {
    db: DatabaseConnection,
    bus: SharedBus,
    catalog: RwLock<Arc<Catalog>>,
    settings: RegistrySettings,
}

fn parse_version(text: &str, field: &str) -> Result<Option<Version>, Error> {
    if text.is_empty() {
        return Ok(None);
    }
    Version::parse(text)
        .map(Some)
        .map_err(|e| Error::field(field, format!("`{text}` is not a semantic version: {e}")))
}

fn page_size(size: i32) -> Result<usize, Error> {
    match size {
        0 => Ok(DEFAULT_PAGE),
        n if n < 0 => Err(Error::field("page_size", "must not be negative")),
        n => Ok((n as usize).min(MAX_PAGE)),
    }
}

impl Registry {
    pub(crate) async fn new(
        db: DatabaseConnection,
        bus: SharedBus,
        settings: RegistrySettings,
    ) -> Result<Arc<Self>, Error> {
        let registry =
            Arc::new(Self { db, bus, catalog: RwLock::new(Arc::new(Catalog::default())), settings });
        registry.seed_builtins().await?;
        registry.reload().await?;
        Ok(registry)
    }

    /// The current catalogue.
    pub(crate) fn catalog(&self) -> Arc<Catalog> {
        match self.catalog.read() {
            Ok(guard) => guard.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Reads the catalogue from the database.
    pub(crate) async fn reload(&self) -> Result<(), Error> {
        let rows = component_type::Entity::find().all(&self.db).await?;
        let catalog = Arc::new(Catalog::from_rows(rows));
        match self.catalog.write() {
            Ok(mut guard) => *guard = catalog,
            Err(poisoned) => *poisoned.into_inner() = catalog,
        }
        Ok(())
    }

    async fn changed(&self, type_id: &str) -> Result<(), Error> {
        self.reload().await?;
        self.bus.append(CHANGES, NewEvent::new(type_id.to_owned()).with_trace_context(), Some(1000)).await?;
        Ok(())
    }

    /// Writes the built-in types (from code) into the database; their rows follow the code.
    async fn seed_builtins(&self) -> Result<(), Error> {
        let now = Utc::now();
        for spec in csp_components::builtins().values() {
            let spec_json = serde_json::to_string(spec).map_err(|e| Error::Internal(e.to_string()))?;
            let row = component_type::ActiveModel {
                type_id: Set(spec.type_id.clone()),
                version: Set(spec.version.clone()),
                category: Set(spec.category.as_str().to_owned()),
                spec: Set(spec_json),
                builtin: Set(true),
                deprecated: Set(false),
                deprecation_message: Set(String::new()),
                remote_address: Set(None),
                remote_timeout_ms: Set(0),
                availability: Set(String::new()),
                last_checked_at: Set(None),
                last_error: Set(String::new()),
                created_at: Set(now),
                created_by: Set("built-in".into()),
            };
            component_type::Entity::insert(row)
                .on_conflict(
                    OnConflict::columns([component_type::Column::TypeId, component_type::Column::Version])
                        .update_columns([
                            component_type::Column::Spec,
                            component_type::Column::Category,
                            component_type::Column::Builtin,
                        ])
                        .to_owned(),
                )
                .exec_without_returning(&self.db)
                .await?;
        }
        Ok(())
    }

    /// Reloads whenever another replica changes the catalogue; run it as a task.
    pub(crate) async fn follow_changes(self: Arc<Self>) {
        loop {
            let mut changes = match self.bus.tail(CHANGES, None).await {
                Ok(changes) => changes,
                Err(error) => {
                    tracing::warn!(%error, "cannot follow catalogue changes; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            while let Some(change) = changes.next().await {
                if let Err(error) = change {
                    tracing::warn!(%error, "catalogue changes interrupted");
                    break;
                }
                if let Err(error) = self.reload().await {
                    tracing::warn!(%error, "cannot reload the catalogue");
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Health-checks remote components periodically; run it as a task.
    pub(crate) async fn monitor_remotes(self: Arc<Self>) {
        let mut ticker = tokio::time::interval(self.settings.health_check_interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            if let Err(error) = self.check_remotes().await {
                tracing::warn!(%error, "remote component checks failed");
            }
        }
    }

    async fn check_remotes(&self) -> Result<(), Error> {
        let catalog = self.catalog();
        let mut changed = false;
        for (address, types) in catalog.remote_addresses() {
            let result = remote::check(&address, self.settings.health_check_timeout).await;
            let (availability, error) = match &result {
                Ok(()) => (Availability::Available, String::new()),
                Err(e) => (Availability::Unavailable, e.clone()),
            };
            for (type_id, version) in types {
                let was = catalog
                    .get(&type_id, Version::parse(&version).ok().as_ref())
                    .and_then(|e| e.remote.as_ref().map(|r| r.availability));
                if was != Some(availability) {
                    changed = true;
                    match availability {
                        Availability::Available => {
                            tracing::info!(%type_id, %address, "remote component available")
                        }
                        _ => tracing::warn!(%type_id, %address, %error, "remote component unavailable"),
                    }
                }
                component_type::Entity::update_many()
                    .col_expr(
                        component_type::Column::Availability,
                        sea_orm::sea_query::Expr::value(availability.as_str()),
                    )
                    .col_expr(
                        component_type::Column::LastError,
                        sea_orm::sea_query::Expr::value(error.clone()),
                    )
                    .col_expr(
                        component_type::Column::LastCheckedAt,
                        sea_orm::sea_query::Expr::value(Some(Utc::now())),
                    )
                    .filter(component_type::Column::TypeId.eq(type_id.clone()))
                    .filter(component_type::Column::Version.eq(version.clone()))
                    .exec(&self.db)
                    .await?;
            }
        }
        if changed {
            self.changed("").await?;
        } else {
            self.reload().await?;
        }
        Ok(())
    }

    // --- reads ---

    pub(crate) fn get(&self, type_id: &str, version: &str) -> Result<(Arc<Entry>, Vec<String>), Error> {
        if type_id.is_empty() {
            return Err(Error::field("type", "is required"));
        }
        let version = parse_version(version, "version")?;
        let catalog = self.catalog();
        let entry = catalog.get(type_id, version.as_ref()).cloned().ok_or_else(|| match &version {
            Some(v) if catalog.contains(type_id) => Error::NotFound(format!("{type_id} has no version {v}")),
            _ => Error::NotFound(format!("no component type {type_id}")),
        })?;
        Ok((entry, catalog.versions(type_id)))
    }

    pub(crate) fn list(
        &self,
        category: Option<Category>,
        text: String,
        include_deprecated: bool,
        page_size_raw: i32,
        after: Option<String>,
    ) -> Result<(Vec<Arc<Entry>>, Option<String>), Error> {
        if text.chars().count() > 200 {
            return Err(Error::field("query", "must be at most 200 characters"));
        }
        let limit = page_size(page_size_raw)?;
        let query = Query { category, text, include_deprecated, after, limit };
        let (entries, more) = self.catalog().list(&query);
        let next = if more { entries.last().map(|e| e.spec.type_id.clone()) } else { None };
        Ok((entries, next))
    }

    pub(crate) fn categories(&self) -> Vec<(Category, usize)> {
        let counts = self.catalog().counts();
        Category::ALL.into_iter().map(|c| (c, counts.get(&c).copied().unwrap_or(0))).collect()
    }

    pub(crate) fn validate_config(
        &self,
        type_id: &str,
        version: &str,
        config: &Value,
    ) -> Result<ConfigVerdict, Error> {
        let (entry, _) = self.get(type_id, version)?;
        Ok(match csp_components::validate_config(&entry.spec, config) {
            Ok(effective) => {
                let (inputs, outputs) = csp_components::ports_for(&entry.spec, &effective);
                ConfigVerdict { violations: Vec::new(), effective: Some(effective), inputs, outputs }
            }
            Err(violations) => {
                ConfigVerdict { violations, effective: None, inputs: Vec::new(), outputs: Vec::new() }
            }
        })
    }

    fn port_schema(&self, port: &PortRef, field: &str, output: bool) -> Result<Value, Error> {
        if port.port.is_empty() {
            return Err(Error::field(format!("{field}.port"), "is required"));
        }
        let (entry, _) = self.get(&port.type_id, &port.version).map_err(|e| match e {
            Error::Invalid { violations, .. } => Error::fields(
                violations
                    .into_iter()
                    .map(|v| FieldViolation::new(format!("{field}.{}", v.field), v.description))
                    .collect(),
            ),
            other => other,
        })?;
        let ports = if output { &entry.spec.outputs } else { &entry.spec.inputs };
        if let Some(found) = ports.iter().find(|p| p.name == port.port) {
            return Ok(found.schema.clone());
        }
        if entry.spec.dynamic_ports {
            // A port its configuration names: its messages are untyped.
            return Ok(serde_json::json!({}));
        }
        let names: Vec<&str> = ports.iter().map(|p| p.name.as_str()).collect();
        let kind = if output { "output" } else { "input" };
        let known = if names.is_empty() {
            format!("it has no {kind}s")
        } else {
            format!("its {kind}s are {}", names.join(", "))
        };
        Err(Error::field(
            format!("{field}.port"),
            format!("`{}` is not an {kind} of {}; {known}", port.port, port.type_id),
        ))
    }

    pub(crate) fn check_compatibility(&self, from: &PortRef, to: &PortRef) -> Result<Verdict, Error> {
        let output = self.port_schema(from, "from", true)?;
        let input = self.port_schema(to, "to", false)?;
        Ok(csp_components::compat::check(&output, &input))
    }

    // --- writes ---

    /// Checks a draft and turns it into a spec; every violation, with its field path.
    fn validate_draft(&self, draft: &Draft) -> Result<(ComponentSpec, Version), Error> {
        let mut v: Vec<FieldViolation> = Vec::new();
        let at = |field: &str| format!("component_type.{field}");
        let id = &draft.type_id;
        let id_ok = id.len() <= 100
            && id.split('.').count() >= 2
            && id.split('.').all(|seg| {
                let mut chars = seg.chars();
                chars.next().is_some_and(|c| c.is_ascii_lowercase())
                    && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
            });
        if !id_ok {
            v.push(FieldViolation::new(at("type"), "must be dotted lower-case words, like `acme.sentiment`"));
        } else if csp_components::is_reserved(id) {
            v.push(FieldViolation::new(
                at("type"),
                format!(
                    "the `{}` namespace belongs to the built-in types; use your own",
                    id.split('.').next().unwrap_or_default()
                ),
            ));
        }
        let version = match Version::parse(&draft.version) {
            Ok(version) => Some(version),
            Err(e) => {
                v.push(FieldViolation::new(
                    at("version"),
                    format!("`{}` is not a semantic version: {e}", draft.version),
                ));
                None
            }
        };
        if draft.category.is_none() {
            v.push(FieldViolation::new(at("category"), "is required"));
        }
        let name_len = draft.display_name.chars().count();
        if name_len == 0 || name_len > 100 || draft.display_name.chars().any(char::is_control) {
            v.push(FieldViolation::new(at("display_name"), "must be 1 to 100 characters"));
        }
        if draft.description.chars().count() > 2000 {
            v.push(FieldViolation::new(at("description"), "must be at most 2000 characters"));
        }
        if draft.icon.chars().count() > 64 {
            v.push(FieldViolation::new(at("icon"), "must be at most 64 characters"));
        }
        if draft.tags.len() > 20 || draft.tags.iter().any(|t| t.is_empty() || t.chars().count() > 32) {
            v.push(FieldViolation::new(at("tags"), "at most 20 tags of 1 to 32 characters"));
        }
        for (list, ports) in [("inputs", &draft.inputs), ("outputs", &draft.outputs)] {
            let mut names = BTreeSet::new();
            for (i, port) in ports.iter().enumerate() {
                let name_ok = port.name.len() <= 32
                    && port.name.chars().next().is_some_and(|c| c.is_ascii_lowercase())
                    && port.name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
                if !name_ok {
                    v.push(FieldViolation::new(
                        at(&format!("{list}[{i}].name")),
                        "must be a lower-case word like `in`",
                    ));
                } else if !names.insert(port.name.as_str()) {
                    v.push(FieldViolation::new(
                        at(&format!("{list}[{i}].name")),
                        format!("`{}` is used twice", port.name),
                    ));
                }
                if let Err(why) = csp_components::schema::check_schema(&port.schema) {
                    v.push(FieldViolation::new(
                        at(&format!("{list}[{i}].schema")),
                        format!("is not a valid JSON Schema: {why}"),
                    ));
                }
            }
        }
        let config_schema = if draft.config_schema.as_object().is_some_and(|o| o.is_empty()) {
            serde_json::json!({ "type": "object" })
        } else {
            draft.config_schema.clone()
        };
        let schema_ok = match csp_components::schema::check_schema(&config_schema) {
            Ok(()) => true,
            Err(why) => {
                v.push(FieldViolation::new(
                    at("config_schema"),
                    format!("is not a valid JSON Schema: {why}"),
                ));
                false
            }
        };
        if schema_ok {
            for (i, example) in draft.examples.iter().enumerate() {
                if let Err(problems) = csp_components::schema::validate(&config_schema, &example.config) {
                    for p in problems {
                        v.push(FieldViolation::new(
                            at(&format!("examples[{i}].config{}", p.pointer)),
                            p.message,
                        ));
                    }
                }
            }
        }
        match url::Url::parse(&draft.remote_address) {
            Ok(url) if matches!(url.scheme(), "http" | "https") && url.host().is_some() => {}
            _ if draft.remote_address.is_empty() => {
                v.push(FieldViolation::new(
                    at("remote.address"),
                    "is required: custom components are served by a ComponentRuntime endpoint",
                ));
            }
            _ => v.push(FieldViolation::new(
                at("remote.address"),
                "must be an http(s) URL like http://host:50051",
            )),
        }
        if draft.read.is_some() != draft.write.is_some() {
            v.push(FieldViolation::new(
                at("behaviour"),
                "declares how the component reads or how it writes, not both: declare both or neither",
            ));
        }
        if !(0..=3_600_000).contains(&draft.remote_timeout_ms) {
            v.push(FieldViolation::new(at("remote.timeout_ms"), "must be 0 to 3600000"));
        }
        if !v.is_empty() {
            return Err(Error::fields(v));
        }
        let (Some(version), Some(category)) = (version, draft.category) else {
            return Err(Error::Internal("validated draft lost its version".into()));
        };
        let spec = ComponentSpec {
            type_id: draft.type_id.clone(),
            version: version.to_string(),
            category,
            display_name: draft.display_name.clone(),
            description: draft.description.clone(),
            icon: draft.icon.clone(),
            inputs: draft.inputs.clone(),
            outputs: draft.outputs.clone(),
            dynamic_ports: false,
            config_schema,
            examples: draft.examples.clone(),
            behaviour: match (draft.read, draft.write) {
                (Some(read), Some(write)) => Some(Behaviour { read, write, buffers: draft.buffers }),
                _ => None,
            },
            tags: draft.tags.clone(),
        };
        Ok((spec, version))
    }

    /// Checks the endpoint answers, and fills in the ports it describes when none were given.
    async fn probe(&self, mut draft: Draft) -> Result<Draft, Error> {
        let timeout = self.settings.health_check_timeout;
        if let Err(why) = remote::check(&draft.remote_address, timeout).await {
            return Err(Error::field(
                "component_type.remote.address",
                format!("{} did not pass its health check: {why}", draft.remote_address),
            ));
        }
        if draft.inputs.is_empty() && draft.outputs.is_empty() {
            let described = remote::describe(&draft.remote_address, timeout)
                .await
                .map_err(|why| Error::field("component_type.remote.address", why))?;
            let port = |p: csp_proto::component::v1::PortSpec, input: bool| PortSpec {
                name: p.name,
                description: p.description,
                schema: p.schema.map(csp_proto::json::from_struct).unwrap_or_else(|| serde_json::json!({})),
                required: input && p.required,
                multiple: p.multiple || !input,
            };
            draft.inputs = described.inputs.into_iter().map(|p| port(p, true)).collect();
            draft.outputs = described.outputs.into_iter().map(|p| port(p, false)).collect();
            if draft.config_schema.as_object().is_some_and(|o| o.is_empty())
                && let Some(schema) = described.config_schema
            {
                draft.config_schema = csp_proto::json::from_struct(schema);
            }
            if draft.description.is_empty() {
                draft.description = described.description;
            }
        }
        Ok(draft)
    }

    async fn insert(&self, spec: ComponentSpec, draft: &Draft, actor: &str) -> Result<Arc<Entry>, Error> {
        let now = Utc::now();
        let row = component_type::ActiveModel {
            type_id: Set(spec.type_id.clone()),
            version: Set(spec.version.clone()),
            category: Set(spec.category.as_str().to_owned()),
            spec: Set(serde_json::to_string(&spec).map_err(|e| Error::Internal(e.to_string()))?),
            builtin: Set(false),
            deprecated: Set(false),
            deprecation_message: Set(String::new()),
            remote_address: Set(Some(draft.remote_address.clone())),
            remote_timeout_ms: Set(draft.remote_timeout_ms),
            availability: Set(Availability::Available.as_str().to_owned()),
            last_checked_at: Set(Some(now)),
            last_error: Set(String::new()),
            created_at: Set(now),
            created_by: Set(actor.to_owned()),
        };
        match component_type::Entity::insert(row).exec_without_returning(&self.db).await {
            Ok(_) => {}
            Err(e)
                if e.to_string().to_lowercase().contains("unique")
                    || e.to_string().to_lowercase().contains("duplicate") =>
            {
                return Err(Error::AlreadyExists(format!(
                    "{} {} is already published",
                    spec.type_id, spec.version
                )));
            }
            Err(e) => return Err(e.into()),
        }
        self.changed(&spec.type_id).await?;
        let version = Version::parse(&spec.version).ok();
        self.catalog()
            .get(&spec.type_id, version.as_ref())
            .cloned()
            .ok_or_else(|| Error::Internal("registered type missing after reload".into()))
    }

    pub(crate) async fn register(&self, draft: Draft, actor: &str) -> Result<Arc<Entry>, Error> {
        if csp_components::builtin(&draft.type_id).is_some() {
            return Err(Error::Forbidden(format!("{} is built in and cannot be registered", draft.type_id)));
        }
        self.validate_draft(&draft)?;
        if self.catalog().contains(&draft.type_id) {
            return Err(Error::AlreadyExists(format!(
                "{} exists; publish a new version with UpdateComponentType",
                draft.type_id
            )));
        }
        let draft = self.probe(draft).await?;
        let (spec, _) = self.validate_draft(&draft)?;
        let entry = self.insert(spec, &draft, actor).await?;
        tracing::info!(type_id = %entry.spec.type_id, version = %entry.version, %actor, "component type registered");
        Ok(entry)
    }

    /// Who registered a custom type (its first version): only they, or an admin, change it.
    async fn check_owner(&self, type_id: &str, actor: &Principal) -> Result<(), Error> {
        let first = component_type::Entity::find()
            .filter(component_type::Column::TypeId.eq(type_id))
            .order_by_asc(component_type::Column::CreatedAt)
            .one(&self.db)
            .await?;
        match first {
            Some(row) if row.created_by != actor.user_id && !actor.is_admin() => Err(Error::Forbidden(
                "only the registrar of a component type, or an admin, may change it".into(),
            )),
            _ => Ok(()),
        }
    }

    pub(crate) async fn update(&self, draft: Draft, actor: &Principal) -> Result<Arc<Entry>, Error> {
        if csp_components::builtin(&draft.type_id).is_some() {
            return Err(Error::Forbidden(format!(
                "{} is built in; it changes only with the product",
                draft.type_id
            )));
        }
        self.check_owner(&draft.type_id, actor).await?;
        let (_, version) = self.validate_draft(&draft)?;
        let catalog = self.catalog();
        let latest = catalog.latest(&draft.type_id).ok_or_else(|| {
            Error::NotFound(format!("no component type {}; register it first", draft.type_id))
        })?;
        if catalog.get(&draft.type_id, Some(&version)).is_some() {
            return Err(Error::AlreadyExists(format!(
                "{} {version} is published; published versions never change — use a new version",
                draft.type_id
            )));
        }
        if version < latest.version {
            return Err(Error::field(
                "component_type.version",
                format!("must be greater than the latest published version, {}", latest.version),
            ));
        }
        let draft = self.probe(draft).await?;
        let (spec, _) = self.validate_draft(&draft)?;
        let entry = self.insert(spec, &draft, &actor.user_id).await?;
        tracing::info!(
            target: "audit",
            type_id = %entry.spec.type_id,
            version = %entry.version,
            actor = %actor.user_id,
            endpoint = %draft.remote_address,
            "component type updated"
        );
        Ok(entry)
    }

    pub(crate) async fn deprecate(
        &self,
        type_id: &str,
        version: &str,
        message: &str,
        actor: &Principal,
    ) -> Result<Arc<Entry>, Error> {
        if csp_components::builtin(type_id).is_some() {
            return Err(Error::Forbidden(format!("{type_id} is built in and cannot be deprecated")));
        }
        self.check_owner(type_id, actor).await?;
        if message.chars().count() > 500 {
            return Err(Error::field("message", "must be at most 500 characters"));
        }
        let pinned = parse_version(version, "version")?;
        self.get(type_id, version)?;
        let mut update = component_type::Entity::update_many()
            .col_expr(component_type::Column::Deprecated, sea_orm::sea_query::Expr::value(true))
            .col_expr(
                component_type::Column::DeprecationMessage,
                sea_orm::sea_query::Expr::value(message.to_owned()),
            )
            .filter(component_type::Column::TypeId.eq(type_id));
        if let Some(pinned) = &pinned {
            update = update.filter(component_type::Column::Version.eq(pinned.to_string()));
        }
        update.exec(&self.db).await?;
        tracing::info!(target: "audit", %type_id, version, actor = %actor.user_id, "component type deprecated");
        self.changed(type_id).await?;
        let catalog = self.catalog();
        catalog
            .get(type_id, pinned.as_ref())
            .cloned()
            .ok_or_else(|| Error::NotFound(format!("no component type {type_id}")))
    }
}
