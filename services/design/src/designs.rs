//! The design service's operations: who may do what, the commit pipeline every change goes
//! through, history, copies and sharing.
//!
//! A commit is one transaction whose *first* write moves the design's revision from the one the
//! caller saw to the next (`repo::bump_revision`). That write takes the design's row lock, so
//! concurrent commits of one design queue on it and every loser finds the revision moved and
//! answers FAILED_PRECONDITION — no edit is ever applied to a design its author did not see.
//! The committed ops are stored as the revision and published on the bus stream
//! `design:<id>` after the transaction commits.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use csp_components::compat::Verdict;
use futures::{StreamExt as _, stream};

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use chrono::{DateTime, SubsecRound as _, Utc};
use csp_bus::{NewEvent, SharedBus};
use csp_platform::{FieldViolation, auth::Principal, config::DesignSettings};
use csp_proto::design::v1 as pb;
use prost::Message as _;
use sea_orm::{DatabaseConnection, DatabaseTransaction, TransactionTrait as _};

use crate::{
    convert,
    entity::{design, revision},
    error::Error,
    model::{self, Document, Meta, Op, Rules},
    repo::{self, Filter},
    undo::Step,
    validate::{Credentials, Pairing, PortPair, RegistryClient, mismatch},
};

/// Events kept per design stream; collaborators further behind re-read the design.
pub(crate) const EVENTS_KEPT: u64 = 10_000;

/// The bus stream carrying a design's committed changes.
pub fn stream(design_id: &str) -> String {
    format!("design:{design_id}")
}

/// What a user may do with a design, weakest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Access {
    Viewer,
    Editor,
    Owner,
}

impl Access {
    pub(crate) fn parse(text: &str) -> Option<Self> {
        match text {
            "viewer" => Some(Access::Viewer),
            "editor" => Some(Access::Editor),
            _ => None,
        }
    }

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Access::Viewer => "viewer",
            Access::Editor => "editor",
            Access::Owner => "owner",
        }
    }
}

/// A design's content at a revision, with what the caller may do with it.
#[derive(Debug, Clone)]
pub(crate) struct Versioned {
    pub(crate) id: String,
    pub(crate) owner_id: String,
    pub(crate) revision: i64,
    pub(crate) created_at: DateTime<Utc>,
    pub(crate) updated_at: DateTime<Utc>,
    pub(crate) access: Access,
    pub(crate) document: Document,
}

impl Versioned {
    fn of(row: &design::Model, access: Access, document: Document) -> Self {
        Self {
            id: row.id.clone(),
            owner_id: row.owner_id.clone(),
            revision: row.revision,
            created_at: row.created_at,
            updated_at: row.updated_at,
            access,
            document,
        }
    }
}

/// A committed change.
#[derive(Debug, Clone)]
pub(crate) struct Committed {
    /// The design after the change.
    pub(crate) design: Versioned,
    /// The normalised ops.
    pub(crate) ops: Vec<Op>,
}

/// One design in a listing.
#[derive(Debug, Clone)]
pub(crate) struct Summary {
    pub(crate) row: design::Model,
    pub(crate) access: Access,
    pub(crate) nodes: i64,
    pub(crate) connections: i64,
}

/// A commit in progress: the transaction holds the design's row lock.
pub(crate) struct Pending {
    pub(crate) txn: DatabaseTransaction,
    row: design::Model,
    access: Access,
    /// The design as the commit finds it, under the lock.
    pub(crate) before: Document,
    revision: i64,
    now: DateTime<Utc>,
}

/// The design service's state.
pub(crate) struct Designs {
    pub(crate) db: DatabaseConnection,
    bus: SharedBus,
    pub(crate) limits: DesignSettings,
    pub(crate) registry: RegistryClient,
    users: crate::users::Users,
}

/// The current time at the database's precision (microseconds), so a listing's cursor built
/// from a row compares equal to that row on every backend.
fn now() -> DateTime<Utc> {
    Utc::now().trunc_subsecs(6)
}

fn not_found(id: &str) -> Error {
    Error::NotFound(format!("no design `{id}`"))
}

