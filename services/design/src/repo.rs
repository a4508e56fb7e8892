//! Queries of the design schema. Functions take any connection, so callers decide whether
//! they run inside a transaction.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use sea_orm::{
    ActiveModelTrait as _, ColumnTrait as _, Condition, ConnectionTrait, DbErr, EntityTrait as _,
    QueryFilter as _, QueryOrder as _, QuerySelect as _, Set,
    sea_query::{Expr, ExprTrait as _, Query},
};
use serde_json::Value;

use crate::{
    entity::{connection, design, node, revision, share, snapshot, undo_step},
    model::{Connection, Document, Meta, Node, Op, PortAddress, Position, Size},
};

fn json_text(value: &Value) -> String {
    value.to_string()
}

fn parse_json(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|_| Value::Object(Default::default()))
}

/// A live (not deleted) design.
pub(crate) async fn design(db: &impl ConnectionTrait, id: &str) -> Result<Option<design::Model>, DbErr> {
    design::Entity::find_by_id(id.to_owned()).filter(design::Column::DeletedAt.is_null()).one(db).await
}

pub(crate) fn meta_of(row: &design::Model) -> Meta {
    Meta {
        name: row.name.clone(),
        description: row.description.clone(),
        metadata: parse_json(&row.metadata),
        canvas: parse_json(&row.canvas),
        is_template: row.is_template,
    }
}

fn node_of(row: node::Model) -> Node {
    Node {
        id: row.node_id,
        type_id: row.type_id,
        type_version: row.type_version,
        label: row.label,
        config: parse_json(&row.config),
        position: Position { x: row.x, y: row.y },
        size: Size { width: row.width, height: row.height },
        style: parse_json(&row.style),
    }
}

fn connection_of(row: connection::Model) -> Connection {
    Connection {
        id: row.connection_id,
        from: PortAddress { node_id: row.from_node, port: row.from_port },
        to: PortAddress { node_id: row.to_node, port: row.to_port },
        capacity: row.capacity,
        style: parse_json(&row.style),
    }
}

/// The current document of a design.
pub(crate) async fn document(db: &impl ConnectionTrait, row: &design::Model) -> Result<Document, DbErr> {
    let nodes = node::Entity::find().filter(node::Column::DesignId.eq(row.id.clone())).all(db).await?;
    let connections =
        connection::Entity::find().filter(connection::Column::DesignId.eq(row.id.clone())).all(db).await?;
    Ok(Document {
        meta: meta_of(row),
        nodes: nodes.into_iter().map(node_of).map(|n| (n.id.clone(), n)).collect(),
        connections: connections.into_iter().map(connection_of).map(|c| (c.id.clone(), c)).collect(),
    })
}

fn node_row(design_id: &str, n: &Node) -> node::ActiveModel {
    node::ActiveModel {
        design_id: Set(design_id.to_owned()),
        node_id: Set(n.id.clone()),
        type_id: Set(n.type_id.clone()),
        type_version: Set(n.type_version.clone()),
        label: Set(n.label.clone()),
        config: Set(json_text(&n.config)),
        x: Set(n.position.x),
        y: Set(n.position.y),
        width: Set(n.size.width),
        height: Set(n.size.height),
        style: Set(json_text(&n.style)),
    }
}

fn connection_row(design_id: &str, c: &Connection) -> connection::ActiveModel {
    connection::ActiveModel {
        design_id: Set(design_id.to_owned()),
        connection_id: Set(c.id.clone()),
        from_node: Set(c.from.node_id.clone()),
        from_port: Set(c.from.port.clone()),
        to_node: Set(c.to.node_id.clone()),
        to_port: Set(c.to.port.clone()),
        capacity: Set(c.capacity),
        style: Set(json_text(&c.style)),
    }
}

