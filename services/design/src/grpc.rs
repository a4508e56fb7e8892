//! The gRPC adapter of `csp.design.v1.DesignService`: permissions, request shapes and
//! conversions; the work is in [`Designs`].
//!
//! Reads need the `design.read` permission and writes `design.write`; on top of that every call
//! on one design checks the caller's access to it (owner, editor, viewer; admins are owners).

use std::sync::Arc;

use csp_platform::{
    FieldViolation,
    auth::{Permission, require},
};
use csp_proto::{
    design::v1::{self as pb, design_service_server::DesignService},
    json,
};
use tonic::{Request, Response, Status};

use crate::{
    convert::{self, content_to_pb, node_to_pb, op_from_pb, op_to_pb, timestamp},
    designs::{Access, Designs, Summary, Versioned, page_size},
    document,
    entity::revision,
    error::Error,
    model::{self, Change, Op},
    repo::Filter,
    undo::Direction,
    validate::{Credentials, Severity},
};

/// The service's gRPC face.
pub(crate) struct DesignApi {
    designs: Arc<Designs>,
}

impl DesignApi {
    pub(crate) fn new(designs: Arc<Designs>) -> Self {
        Self { designs }
    }
}

fn access_to_pb(access: Access) -> pb::Access {
    match access {
        Access::Viewer => pb::Access::Viewer,
        Access::Editor => pb::Access::Editor,
        Access::Owner => pb::Access::Owner,
    }
}

fn design_to_pb(v: &Versioned) -> pb::Design {
    let (nodes, connections) = content_to_pb(&v.document);
    let meta = &v.document.meta;
    pb::Design {
        id: v.id.clone(),
        owner_id: v.owner_id.clone(),
        name: meta.name.clone(),
        description: meta.description.clone(),
        metadata: Some(json::to_struct(meta.metadata.clone())),
        canvas: Some(json::to_struct(meta.canvas.clone())),
        revision: v.revision,
        is_template: meta.is_template,
        nodes,
        connections,
        created_at: Some(timestamp(v.created_at)),
        updated_at: Some(timestamp(v.updated_at)),
        access: access_to_pb(v.access) as i32,
    }
}

fn summary_to_pb(s: &Summary) -> pb::DesignSummary {
    pb::DesignSummary {
        id: s.row.id.clone(),
        owner_id: s.row.owner_id.clone(),
        name: s.row.name.clone(),
        description: s.row.description.clone(),
        revision: s.row.revision,
        is_template: s.row.is_template,
        node_count: s.nodes as i32,
        connection_count: s.connections as i32,
        created_at: Some(timestamp(s.row.created_at)),
        updated_at: Some(timestamp(s.row.updated_at)),
        access: access_to_pb(s.access) as i32,
    }
}

fn revision_to_pb(r: &revision::Model) -> pb::RevisionInfo {
    pb::RevisionInfo {
        revision: r.revision,
        author_id: r.author_id.clone(),
        time: Some(timestamp(r.created_at)),
        op_count: r.op_count,
        summary: r.summary.clone(),
    }
}

fn field_changes_to_pb(changes: Vec<model::FieldChange>) -> Vec<pb::FieldChange> {
    changes
        .into_iter()
        .map(|c| pb::FieldChange {
            path: c.path,
            before: c.before.map(json::to_value),
            after: c.after.map(json::to_value),
        })
        .collect()
}

fn kind_and_sides<T>(change: Change<T>) -> (pb::ChangeKind, Option<T>, Option<T>, Vec<model::FieldChange>) {
    match change {
        Change::Added(after) => (pb::ChangeKind::Added, None, Some(after), Vec::new()),
        Change::Removed(before) => (pb::ChangeKind::Removed, Some(before), None, Vec::new()),
        Change::Changed { before, after, fields } => {
            (pb::ChangeKind::Changed, Some(before), Some(after), fields)
        }
    }
}

/// Where an op's payload sits in an ApplyOps request, for field violations.
fn payload_field(index: usize, op: &Op) -> String {
    let kind = convert::op_field(op);
    match op {
        Op::AddNode { .. } => format!("ops[{index}].{kind}.node"),
        Op::AddConnection { .. } => format!("ops[{index}].{kind}.connection"),
        _ => format!("ops[{index}].{kind}"),
    }
}