fn check_design_id(id: &str, field: &str) -> Result<(), Error> {
    if id.is_empty() {
        return Err(Error::field(field, "is required"));
    }
    if uuid::Uuid::parse_str(id).is_err() {
        return Err(Error::field(
            field,
            format!("`{}` is not a design id (a UUID)", id.chars().take(64).collect::<String>()),
        ));
    }
    Ok(())
}

fn check_user_id(id: &str, field: &str) -> Result<(), Error> {
    if id.is_empty() {
        return Err(Error::field(field, "is required"));
    }
    if id.len() > 64 || id.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(Error::field(field, "is not a user id"));
    }
    Ok(())
}

/// `(1 ..= 500, default 50)` from a request's page size.
pub(crate) fn page_size(requested: i32) -> Result<u64, Error> {
    match requested {
        0 => Ok(50),
        n if n < 0 => Err(Error::field("page_size", "must not be negative")),
        n => Ok(n.min(500) as u64),
    }
}

fn bad_token() -> Error {
    Error::field("page_token", "is not a token from a previous response")
}

fn encode_token(text: &str) -> String {
    URL_SAFE_NO_PAD.encode(text)
}

fn decode_token(token: &str) -> Result<String, Error> {
    let bytes = URL_SAFE_NO_PAD.decode(token).map_err(|_| bad_token())?;
    String::from_utf8(bytes).map_err(|_| bad_token())
}

impl Designs {
    pub(crate) fn new(
        db: DatabaseConnection,
        bus: SharedBus,
        limits: DesignSettings,
        registry: RegistryClient,
        users: crate::users::Users,
    ) -> Self {
        Self { db, bus, limits, registry, users }
    }