/// Writes the difference between two documents of a design as row changes.
pub(crate) async fn write_changes(
    db: &impl ConnectionTrait,
    design_id: &str,
    before: &Document,
    after: &Document,
) -> Result<(), DbErr> {
    let gone_connections: Vec<String> =
        before.connections.keys().filter(|id| !after.connections.contains_key(*id)).cloned().collect();
    if !gone_connections.is_empty() {
        connection::Entity::delete_many()
            .filter(connection::Column::DesignId.eq(design_id))
            .filter(connection::Column::ConnectionId.is_in(gone_connections))
            .exec(db)
            .await?;
    }
    let gone_nodes: Vec<String> =
        before.nodes.keys().filter(|id| !after.nodes.contains_key(*id)).cloned().collect();
    if !gone_nodes.is_empty() {
        node::Entity::delete_many()
            .filter(node::Column::DesignId.eq(design_id))
            .filter(node::Column::NodeId.is_in(gone_nodes))
            .exec(db)
            .await?;
    }
    let new_nodes: Vec<node::ActiveModel> = after
        .nodes
        .values()
        .filter(|n| !before.nodes.contains_key(&n.id))
        .map(|n| node_row(design_id, n))
        .collect();
    for chunk in new_nodes.chunks(200) {
        node::Entity::insert_many(chunk.to_vec()).exec_without_returning(db).await?;
    }
    for n in after.nodes.values() {
        if before.nodes.get(&n.id).is_some_and(|old| old != n) {
            node_row(design_id, n).update(db).await?;
        }
    }
    let new_connections: Vec<connection::ActiveModel> = after
        .connections
        .values()
        .filter(|c| !before.connections.contains_key(&c.id))
        .map(|c| connection_row(design_id, c))
        .collect();
    for chunk in new_connections.chunks(200) {
        connection::Entity::insert_many(chunk.to_vec()).exec_without_returning(db).await?;
    }
    for c in after.connections.values() {
        if before.connections.get(&c.id).is_some_and(|old| old != c) {
            connection_row(design_id, c).update(db).await?;
        }
    }
    Ok(())
}

/// Moves a design from `expected` to `expected + 1` if nobody did first. This is the first
/// write of every commit: it takes the design's row lock, so concurrent commits of the same
/// design queue here and the losers see the new revision.
pub(crate) async fn bump_revision(
    db: &impl ConnectionTrait,
    id: &str,
    expected: i64,
    now: DateTime<Utc>,
) -> Result<bool, DbErr> {
    let result = design::Entity::update_many()
        .col_expr(design::Column::Revision, Expr::value(expected + 1))
        .col_expr(design::Column::UpdatedAt, Expr::value(now))
        .filter(design::Column::Id.eq(id))
        .filter(design::Column::Revision.eq(expected))
        .filter(design::Column::DeletedAt.is_null())
        .exec(db)
        .await?;
    Ok(result.rows_affected == 1)
}

/// Writes design-level fields.
pub(crate) async fn write_meta(db: &impl ConnectionTrait, id: &str, meta: &Meta) -> Result<(), DbErr> {
    design::Entity::update_many()
        .col_expr(design::Column::Name, Expr::value(meta.name.clone()))
        .col_expr(design::Column::NameKey, Expr::value(meta.name.to_lowercase()))
        .col_expr(design::Column::Description, Expr::value(meta.description.clone()))
        .col_expr(design::Column::Metadata, Expr::value(json_text(&meta.metadata)))
        .col_expr(design::Column::Canvas, Expr::value(json_text(&meta.canvas)))
        .col_expr(design::Column::IsTemplate, Expr::value(meta.is_template))
        .filter(design::Column::Id.eq(id))
        .exec(db)
        .await?;
    Ok(())
}

pub(crate) async fn insert_design(
    db: &impl ConnectionTrait,
    id: &str,
    owner_id: &str,
    meta: &Meta,
    now: DateTime<Utc>,
) -> Result<(), DbErr> {
    design::ActiveModel {
        id: Set(id.to_owned()),
        owner_id: Set(owner_id.to_owned()),
        name: Set(meta.name.clone()),
        name_key: Set(meta.name.to_lowercase()),
        description: Set(meta.description.clone()),
        metadata: Set(json_text(&meta.metadata)),
        canvas: Set(json_text(&meta.canvas)),
        is_template: Set(meta.is_template),
        revision: Set(1),
        created_at: Set(now),
        updated_at: Set(now),
        deleted_at: Set(None),
    }
    .insert(db)
    .await?;
    Ok(())
}

pub(crate) async fn set_owner(db: &impl ConnectionTrait, id: &str, owner_id: &str) -> Result<(), DbErr> {
    design::Entity::update_many()
        .col_expr(design::Column::OwnerId, Expr::value(owner_id.to_owned()))
        .filter(design::Column::Id.eq(id))
        .exec(db)
        .await?;
    Ok(())
}