fn credentials<T>(request: &Request<T>) -> Credentials {
    request.metadata().get("authorization").cloned()
}

/// A deadlock search's answer in the API's terms: nodes and connections by id.
fn deadlock_response(checked: crate::deadlock::Checked) -> pb::CheckDeadlockResponse {
    use csp_components::deadlock::Verdict;
    let crate::deadlock::Checked { verdict, model, assumed, source_messages } = checked;
    let node = |p: usize| model.processes[p].node_id.clone();
    let mut response = pb::CheckDeadlockResponse {
        assumed_node_ids: assumed,
        source_messages: i32::from(source_messages),
        ..Default::default()
    };
    match verdict {
        Verdict::Free { states } => {
            response.verdict = pb::DeadlockVerdict::DeadlockFree as i32;
            response.states_explored = states as i64;
        }
        Verdict::CapReached { states } => {
            response.verdict = pb::DeadlockVerdict::StateCapReached as i32;
            response.states_explored = states as i64;
        }
        Verdict::Deadlock { states, trace, blocked, fill } => {
            response.verdict = pb::DeadlockVerdict::DeadlockFound as i32;
            response.states_explored = states as i64;
            response.trace = trace
                .into_iter()
                .map(|step| {
                    let channel = &model.channels[step.channel];
                    pb::TraceStep {
                        connection_id: channel.connection_id.clone(),
                        from_node_id: node(channel.from),
                        to_node_id: node(channel.to),
                        action: crate::deadlock::action(step.action).into(),
                    }
                })
                .collect();
            response.blocked = blocked
                .into_iter()
                .map(|b| pb::BlockedProcess {
                    node_id: node(b.process),
                    waiting_to: crate::deadlock::waiting(b.waiting_to).into(),
                    connection_ids: b
                        .channels
                        .iter()
                        .map(|&c| model.channels[c].connection_id.clone())
                        .collect(),
                })
                .collect();
            response.channels = fill
                .into_iter()
                .zip(&model.channels)
                .map(|(messages, channel)| pb::ChannelFill {
                    connection_id: channel.connection_id.clone(),
                    messages: i32::from(messages),
                    capacity: i32::from(channel.capacity),
                })
                .collect();
        }
    }
    response
}

fn required<T>(value: Option<T>, field: &str) -> Result<T, Error> {
    value.ok_or_else(|| Error::field(field, "is required"))
}

#[tonic::async_trait]
impl DesignService for DesignApi {
    #[tracing::instrument(skip_all)]
    async fn create_design(
        &self,
        request: Request<pb::CreateDesignRequest>,
    ) -> Result<Response<pb::CreateDesignResponse>, Status> {
        let p = require(&request, Permission::DesignWrite)?;
        let r = request.into_inner();
        let meta = convert::meta_from_pb(r.name, r.description, r.metadata, r.canvas, r.is_template);
        let design = self.designs.create(&p, meta).await?;
        Ok(Response::new(pb::CreateDesignResponse { design: Some(design_to_pb(&design)) }))
    }

    #[tracing::instrument(skip_all)]
    async fn get_design(
        &self,
        request: Request<pb::GetDesignRequest>,
    ) -> Result<Response<pb::GetDesignResponse>, Status> {
        let p = require(&request, Permission::DesignRead)?;
        let r = request.get_ref();
        let design = match pb::DesignView::try_from(r.view) {
            Ok(pb::DesignView::Unspecified | pb::DesignView::Full) => {
                self.designs.get(&p, &r.design_id).await?
            }
            Ok(pb::DesignView::Basic) => self.designs.get_basic(&p, &r.design_id).await?,
            Err(_) => return Err(Error::field("view", format!("{} is not a DesignView", r.view)).into()),
        };
        Ok(Response::new(pb::GetDesignResponse { design: Some(design_to_pb(&design)) }))
    }