    pub(crate) fn rules(&self) -> Rules<'_> {
        Rules { limits: &self.limits }
    }

    // --- access ---

    /// The caller's access to a design, if any.
    async fn access_to(
        &self,
        db: &impl sea_orm::ConnectionTrait,
        p: &Principal,
        row: &design::Model,
    ) -> Result<Option<Access>, Error> {
        if row.owner_id == p.user_id || p.is_admin() {
            return Ok(Some(Access::Owner));
        }
        let shared = repo::share(db, &row.id, &p.user_id).await?.and_then(|s| Access::parse(&s.access));
        Ok(match shared {
            Some(access) => Some(access),
            None if row.is_template => Some(Access::Viewer),
            None => None,
        })
    }

    /// The design if the caller has at least `need`: strangers get NOT_FOUND (the design's
    /// existence is not revealed), those with too little access PERMISSION_DENIED.
    async fn open(
        &self,
        db: &impl sea_orm::ConnectionTrait,
        p: &Principal,
        id: &str,
        field: &str,
        need: Access,
    ) -> Result<(design::Model, Access), Error> {
        check_design_id(id, field)?;
        let row = repo::design(db, id).await?.ok_or_else(|| not_found(id))?;
        let access = self.access_to(db, p, &row).await?.ok_or_else(|| not_found(id))?;
        if access < need {
            return Err(Error::Forbidden(match need {
                Access::Owner => "only the design's owner can do this".into(),
                _ => format!("you are a {} of this design and cannot change it", access.as_str()),
            }));
        }
        Ok((row, access))
    }

    // --- reads ---

    /// The design at its current revision.
    pub(crate) async fn get(&self, p: &Principal, id: &str) -> Result<Versioned, Error> {
        let txn = csp_store::consistent_read(&self.db).await?;
        let (row, access) = self.open(&txn, p, id, "design_id", Access::Viewer).await?;
        let document = repo::document(&txn, &row).await?;
        txn.commit().await?;
        Ok(Versioned::of(&row, access, document))
    }

    /// The design at its current revision without its nodes and connections: two indexed
    /// reads at most, for callers that only need its revision or their access.
    pub(crate) async fn get_basic(&self, p: &Principal, id: &str) -> Result<Versioned, Error> {
        let (row, access) = self.open(&self.db, p, id, "design_id", Access::Viewer).await?;
        let document =
            Document { meta: repo::meta_of(&row), nodes: BTreeMap::new(), connections: BTreeMap::new() };
        Ok(Versioned::of(&row, access, document))
    }

    /// The design as it was at `revision` (0: the current one), with that revision's record.
    pub(crate) async fn at_revision(
        &self,
        p: &Principal,
        id: &str,
        revision: i64,
        field: &str,
    ) -> Result<(Versioned, Option<revision::Model>), Error> {
        let txn = csp_store::consistent_read(&self.db).await?;
        let (row, access) = self.open(&txn, p, id, "design_id", Access::Viewer).await?;
        if revision < 0 || revision > row.revision {
            return Err(Error::field(field, format!("the design has revisions 1 to {}", row.revision)));
        }
        let revision = if revision == 0 { row.revision } else { revision };
        let info = repo::revision_row(&txn, id, revision).await?;
        let document = if revision == row.revision {
            repo::document(&txn, &row).await?
        } else {
            self.replay_to(&txn, id, revision).await?
        };
        txn.commit().await?;
        let mut versioned = Versioned::of(&row, access, document);
        versioned.revision = revision;
        if let Some(info) = &info {
            versioned.updated_at = info.created_at;
        }
        Ok((versioned, info))
    }

    /// An old revision: the newest snapshot at or before it, plus the ops since.
    async fn replay_to(
        &self,
        db: &impl sea_orm::ConnectionTrait,
        id: &str,
        revision: i64,
    ) -> Result<Document, Error> {
        let (from, mut document) = repo::snapshot_before(db, id, revision).await?.ok_or_else(|| {
            Error::Internal(format!("design {id} has no snapshot at or before revision {revision}"))
        })?;
        for row in repo::revisions_between(db, id, from, revision).await? {
            let ops = repo::ops_of(&row).map_err(Error::Internal)?;
            document.replay(&ops, &self.limits).map_err(|e| {
                Error::Internal(format!("design {id}: revision {} no longer replays: {e}", row.revision))
            })?;
        }
        Ok(document)
    }

    /// A page of the designs the caller can see, most recently updated first.
    pub(crate) async fn list(
        &self,
        p: &Principal,
        filter: Filter,
        query: &str,
        page_size: u64,
        page_token: &str,
    ) -> Result<(Vec<Summary>, String), Error> {
        if query.chars().count() > self.limits.max_name_chars {
            return Err(Error::field(
                "query",
                format!("must be at most {} characters", self.limits.max_name_chars),
            ));
        }
        let after = if page_token.is_empty() {
            None
        } else {
            let text = decode_token(page_token)?;
            let (micros, id) = text.split_once('|').ok_or_else(bad_token)?;
            let micros: i64 = micros.parse().map_err(|_| bad_token())?;
            Some((DateTime::from_timestamp_micros(micros).ok_or_else(bad_token)?, id.to_owned()))
        };
        let query = query.trim();
        let rows = repo::list_designs(
            &self.db,
            &p.user_id,
            p.is_admin(),
            filter,
            (!query.is_empty()).then_some(query),
            after,
            page_size + 1,
        )
        .await?;
        let more = rows.len() as u64 > page_size;
        let rows: Vec<design::Model> = rows.into_iter().take(page_size as usize).collect();
        let ids: Vec<String> = rows.iter().map(|r| r.id.clone()).collect();
        let counts = repo::counts(&self.db, &ids).await?;
        let shares = repo::shares_of(&self.db, &p.user_id, &ids).await?;
        let next = match rows.last() {
            Some(last) if more => {
                encode_token(&format!("{}|{}", last.updated_at.timestamp_micros(), last.id))
            }
            _ => String::new(),
        };
        let summaries = rows
            .into_iter()
            .map(|row| {
                let access = if row.owner_id == p.user_id || p.is_admin() {
                    Access::Owner
                } else {
                    shares.get(&row.id).and_then(|a| Access::parse(a)).unwrap_or(Access::Viewer)
                };
                let (nodes, connections) = counts.get(&row.id).copied().unwrap_or_default();
                Summary { row, access, nodes, connections }
            })
            .collect();
        Ok((summaries, next))
    }

    /// A page of a design's history, newest first.
    pub(crate) async fn revisions(
        &self,
        p: &Principal,
        id: &str,
        page_size: u64,
        page_token: &str,
    ) -> Result<(Vec<revision::Model>, String), Error> {
        self.open(&self.db, p, id, "design_id", Access::Viewer).await?;
        let before = if page_token.is_empty() {
            None
        } else {
            Some(decode_token(page_token)?.parse::<i64>().map_err(|_| bad_token())?)
        };
        let mut rows = repo::list_revisions(&self.db, id, before, page_size + 1).await?;
        let more = rows.len() as u64 > page_size;
        rows.truncate(page_size as usize);
        let next = match rows.last() {
            Some(last) if more => encode_token(&last.revision.to_string()),
            _ => String::new(),
        };
        Ok((rows, next))
    }

    /// What differs between two revisions.
    pub(crate) async fn diff(
        &self,
        p: &Principal,
        id: &str,
        from: i64,
        to: i64,
    ) -> Result<model::Diff, Error> {
        let mut v = Vec::new();
        if from < 1 {
            v.push(FieldViolation::new("from_revision", "must be at least 1"));
        }
        if to < 1 {
            v.push(FieldViolation::new("to_revision", "must be at least 1"));
        }
        if !v.is_empty() {
            return Err(Error::fields(v));
        }
        let (before, _) = self.at_revision(p, id, from, "from_revision").await?;
        let (after, _) = self.at_revision(p, id, to, "to_revision").await?;
        Ok(model::diff(&before.document, &after.document))
    }

    // --- commits ---

    /// Starts a commit: checks access, then moves the revision from `expected` to the next.
    async fn begin(&self, p: &Principal, id: &str, expected: i64, need: Access) -> Result<Pending, Error> {
        let (row, access) = self.open(&self.db, p, id, "design_id", need).await?;
        if expected <= 0 {
            return Err(Error::field("expected_revision", "is required: the revision you last read"));
        }
        if row.revision != expected {
            return Err(Error::Stale { expected, current: row.revision });
        }
        let now = now();
        let txn = self.db.begin().await?;
        if !repo::bump_revision(&txn, id, expected, now).await? {
            drop(txn);
            let current = repo::design(&self.db, id).await?.ok_or_else(|| not_found(id))?;
            return Err(Error::Stale { expected, current: current.revision });
        }
        // Under the row lock now: this read sees the state the new revision builds on.
        let row = repo::design(&txn, id).await?.ok_or_else(|| not_found(id))?;
        let before = repo::document(&txn, &row).await?;
        Ok(Pending { txn, row, access, before, revision: expected + 1, now })
    }

    /// Starts a commit on `expected`, or, when it is 0, on whatever revision is current (a
    /// commit racing with it is retried a few times).
    pub(crate) async fn begin_at(
        &self,
        p: &Principal,
        id: &str,
        expected: i64,
        need: Access,
    ) -> Result<Pending, Error> {
        if expected != 0 {
            return self.begin(p, id, expected, need).await;
        }
        for _ in 0..5 {
            let (row, _) = self.open(&self.db, p, id, "design_id", need).await?;
            match self.begin(p, id, row.revision, need).await {
                Err(Error::Stale { .. }) => continue,
                other => return other,
            }
        }
        Err(Error::Unavailable("the design is changing too fast to apply this; retry".into()))
    }

    /// Records the change, commits, and publishes it.
    pub(crate) async fn finish(
        &self,
        p: &Principal,
        pending: Pending,
        after: Document,
        ops: Vec<Op>,
        summary: String,
        deleted: bool,
    ) -> Result<Committed, Error> {
        let Pending { txn, mut row, access, before, revision, now } = pending;
        let id = row.id.clone();
        repo::write_changes(&txn, &id, &before, &after).await?;
        if before.meta != after.meta {
            repo::write_meta(&txn, &id, &after.meta).await?;
        }
        repo::insert_revision(&txn, &id, revision, &p.user_id, &ops, &summary, now).await?;
        if revision % self.limits.snapshot_every == 0 {
            repo::insert_snapshot(&txn, &id, revision, &after).await?;
        }
        txn.commit().await?;
        row.revision = revision;
        row.updated_at = now;
        self.publish(&id, revision, &p.user_id, &ops, now, deleted).await;
        Ok(Committed { design: Versioned::of(&row, access, after), ops })
    }

    /// Applies edits as one revision. `edit` gets the document and the rules and returns the
    /// normalised ops (or the violations); `what` heads the revision's summary.
    pub(crate) async fn commit(
        &self,
        p: &Principal,
        id: &str,
        expected: i64,
        what: Option<String>,
        edit: impl FnOnce(&mut Document, &Rules<'_>) -> Result<Vec<Op>, Error> + Send,
    ) -> Result<Committed, Error> {
        let pending = self.begin(p, id, expected, Access::Editor).await?;
        let mut after = pending.before.clone();
        let ops = edit(&mut after, &self.rules())?;
        // The edit goes on its author's undo history, in the same transaction.
        let step = Step::of(&pending.before, &after, &ops);
        if !step.is_empty() {
            let step =
                serde_json::to_string(&step).map_err(|e| Error::Internal(format!("undo step: {e}")))?;
            repo::push_step(
                &pending.txn,
                id,
                &p.user_id,
                pending.revision,
                step,
                self.limits.undo_depth,
                pending.now,
            )
            .await?;
        }
        let summary = match what {
            Some(what) if ops.is_empty() => format!("{what}: no changes"),
            Some(what) => format!("{what}: {}", model::summarize(&ops)),
            None => model::summarize(&ops),
        };
        self.finish(p, pending, after, ops, summary, false).await
    }

    /// Applies a batch of ops, each with the request field it sits in. New connections are
    /// first checked against the registry (with the caller's credentials): a port the node's
    /// type does not have, or an output whose messages the input refuses, is refused.
    pub(crate) async fn apply(
        &self,
        p: &Principal,
        credentials: &Credentials,
        id: &str,
        expected: i64,
        ops: Vec<(String, Op)>,
    ) -> Result<Committed, Error> {
        if ops.is_empty() {
            return Err(Error::field("ops", "must hold at least one edit"));
        }
        if ops.iter().any(|(_, op)| matches!(op, Op::AddConnection { .. })) {
            self.check_connections(p, credentials, id, expected, &ops).await?;
        }
        self.commit(p, id, expected, None, |document, rules| apply_all(document, rules, ops)).await
    }

    /// Checks the connections a batch adds, on the document the batch would produce. Runs
    /// before the commit, so no registry call is made under the design's lock; the commit
    /// re-checks the revision, so the checked document is the one committed.
    async fn check_connections(
        &self,
        p: &Principal,
        credentials: &Credentials,
        id: &str,
        expected: i64,
        ops: &[(String, Op)],
    ) -> Result<(), Error> {
        let current = self.get(p, id).await?;
        if current.access < Access::Editor {
            return Err(Error::Forbidden(format!(
                "you are a {} of this design and cannot change it",
                current.access.as_str()
            )));
        }
        if expected > 0 && current.revision != expected {
            return Err(Error::Stale { expected, current: current.revision });
        }
        let mut document = current.document;
        apply_all(&mut document, &self.rules(), ops.to_vec())?;
        let port = |node_id: &str, port: &str| {
            let node = document.nodes.get(node_id)?;
            Some((node.type_id.clone(), node.type_version.clone(), port.to_owned()))
        };
        let added: Vec<(&String, &model::Connection, PortPair)> = ops
            .iter()
            .filter_map(|(field, op)| match op {
                Op::AddConnection { connection } => Some((field, connection)),
                _ => None,
            })
            .filter_map(|(field, c)| {
                // Ids are assigned on apply: find the connection by its ends.
                let stored = document.connections.values().find(|s| s.from == c.from && s.to == c.to)?;
                Some((
                    field,
                    stored,
                    (port(&c.from.node_id, &c.from.port)?, port(&c.to.node_id, &c.to.port)?),
                ))
            })
            .collect();
        let pairs: BTreeSet<PortPair> = added.iter().map(|(_, _, pair)| pair.clone()).collect();
        let verdicts: HashMap<PortPair, Pairing> = stream::iter(pairs)
            .map(|pair| async move {
                let verdict = self.registry.compatibility(&pair, credentials).await?;
                Ok::<_, Error>((pair, verdict))
            })
            .buffer_unordered(16)
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .collect::<Result<_, _>>()?;
        let mut violations = Vec::new();
        for (field, c, pair) in added {
            match verdicts.get(&pair) {
                Some(Pairing::UnknownPort(ports)) => {
                    for (end, why) in ports {
                        violations.push(FieldViolation::new(format!("{field}.{end}"), why.clone()));
                    }
                }
                Some(Pairing::Known(Verdict::Incompatible { pointer, reason })) => {
                    violations
                        .push(FieldViolation::new(format!("{field}.to.port"), mismatch(c, pointer, reason)));
                }
                _ => {}
            }
        }
        if violations.is_empty() { Ok(()) } else { Err(Error::fields(violations)) }
    }

    async fn publish(
        &self,
        id: &str,
        revision: i64,
        author: &str,
        ops: &[Op],
        now: DateTime<Utc>,
        deleted: bool,
    ) {
        let change = pb::DesignChange {
            design_id: id.to_owned(),
            revision,
            author_id: author.to_owned(),
            ops: ops.iter().map(convert::op_to_pb).collect(),
            time: Some(convert::timestamp(now)),
            deleted,
        };
        let event =
            NewEvent::new(change.encode_to_vec()).header("type", "design.changed").with_trace_context();
        if let Err(e) = self.bus.append(&stream(id), event, Some(EVENTS_KEPT)).await {
            // The change is committed; collaborators notice the gap by revision and re-read.
            tracing::warn!(design_id = %id, revision, error = %e, "could not publish a design change");
        }
    }

    /// Tells collaborators that a user's access changed (`None`: withdrawn), on the design's
    /// stream beside its changes.
    async fn publish_access(&self, id: &str, user_id: &str, access: Option<Access>) {
        let access = match access {
            None => pb::Access::Unspecified,
            Some(Access::Viewer) => pb::Access::Viewer,
            Some(Access::Editor) => pb::Access::Editor,
            Some(Access::Owner) => pb::Access::Owner,
        };
        let change = pb::DesignAccessChange {
            design_id: id.to_owned(),
            user_id: user_id.to_owned(),
            access: access as i32,
            time: Some(convert::timestamp(now())),
        };
        let event =
            NewEvent::new(change.encode_to_vec()).header("type", "design.access").with_trace_context();
        if let Err(e) = self.bus.append(&stream(id), event, Some(EVENTS_KEPT)).await {
            tracing::warn!(design_id = %id, error = %e, "could not publish an access change");
        }
    }

    /// A new design of the caller at revision 1, built by `ops` (each with its request field).
    async fn create_with(
        &self,
        p: &Principal,
        meta: Meta,
        meta_field: &str,
        ops: Vec<(String, Op)>,
        summary: &str,
    ) -> Result<Versioned, Error> {
        let mut v = Vec::new();
        self.rules().meta(&meta, meta_field, &mut v);
        if !v.is_empty() {
            return Err(Error::fields(v));
        }
        let mut document = Document::new(meta);
        let ops = apply_all(&mut document, &self.rules(), ops)?;
        let id = uuid::Uuid::now_v7().to_string();
        let now = now();
        let txn = self.db.begin().await?;
        repo::insert_design(&txn, &id, &p.user_id, &document.meta, now).await?;
        repo::write_changes(&txn, &id, &Document::new(document.meta.clone()), &document).await?;
        let summary = if ops.is_empty() {
            summary.to_owned()
        } else {
            format!("{summary}: {}", model::summarize(&ops))
        };
        repo::insert_revision(&txn, &id, 1, &p.user_id, &ops, &summary, now).await?;
        repo::insert_snapshot(&txn, &id, 1, &document).await?;
        txn.commit().await?;
        self.publish(&id, 1, &p.user_id, &ops, now, false).await;
        Ok(Versioned {
            id,
            owner_id: p.user_id.clone(),
            revision: 1,
            created_at: now,
            updated_at: now,
            access: Access::Owner,
            document,
        })
    }

    /// An empty design.
    pub(crate) async fn create(&self, p: &Principal, meta: Meta) -> Result<Versioned, Error> {
        self.create_with(p, meta, "", Vec::new(), "created the design").await
    }

    /// A new design of the caller with a document's content (import): `ops` build it, each
    /// with the request field it came from; `meta_field` prefixes the design-level fields.
    pub(crate) async fn create_from(
        &self,
        p: &Principal,
        meta: Meta,
        meta_field: &str,
        ops: Vec<(String, Op)>,
        summary: &str,
    ) -> Result<Versioned, Error> {
        self.create_with(p, meta, meta_field, ops, summary).await
    }

    /// A new design of the caller holding a copy of `document`.
    async fn copy(
        &self,
        p: &Principal,
        document: Document,
        field: &str,
        summary: &str,
    ) -> Result<Versioned, Error> {
        let empty = Document::new(document.meta.clone());
        let ops =
            model::ops_between(&empty, &document).into_iter().map(|op| (field.to_owned(), op)).collect();
        self.create_with(p, document.meta, "", ops, summary).await
    }

    /// Copies a design the caller can read.
    pub(crate) async fn duplicate(&self, p: &Principal, id: &str, name: &str) -> Result<Versioned, Error> {
        let source = self.get(p, id).await?;
        let mut document = source.document;
        document.meta.name =
            if name.is_empty() { self.copy_name(&document.meta.name) } else { name.to_owned() };
        document.meta.is_template = false;
        self.copy(p, document, "design_id", &format!("duplicated design {id}")).await
    }

    /// A new design from a template.
    pub(crate) async fn instantiate(&self, p: &Principal, id: &str, name: &str) -> Result<Versioned, Error> {
        let source = self.get_as(p, id, "template_id").await?;
        if !source.document.meta.is_template {
            return Err(Error::Precondition {
                message: format!("design `{id}` is not a template"),
                reason: "NOT_A_TEMPLATE",
            });
        }
        let mut document = source.document;
        if !name.is_empty() {
            document.meta.name = name.to_owned();
        }
        document.meta.is_template = false;
        self.copy(p, document, "template_id", &format!("created from template {id}")).await
    }

    async fn get_as(&self, p: &Principal, id: &str, field: &str) -> Result<Versioned, Error> {
        let txn = csp_store::consistent_read(&self.db).await?;
        let (row, access) = self.open(&txn, p, id, field, Access::Viewer).await?;
        let document = repo::document(&txn, &row).await?;
        txn.commit().await?;
        Ok(Versioned::of(&row, access, document))
    }

    fn copy_name(&self, name: &str) -> String {
        let suffix = " (copy)";
        let keep = self.limits.max_name_chars.saturating_sub(suffix.chars().count());
        format!("{}{suffix}", name.chars().take(keep).collect::<String>())
    }

    /// Makes an old revision's content current, as a new revision.
    pub(crate) async fn restore(
        &self,
        p: &Principal,
        id: &str,
        expected: i64,
        revision: i64,
    ) -> Result<Committed, Error> {
        if revision < 1 {
            return Err(Error::field("revision", "must be at least 1"));
        }
        let (old, _) = self.at_revision(p, id, revision, "revision").await?;
        let target = old.document;
        self.commit(p, id, expected, Some(format!("restored revision {revision}")), move |document, rules| {
            let ops = model::ops_between(document, &target)
                .into_iter()
                .map(|op| ("revision".to_owned(), op))
                .collect();
            apply_all(document, rules, ops)
        })
        .await
    }

    /// Deletes a design (owner or admin); it disappears from reads and listings.
    pub(crate) async fn delete(&self, p: &Principal, id: &str, expected: i64) -> Result<(), Error> {
        let pending = self.begin(p, id, expected, Access::Owner).await?;
        repo::mark_deleted(&pending.txn, id, pending.now).await?;
        let after = pending.before.clone();
        self.finish(p, pending, after, Vec::new(), "deleted the design".into(), true).await?;
        Ok(())
    }

    /// Makes another user the owner; the previous owner keeps editor access.
    pub(crate) async fn transfer(
        &self,
        p: &Principal,
        credentials: &Credentials,
        id: &str,
        expected: i64,
        new_owner: &str,
    ) -> Result<Committed, Error> {
        check_user_id(new_owner, "new_owner_id")?;
        let pending = self.begin(p, id, expected, Access::Owner).await?;
        let previous = pending.row.owner_id.clone();
        if previous == new_owner {
            return Err(Error::field("new_owner_id", "already owns the design"));
        }
        // Never to an account that does not exist (the design would be nobody's).
        if !self.users.exists(credentials, new_owner).await? {
            return Err(Error::field("new_owner_id", "names no active user"));
        }
        repo::set_owner(&pending.txn, id, new_owner).await?;
        repo::delete_share(&pending.txn, id, new_owner).await?;
        repo::upsert_share(&pending.txn, id, &previous, Access::Editor.as_str(), pending.now).await?;
        let after = pending.before.clone();
        let summary = format!("transferred ownership from {previous} to {new_owner}");
        let mut committed = self.finish(p, pending, after, Vec::new(), summary, false).await?;
        self.publish_access(id, new_owner, Some(Access::Owner)).await;
        self.publish_access(id, &previous, Some(Access::Editor)).await;
        committed.design.owner_id = new_owner.to_owned();
        if p.user_id == previous && !p.is_admin() {
            committed.design.access = Access::Editor;
        }
        Ok(committed)
    }

    /// Grants a user viewer or editor access (owner or admin).
    pub(crate) async fn share(
        &self,
        p: &Principal,
        id: &str,
        user_id: &str,
        access: Access,
    ) -> Result<(String, Access, DateTime<Utc>), Error> {
        check_user_id(user_id, "user_id")?;
        let (row, _) = self.open(&self.db, p, id, "design_id", Access::Owner).await?;
        if row.owner_id == user_id {
            return Err(Error::field("user_id", "owns the design"));
        }
        let share = repo::upsert_share(&self.db, id, user_id, access.as_str(), now()).await?;
        self.publish_access(id, user_id, Some(access)).await;
        Ok((share.user_id, access, share.created_at))
    }

    /// Removes a user's access: the owner or an admin for anyone, a user for themselves.
    pub(crate) async fn unshare(&self, p: &Principal, id: &str, user_id: &str) -> Result<(), Error> {
        check_user_id(user_id, "user_id")?;
        let need = if user_id == p.user_id { Access::Viewer } else { Access::Owner };
        self.open(&self.db, p, id, "design_id", need).await?;
        if repo::delete_share(&self.db, id, user_id).await? == 0 {
            return Err(Error::NotFound(format!("design `{id}` is not shared with `{user_id}`")));
        }
        self.publish_access(id, user_id, None).await;
        Ok(())
    }

    /// The content of a design the caller can read, at a revision (0: current), for
    /// validation of sub-designs. `None` when it does not exist or the caller cannot read it.
    pub(crate) async fn readable(
        &self,
        p: &Principal,
        id: &str,
        revision: i64,
    ) -> Result<Option<Document>, Error> {
        match self.at_revision(p, id, revision, "revision").await {
            Ok((versioned, _)) => Ok(Some(versioned.document)),
            Err(Error::NotFound(_) | Error::Invalid { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }
}

/// Applies ops in order, collecting every violation; all or nothing.
pub(crate) fn apply_all(
    document: &mut Document,
    rules: &Rules<'_>,
    ops: Vec<(String, Op)>,
) -> Result<Vec<Op>, Error> {
    let mut committed = Vec::with_capacity(ops.len());
    let mut violations = Vec::new();
    let mut seen = HashSet::new();
    for (field, op) in ops {
        if let Err(v) = document.apply(op, rules, &field, &mut committed) {
            for violation in v {
                if seen.insert((violation.field.clone(), violation.description.clone())) {
                    violations.push(violation);
                }
            }
            if violations.len() >= 50 {
                break;
            }
        }
    }
    if violations.is_empty() { Ok(committed) } else { Err(Error::fields(violations)) }
}