pub(crate) async fn mark_deleted(
    db: &impl ConnectionTrait,
    id: &str,
    now: DateTime<Utc>,
) -> Result<(), DbErr> {
    design::Entity::update_many()
        .col_expr(design::Column::DeletedAt, Expr::value(Some(now)))
        .filter(design::Column::Id.eq(id))
        .exec(db)
        .await?;
    Ok(())
}

pub(crate) async fn insert_revision(
    db: &impl ConnectionTrait,
    design_id: &str,
    revision: i64,
    author_id: &str,
    ops: &[Op],
    summary: &str,
    now: DateTime<Utc>,
) -> Result<(), DbErr> {
    revision::ActiveModel {
        design_id: Set(design_id.to_owned()),
        revision: Set(revision),
        author_id: Set(author_id.to_owned()),
        created_at: Set(now),
        ops: Set(serde_json::to_string(ops).unwrap_or_else(|_| "[]".into())),
        op_count: Set(ops.len() as i32),
        summary: Set(summary.to_owned()),
    }
    .insert(db)
    .await?;
    Ok(())
}

pub(crate) async fn insert_snapshot(
    db: &impl ConnectionTrait,
    design_id: &str,
    revision: i64,
    document: &Document,
) -> Result<(), DbErr> {
    snapshot::ActiveModel {
        design_id: Set(design_id.to_owned()),
        revision: Set(revision),
        document: Set(serde_json::to_string(document).unwrap_or_default()),
    }
    .insert(db)
    .await?;
    Ok(())
}

/// The newest snapshot at or before `revision`.
pub(crate) async fn snapshot_before(
    db: &impl ConnectionTrait,
    design_id: &str,
    revision: i64,
) -> Result<Option<(i64, Document)>, DbErr> {
    let row = snapshot::Entity::find()
        .filter(snapshot::Column::DesignId.eq(design_id))
        .filter(snapshot::Column::Revision.lte(revision))
        .order_by_desc(snapshot::Column::Revision)
        .one(db)
        .await?;
    row.map(|r| {
        serde_json::from_str(&r.document).map(|d| (r.revision, d)).map_err(|e| {
            DbErr::Custom(format!(
                "the snapshot of design {design_id} at revision {} cannot be read: {e}",
                r.revision
            ))
        })
    })
    .transpose()
}

/// Revisions in `(after, until]`, oldest first.
pub(crate) async fn revisions_between(
    db: &impl ConnectionTrait,
    design_id: &str,
    after: i64,
    until: i64,
) -> Result<Vec<revision::Model>, DbErr> {
    revision::Entity::find()
        .filter(revision::Column::DesignId.eq(design_id))
        .filter(revision::Column::Revision.gt(after))
        .filter(revision::Column::Revision.lte(until))
        .order_by_asc(revision::Column::Revision)
        .all(db)
        .await
}

/// A page of revisions, newest first, before `before` (exclusive).
pub(crate) async fn list_revisions(
    db: &impl ConnectionTrait,
    design_id: &str,
    before: Option<i64>,
    limit: u64,
) -> Result<Vec<revision::Model>, DbErr> {
    let mut select = revision::Entity::find()
        .filter(revision::Column::DesignId.eq(design_id))
        .order_by_desc(revision::Column::Revision)
        .limit(limit);
    if let Some(before) = before {
        select = select.filter(revision::Column::Revision.lt(before));
    }
    select.all(db).await
}

pub(crate) async fn revision_row(
    db: &impl ConnectionTrait,
    design_id: &str,
    revision: i64,
) -> Result<Option<revision::Model>, DbErr> {
    revision::Entity::find_by_id((design_id.to_owned(), revision)).one(db).await
}

/// A revision's ops; an error when they cannot be read (history is never guessed at).
pub(crate) fn ops_of(row: &revision::Model) -> Result<Vec<Op>, String> {
    serde_json::from_str(&row.ops).map_err(|e| {
        format!("the ops of design {} at revision {} cannot be read: {e}", row.design_id, row.revision)
    })
}

pub(crate) async fn share(
    db: &impl ConnectionTrait,
    design_id: &str,
    user_id: &str,
) -> Result<Option<share::Model>, DbErr> {
    share::Entity::find_by_id((design_id.to_owned(), user_id.to_owned())).one(db).await
}