    #[tracing::instrument(skip_all)]
    async fn list_designs(
        &self,
        request: Request<pb::ListDesignsRequest>,
    ) -> Result<Response<pb::ListDesignsResponse>, Status> {
        let p = require(&request, Permission::DesignRead)?;
        let r = request.into_inner();
        let filter = match pb::DesignFilter::try_from(r.filter) {
            Ok(pb::DesignFilter::Unspecified) => Filter::Visible,
            Ok(pb::DesignFilter::Owned) => Filter::Owned,
            Ok(pb::DesignFilter::SharedWithMe) => Filter::SharedWithMe,
            Ok(pb::DesignFilter::Templates) => Filter::Templates,
            Err(_) => {
                return Err(Error::field("filter", format!("{} is not a DesignFilter", r.filter)).into());
            }
        };
        let (designs, next_page_token) =
            self.designs.list(&p, filter, &r.query, page_size(r.page_size)?, &r.page_token).await?;
        Ok(Response::new(pb::ListDesignsResponse {
            designs: designs.iter().map(summary_to_pb).collect(),
            next_page_token,
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn update_design(
        &self,
        request: Request<pb::UpdateDesignRequest>,
    ) -> Result<Response<pb::UpdateDesignResponse>, Status> {
        let p = require(&request, Permission::DesignWrite)?;
        let credentials = credentials(&request);
        let r = request.into_inner();
        let op = convert::update_design_from_pb(required(r.update, "update")?);
        let committed = self
            .designs
            .apply(&p, &credentials, &r.design_id, r.expected_revision, vec![("update".into(), op)])
            .await?;
        Ok(Response::new(pb::UpdateDesignResponse { design: Some(design_to_pb(&committed.design)) }))
    }

    #[tracing::instrument(skip_all)]
    async fn delete_design(
        &self,
        request: Request<pb::DeleteDesignRequest>,
    ) -> Result<Response<pb::DeleteDesignResponse>, Status> {
        let p = require(&request, Permission::DesignWrite)?;
        let r = request.into_inner();
        self.designs.delete(&p, &r.design_id, r.expected_revision).await?;
        Ok(Response::new(pb::DeleteDesignResponse {}))
    }

    #[tracing::instrument(skip_all)]
    async fn duplicate_design(
        &self,
        request: Request<pb::DuplicateDesignRequest>,
    ) -> Result<Response<pb::DuplicateDesignResponse>, Status> {
        let p = require(&request, Permission::DesignWrite)?;
        let r = request.into_inner();
        let design = self.designs.duplicate(&p, &r.design_id, &r.name).await?;
        Ok(Response::new(pb::DuplicateDesignResponse { design: Some(design_to_pb(&design)) }))
    }

    #[tracing::instrument(skip_all)]
    async fn add_node(
        &self,
        request: Request<pb::AddNodeRequest>,
    ) -> Result<Response<pb::AddNodeResponse>, Status> {
        let p = require(&request, Permission::DesignWrite)?;
        let credentials = credentials(&request);
        let r = request.into_inner();
        let node = convert::node_from_pb(required(r.node, "node")?);
        let committed = self
            .designs
            .apply(
                &p,
                &credentials,
                &r.design_id,
                r.expected_revision,
                vec![("node".into(), Op::AddNode { node })],
            )
            .await?;
        let node = committed.ops.iter().find_map(|op| match op {
            Op::AddNode { node } => Some(node_to_pb(node)),
            _ => None,
        });
        Ok(Response::new(pb::AddNodeResponse { node, revision: committed.design.revision }))
    }

    #[tracing::instrument(skip_all)]
    async fn update_node(
        &self,
        request: Request<pb::UpdateNodeRequest>,
    ) -> Result<Response<pb::UpdateNodeResponse>, Status> {
        let p = require(&request, Permission::DesignWrite)?;
        let credentials = credentials(&request);
        let r = request.into_inner();
        let update = required(r.update, "update")?;
        let node_id = update.node_id.clone();
        let op = convert::update_node_from_pb(update);
        let committed = self
            .designs
            .apply(&p, &credentials, &r.design_id, r.expected_revision, vec![("update".into(), op)])
            .await?;
        let node = committed.design.document.nodes.get(&node_id).map(node_to_pb);
        Ok(Response::new(pb::UpdateNodeResponse { node, revision: committed.design.revision }))
    }

    #[tracing::instrument(skip_all)]
    async fn remove_node(
        &self,
        request: Request<pb::RemoveNodeRequest>,
    ) -> Result<Response<pb::RemoveNodeResponse>, Status> {
        let p = require(&request, Permission::DesignWrite)?;
        let credentials = credentials(&request);
        let r = request.into_inner();
        let op = Op::RemoveNode { node_id: r.node_id };
        let committed = self
            .designs
            .apply(&p, &credentials, &r.design_id, r.expected_revision, vec![(String::new(), op)])
            .await?;
        let removed_connection_ids = committed
            .ops
            .iter()
            .filter_map(|op| match op {
                Op::RemoveConnection { connection_id } => Some(connection_id.clone()),
                _ => None,
            })
            .collect();
        Ok(Response::new(pb::RemoveNodeResponse {
            revision: committed.design.revision,
            removed_connection_ids,
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn add_connection(
        &self,
        request: Request<pb::AddConnectionRequest>,
    ) -> Result<Response<pb::AddConnectionResponse>, Status> {
        let p = require(&request, Permission::DesignWrite)?;
        let credentials = credentials(&request);
        let r = request.into_inner();
        let connection = convert::connection_from_pb(required(r.connection, "connection")?);
        let op = Op::AddConnection { connection };
        let committed = self
            .designs
            .apply(&p, &credentials, &r.design_id, r.expected_revision, vec![("connection".into(), op)])
            .await?;
        let connection = committed.ops.iter().find_map(|op| match op {
            Op::AddConnection { connection } => Some(convert::connection_to_pb(connection)),
            _ => None,
        });
        Ok(Response::new(pb::AddConnectionResponse { connection, revision: committed.design.revision }))
    }

    #[tracing::instrument(skip_all)]
    async fn remove_connection(
        &self,
        request: Request<pb::RemoveConnectionRequest>,
    ) -> Result<Response<pb::RemoveConnectionResponse>, Status> {
        let p = require(&request, Permission::DesignWrite)?;
        let credentials = credentials(&request);
        let r = request.into_inner();
        let op = Op::RemoveConnection { connection_id: r.connection_id };
        let committed = self
            .designs
            .apply(&p, &credentials, &r.design_id, r.expected_revision, vec![(String::new(), op)])
            .await?;
        Ok(Response::new(pb::RemoveConnectionResponse { revision: committed.design.revision }))
    }

    #[tracing::instrument(skip_all, fields(ops = request.get_ref().ops.len()))]
    async fn apply_ops(
        &self,
        request: Request<pb::ApplyOpsRequest>,
    ) -> Result<Response<pb::ApplyOpsResponse>, Status> {
        let p = require(&request, Permission::DesignWrite)?;
        let credentials = credentials(&request);
        let r = request.into_inner();
        let mut ops = Vec::with_capacity(r.ops.len());
        let mut violations: Vec<FieldViolation> = Vec::new();
        for (i, op) in r.ops.into_iter().enumerate() {
            match op_from_pb(op, &format!("ops[{i}]")) {
                Ok(op) => ops.push((payload_field(i, &op), op)),
                Err(v) => violations.push(v),
            }
        }
        if !violations.is_empty() {
            return Err(Error::fields(violations).into());
        }
        let committed = self.designs.apply(&p, &credentials, &r.design_id, r.expected_revision, ops).await?;
        Ok(Response::new(pb::ApplyOpsResponse {
            revision: committed.design.revision,
            ops: committed.ops.iter().map(op_to_pb).collect(),
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn list_revisions(
        &self,
        request: Request<pb::ListRevisionsRequest>,
    ) -> Result<Response<pb::ListRevisionsResponse>, Status> {
        let p = require(&request, Permission::DesignRead)?;
        let r = request.into_inner();
        let (rows, next_page_token) =
            self.designs.revisions(&p, &r.design_id, page_size(r.page_size)?, &r.page_token).await?;
        Ok(Response::new(pb::ListRevisionsResponse {
            revisions: rows.iter().map(revision_to_pb).collect(),
            next_page_token,
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn get_revision(
        &self,
        request: Request<pb::GetRevisionRequest>,
    ) -> Result<Response<pb::GetRevisionResponse>, Status> {
        let p = require(&request, Permission::DesignRead)?;
        let r = request.into_inner();
        if r.revision < 1 {
            return Err(Error::field("revision", "must be at least 1").into());
        }
        let (design, info) = self.designs.at_revision(&p, &r.design_id, r.revision, "revision").await?;
        Ok(Response::new(pb::GetRevisionResponse {
            design: Some(design_to_pb(&design)),
            info: info.as_ref().map(revision_to_pb),
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn diff_revisions(
        &self,
        request: Request<pb::DiffRevisionsRequest>,
    ) -> Result<Response<pb::DiffRevisionsResponse>, Status> {
        let p = require(&request, Permission::DesignRead)?;
        let r = request.into_inner();
        let diff = self.designs.diff(&p, &r.design_id, r.from_revision, r.to_revision).await?;
        let nodes = diff
            .nodes
            .into_iter()
            .map(|(node_id, change)| {
                let (kind, before, after, changes) = kind_and_sides(change);
                pb::NodeDiff {
                    node_id,
                    kind: kind as i32,
                    before: before.as_ref().map(node_to_pb),
                    after: after.as_ref().map(node_to_pb),
                    changes: field_changes_to_pb(changes),
                }
            })
            .collect();
        let connections = diff
            .connections
            .into_iter()
            .map(|(connection_id, change)| {
                let (kind, before, after, changes) = kind_and_sides(change);
                pb::ConnectionDiff {
                    connection_id,
                    kind: kind as i32,
                    before: before.as_ref().map(convert::connection_to_pb),
                    after: after.as_ref().map(convert::connection_to_pb),
                    changes: field_changes_to_pb(changes),
                }
            })
            .collect();
        Ok(Response::new(pb::DiffRevisionsResponse {
            design_changes: field_changes_to_pb(diff.design),
            nodes,
            connections,
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn restore_revision(
        &self,
        request: Request<pb::RestoreRevisionRequest>,
    ) -> Result<Response<pb::RestoreRevisionResponse>, Status> {
        let p = require(&request, Permission::DesignWrite)?;
        let r = request.into_inner();
        let committed = self.designs.restore(&p, &r.design_id, r.expected_revision, r.revision).await?;
        Ok(Response::new(pb::RestoreRevisionResponse { design: Some(design_to_pb(&committed.design)) }))
    }

    #[tracing::instrument(skip_all)]
    async fn validate_design(
        &self,
        request: Request<pb::ValidateDesignRequest>,
    ) -> Result<Response<pb::ValidateDesignResponse>, Status> {
        let p = require(&request, Permission::DesignRead)?;
        let credentials = credentials(&request);
        let r = request.into_inner();
        let (design, _) = self.designs.at_revision(&p, &r.design_id, r.revision, "revision").await?;
        let findings = self.designs.validate(&p, &credentials, &design.id, &design.document).await?;
        Ok(Response::new(pb::ValidateDesignResponse {
            valid: !findings.iter().any(|f| f.severity == Severity::Error),
            findings: findings
                .into_iter()
                .map(|f| pb::Finding {
                    severity: match f.severity {
                        Severity::Error => pb::Severity::Error,
                        Severity::Warning => pb::Severity::Warning,
                    } as i32,
                    code: f.code.into(),
                    message: f.message,
                    node_id: f.node_id,
                    connection_id: f.connection_id,
                    port: f.port,
                    pointer: f.pointer,
                })
                .collect(),
            revision: design.revision,
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn export_design(
        &self,
        request: Request<pb::ExportDesignRequest>,
    ) -> Result<Response<pb::ExportDesignResponse>, Status> {
        let p = require(&request, Permission::DesignRead)?;
        let r = request.into_inner();
        let (design, _) = self.designs.at_revision(&p, &r.design_id, r.revision, "revision").await?;
        Ok(Response::new(pb::ExportDesignResponse {
            document: document::export(&design.document),
            format_version: document::FORMAT_VERSION,
        }))
    }

    #[tracing::instrument(skip_all, fields(bytes = request.get_ref().document.len()))]
    async fn import_design(
        &self,
        request: Request<pb::ImportDesignRequest>,
    ) -> Result<Response<pb::ImportDesignResponse>, Status> {
        let p = require(&request, Permission::DesignWrite)?;
        let r = request.into_inner();
        let limit = self.designs.limits.max_import_bytes;
        if r.document.len() > limit {
            let message =
                format!("is {} bytes; documents of at most {limit} bytes can be imported", r.document.len());
            return Err(Error::field("document", message).into());
        }
        if r.document.trim().is_empty() {
            return Err(Error::field("document", "is required").into());
        }
        let imported = document::import(&r.document).map_err(|why| Error::field("document", why))?;
        let limits = &self.designs.limits;
        let mut too_many = Vec::new();
        if imported.nodes.len() > limits.max_nodes {
            too_many.push(FieldViolation::new(
                "document.nodes",
                format!("has {} nodes; a design has at most {}", imported.nodes.len(), limits.max_nodes),
            ));
        }
        if imported.connections.len() > limits.max_connections {
            too_many.push(FieldViolation::new(
                "document.connections",
                format!(
                    "has {} connections; a design has at most {}",
                    imported.connections.len(),
                    limits.max_connections
                ),
            ));
        }
        if !too_many.is_empty() {
            return Err(Error::fields(too_many).into());
        }
        let mut meta = imported.meta;
        let mut meta_field = "document.design.";
        if !r.name.is_empty() {
            meta.name = r.name;
            meta_field = "";
        }
        let ops = imported
            .nodes
            .into_iter()
            .enumerate()
            .map(|(i, node)| (format!("document.nodes[{i}]"), Op::AddNode { node }))
            .chain(imported.connections.into_iter().enumerate().map(|(i, connection)| {
                (format!("document.connections[{i}]"), Op::AddConnection { connection })
            }))
            .collect();
        let design = self.designs.create_from(&p, meta, meta_field, ops, "imported the design").await?;
        Ok(Response::new(pb::ImportDesignResponse { design: Some(design_to_pb(&design)) }))
    }

    #[tracing::instrument(skip_all)]
    async fn share_design(
        &self,
        request: Request<pb::ShareDesignRequest>,
    ) -> Result<Response<pb::ShareDesignResponse>, Status> {
        let p = require(&request, Permission::DesignWrite)?;
        let r = request.into_inner();
        let access = match pb::Access::try_from(r.access) {
            Ok(pb::Access::Viewer) => Access::Viewer,
            Ok(pb::Access::Editor) => Access::Editor,
            _ => return Err(Error::field("access", "must be ACCESS_VIEWER or ACCESS_EDITOR").into()),
        };
        let (user_id, access, created_at) = self.designs.share(&p, &r.design_id, &r.user_id, access).await?;
        Ok(Response::new(pb::ShareDesignResponse {
            share: Some(pb::Share {
                design_id: r.design_id,
                user_id,
                access: access_to_pb(access) as i32,
                created_at: Some(timestamp(created_at)),
            }),
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn unshare_design(
        &self,
        request: Request<pb::UnshareDesignRequest>,
    ) -> Result<Response<pb::UnshareDesignResponse>, Status> {
        let p = require(&request, Permission::DesignRead)?;
        let r = request.into_inner();
        self.designs.unshare(&p, &r.design_id, &r.user_id).await?;
        Ok(Response::new(pb::UnshareDesignResponse {}))
    }

    #[tracing::instrument(skip_all)]
    async fn transfer_ownership(
        &self,
        request: Request<pb::TransferOwnershipRequest>,
    ) -> Result<Response<pb::TransferOwnershipResponse>, Status> {
        let p = require(&request, Permission::DesignWrite)?;
        let credentials = credentials(&request);
        let r = request.into_inner();
        let committed = self
            .designs
            .transfer(&p, &credentials, &r.design_id, r.expected_revision, &r.new_owner_id)
            .await?;
        Ok(Response::new(pb::TransferOwnershipResponse { design: Some(design_to_pb(&committed.design)) }))
    }

    #[tracing::instrument(skip_all)]
    async fn create_from_template(
        &self,
        request: Request<pb::CreateFromTemplateRequest>,
    ) -> Result<Response<pb::CreateFromTemplateResponse>, Status> {
        let p = require(&request, Permission::DesignWrite)?;
        let r = request.into_inner();
        let design = self.designs.instantiate(&p, &r.template_id, &r.name).await?;
        Ok(Response::new(pb::CreateFromTemplateResponse { design: Some(design_to_pb(&design)) }))
    }

    #[tracing::instrument(skip_all)]
    async fn undo(&self, request: Request<pb::UndoRequest>) -> Result<Response<pb::UndoResponse>, Status> {
        let p = require(&request, Permission::DesignWrite)?;
        let r = request.into_inner();
        let (committed, undone) =
            self.designs.step(&p, &r.design_id, r.expected_revision, Direction::Undo).await?;
        Ok(Response::new(pb::UndoResponse {
            revision: committed.design.revision,
            ops: committed.ops.iter().map(op_to_pb).collect(),
            undone_revision: undone,
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn redo(&self, request: Request<pb::RedoRequest>) -> Result<Response<pb::RedoResponse>, Status> {
        let p = require(&request, Permission::DesignWrite)?;
        let r = request.into_inner();
        let (committed, redone) =
            self.designs.step(&p, &r.design_id, r.expected_revision, Direction::Redo).await?;
        Ok(Response::new(pb::RedoResponse {
            revision: committed.design.revision,
            ops: committed.ops.iter().map(op_to_pb).collect(),
            redone_revision: redone,
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn check_deadlock(
        &self,
        request: Request<pb::CheckDeadlockRequest>,
    ) -> Result<Response<pb::CheckDeadlockResponse>, Status> {
        let p = require(&request, Permission::DesignRead)?;
        let credentials = credentials(&request);
        let r = request.into_inner();
        if r.max_states < 0 {
            return Err(Error::field("max_states", "must not be negative").into());
        }
        let (design, _) = self.designs.at_revision(&p, &r.design_id, r.revision, "revision").await?;
        let checked = self
            .designs
            .check_deadlock(&p, &credentials, &design.id, &design.document, r.max_states as u64)
            .await?;
        Ok(Response::new(deadlock_response(checked)))
    }

    #[tracing::instrument(skip_all)]
    async fn export_promela(
        &self,
        request: Request<pb::ExportPromelaRequest>,
    ) -> Result<Response<pb::ExportPromelaResponse>, Status> {
        let p = require(&request, Permission::DesignRead)?;
        let credentials = credentials(&request);
        let r = request.into_inner();
        let (design, _) = self.designs.at_revision(&p, &r.design_id, r.revision, "revision").await?;
        let (model, assumed) = self.designs.model_of(&p, &credentials, &design.id, &design.document).await?;
        Ok(Response::new(pb::ExportPromelaResponse {
            model: csp_components::deadlock::promela(&model),
            assumed_node_ids: assumed,
            source_messages: i32::from(self.designs.limits.deadlock.source_messages),
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn export_cspm(
        &self,
        request: Request<pb::ExportCspmRequest>,
    ) -> Result<Response<pb::ExportCspmResponse>, Status> {
        let p = require(&request, Permission::DesignRead)?;
        let credentials = credentials(&request);
        let r = request.into_inner();
        let (design, _) = self.designs.at_revision(&p, &r.design_id, r.revision, "revision").await?;
        let (model, assumed) = self.designs.model_of(&p, &credentials, &design.id, &design.document).await?;
        Ok(Response::new(pb::ExportCspmResponse {
            script: csp_components::deadlock::cspm(&model),
            assumed_node_ids: assumed,
            source_messages: i32::from(self.designs.limits.deadlock.source_messages),
        }))
    }
}