pub(crate) async fn upsert_share(
    db: &impl ConnectionTrait,
    design_id: &str,
    user_id: &str,
    access: &str,
    now: DateTime<Utc>,
) -> Result<share::Model, DbErr> {
    let row = share::ActiveModel {
        design_id: Set(design_id.to_owned()),
        user_id: Set(user_id.to_owned()),
        access: Set(access.to_owned()),
        created_at: Set(now),
    };
    share::Entity::insert(row)
        .on_conflict(
            sea_orm::sea_query::OnConflict::columns([share::Column::DesignId, share::Column::UserId])
                .update_columns([share::Column::Access])
                .to_owned(),
        )
        .exec_without_returning(db)
        .await?;
    share(db, design_id, user_id).await?.ok_or_else(|| DbErr::RecordNotFound("share".into()))
}

pub(crate) async fn delete_share(
    db: &impl ConnectionTrait,
    design_id: &str,
    user_id: &str,
) -> Result<u64, DbErr> {
    let result = share::Entity::delete_many()
        .filter(share::Column::DesignId.eq(design_id))
        .filter(share::Column::UserId.eq(user_id))
        .exec(db)
        .await?;
    Ok(result.rows_affected)
}

/// Which designs a listing shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Filter {
    Visible,
    Owned,
    SharedWithMe,
    Templates,
}

/// A page of designs, most recently updated first, after the `(updated_at, id)` cursor.
pub(crate) async fn list_designs(
    db: &impl ConnectionTrait,
    user_id: &str,
    admin: bool,
    filter: Filter,
    name: Option<&str>,
    after: Option<(DateTime<Utc>, String)>,
    limit: u64,
) -> Result<Vec<design::Model>, DbErr> {
    let shared = Query::select()
        .column(share::Column::DesignId)
        .from(share::Entity)
        .and_where(Expr::col(share::Column::UserId).eq(user_id))
        .to_owned();
    let scope = match filter {
        Filter::Owned => Condition::all().add(design::Column::OwnerId.eq(user_id)),
        Filter::SharedWithMe => Condition::all().add(design::Column::Id.in_subquery(shared)),
        Filter::Templates => Condition::all().add(design::Column::IsTemplate.eq(true)),
        Filter::Visible if admin => Condition::all(),
        Filter::Visible => Condition::any()
            .add(design::Column::OwnerId.eq(user_id))
            .add(design::Column::Id.in_subquery(shared))
            .add(design::Column::IsTemplate.eq(true)),
    };
    let mut select = design::Entity::find()
        .filter(design::Column::DeletedAt.is_null())
        .filter(scope)
        .order_by_desc(design::Column::UpdatedAt)
        .order_by_desc(design::Column::Id)
        .limit(limit);
    if let Some(name) = name {
        let pattern = format!(
            "%{}%",
            name.to_lowercase().replace('\\', "\\\\").replace('%', "\\%").replace('_', "\\_")
        );
        // The escape character said explicitly: SQLite has no default one.
        select = select
            .filter(design::Column::NameKey.like(sea_orm::sea_query::LikeExpr::new(pattern).escape('\\')));
    }
    if let Some((at, id)) = after {
        select = select.filter(
            Condition::any()
                .add(design::Column::UpdatedAt.lt(at))
                .add(Condition::all().add(design::Column::UpdatedAt.eq(at)).add(design::Column::Id.lt(id))),
        );
    }
    select.all(db).await
}

/// Node and connection counts of designs.
pub(crate) async fn counts(
    db: &impl ConnectionTrait,
    ids: &[String],
) -> Result<HashMap<String, (i64, i64)>, DbErr> {
    let mut out: HashMap<String, (i64, i64)> = HashMap::new();
    if ids.is_empty() {
        return Ok(out);
    }
    let nodes: Vec<(String, i64)> = node::Entity::find()
        .select_only()
        .column(node::Column::DesignId)
        .column_as(node::Column::NodeId.count(), "n")
        .filter(node::Column::DesignId.is_in(ids.iter().cloned()))
        .group_by(node::Column::DesignId)
        .into_tuple()
        .all(db)
        .await?;
    for (id, n) in nodes {
        out.entry(id).or_default().0 = n;
    }
    let connections: Vec<(String, i64)> = connection::Entity::find()
        .select_only()
        .column(connection::Column::DesignId)
        .column_as(connection::Column::ConnectionId.count(), "n")
        .filter(connection::Column::DesignId.is_in(ids.iter().cloned()))
        .group_by(connection::Column::DesignId)
        .into_tuple()
        .all(db)
        .await?;
    for (id, n) in connections {
        out.entry(id).or_default().1 = n;
    }
    Ok(out)
}

/// The caller's shares among these designs.
pub(crate) async fn shares_of(
    db: &impl ConnectionTrait,
    user_id: &str,
    ids: &[String],
) -> Result<HashMap<String, String>, DbErr> {
    if ids.is_empty() {
        return Ok(HashMap::new());
    }
    let rows = share::Entity::find()
        .filter(share::Column::UserId.eq(user_id))
        .filter(share::Column::DesignId.is_in(ids.iter().cloned()))
        .all(db)
        .await?;
    Ok(rows.into_iter().map(|s| (s.design_id, s.access)).collect())
}

// --- undo history ---

/// The step on top of a user's undo or redo stack for a design.
pub(crate) async fn top_step(
    db: &impl ConnectionTrait,
    design_id: &str,
    user_id: &str,
    stack: &str,
) -> Result<Option<undo_step::Model>, DbErr> {
    undo_step::Entity::find()
        .filter(undo_step::Column::DesignId.eq(design_id))
        .filter(undo_step::Column::UserId.eq(user_id))
        .filter(undo_step::Column::Stack.eq(stack))
        .order_by_desc(undo_step::Column::Id)
        .one(db)
        .await
}

pub(crate) async fn delete_step(db: &impl ConnectionTrait, id: i64) -> Result<(), DbErr> {
    undo_step::Entity::delete_by_id(id).exec(db).await?;
    Ok(())
}

async fn insert_step(
    db: &impl ConnectionTrait,
    design_id: &str,
    user_id: &str,
    stack: &str,
    revision: i64,
    step: String,
    now: DateTime<Utc>,
) -> Result<(), DbErr> {
    undo_step::ActiveModel {
        design_id: Set(design_id.to_owned()),
        user_id: Set(user_id.to_owned()),
        stack: Set(stack.to_owned()),
        revision: Set(revision),
        step: Set(step),
        created_at: Set(now),
        ..Default::default()
    }
    .insert(db)
    .await?;
    Ok(())
}

/// Keeps the newest `depth` steps of a stack.
async fn trim_steps(
    db: &impl ConnectionTrait,
    design_id: &str,
    user_id: &str,
    stack: &str,
    depth: usize,
) -> Result<(), DbErr> {
    let kept: Vec<i64> = undo_step::Entity::find()
        .select_only()
        .column(undo_step::Column::Id)
        .filter(undo_step::Column::DesignId.eq(design_id))
        .filter(undo_step::Column::UserId.eq(user_id))
        .filter(undo_step::Column::Stack.eq(stack))
        .order_by_desc(undo_step::Column::Id)
        .offset(depth as u64)
        .limit(1)
        .into_tuple()
        .all(db)
        .await?;
    if let Some(oldest_dropped) = kept.first() {
        undo_step::Entity::delete_many()
            .filter(undo_step::Column::DesignId.eq(design_id))
            .filter(undo_step::Column::UserId.eq(user_id))
            .filter(undo_step::Column::Stack.eq(stack))
            .filter(undo_step::Column::Id.lte(*oldest_dropped))
            .exec(db)
            .await?;
    }
    Ok(())
}

/// Records a user's new edit: on top of their undo stack (at most `depth` deep), and their
/// redo stack emptied.
pub(crate) async fn push_step(
    db: &impl ConnectionTrait,
    design_id: &str,
    user_id: &str,
    revision: i64,
    step: String,
    depth: usize,
    now: DateTime<Utc>,
) -> Result<(), DbErr> {
    undo_step::Entity::delete_many()
        .filter(undo_step::Column::DesignId.eq(design_id))
        .filter(undo_step::Column::UserId.eq(user_id))
        .filter(undo_step::Column::Stack.eq("redo"))
        .exec(db)
        .await?;
    insert_step(db, design_id, user_id, "undo", revision, step, now).await?;
    trim_steps(db, design_id, user_id, "undo", depth).await
}

/// Moves a step to the top of the other stack (undone → redo, redone → undo).
pub(crate) async fn move_step(
    db: &impl ConnectionTrait,
    row: &undo_step::Model,
    to: &str,
    depth: usize,
) -> Result<(), DbErr> {
    delete_step(db, row.id).await?;
    insert_step(db, &row.design_id, &row.user_id, to, row.revision, row.step.clone(), row.created_at).await?;
    trim_steps(db, &row.design_id, &row.user_id, to, depth).await
}
