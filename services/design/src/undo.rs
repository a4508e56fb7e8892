//! Per-user undo and redo.
//!
//! Every edit a user commits is remembered as a [`Step`]: the elements it touched, each as it
//! was before and after. Undoing puts back exactly what the step changed — the elements it
//! added, removed or changed, and of a changed element only the fields that changed — on top
//! of whatever the design is now, so other people's later edits stay. Where someone else has
//! since changed one of those fields, removed an element the undo would restore, re-used an id
//! the undo would need, or attached a connection to a node the undo would remove, the step does
//! not apply and [`Step::revert`] names the conflicting elements instead: nobody's work is
//! clobbered. Redo is the same with before and after swapped.
//!
//! Steps live in the database (`undo_steps`), one undo and one redo stack per user per design,
//! at most `design.undo_depth` deep.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize, de::DeserializeOwned};
use serde_json::{Map, Value};

use crate::{
    designs::{Access, Committed, Designs},
    error::Error,
    model::{self, Connection, Document, Meta, Node, Op},
    repo,
};

/// One element an edit touched: as it was before and after (`None`: absent).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Touched<T> {
    id: String,
    before: Option<T>,
    after: Option<T>,
}

impl<T: Clone> Touched<T> {
    fn inverse(&self) -> Self {
        Self { id: self.id.clone(), before: self.after.clone(), after: self.before.clone() }
    }
}

/// What one edit changed, enough to revert or re-apply it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct Step {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    nodes: Vec<Touched<Node>>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    connections: Vec<Touched<Connection>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    meta: Option<Touched<Meta>>,
}

/// Which way a step is taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Direction {
    Undo,
    Redo,
}

impl Direction {
    /// The stack the step is taken from.
    pub(crate) fn stack(self) -> &'static str {
        match self {
            Direction::Undo => "undo",
            Direction::Redo => "redo",
        }
    }

    fn other(self) -> Self {
        match self {
            Direction::Undo => Direction::Redo,
            Direction::Redo => Direction::Undo,
        }
    }

    fn verb(self) -> &'static str {
        match self {
            Direction::Undo => "undid",
            Direction::Redo => "redid",
        }
    }
}

fn fields_of<T: Serialize>(item: &T) -> Map<String, Value> {
    match serde_json::to_value(item) {
        Ok(Value::Object(map)) => map,
        _ => Map::new(),
    }
}

impl Step {
    /// What `ops` (as committed) changed between `before` and `after`.
    pub(crate) fn of(before: &Document, after: &Document, ops: &[Op]) -> Step {
        let mut node_ids = BTreeSet::new();
        let mut connection_ids = BTreeSet::new();
        let mut meta = false;
        for op in ops {
            match op {
                Op::AddNode { node } => node_ids.insert(node.id.clone()),
                Op::UpdateNode { node_id, .. } | Op::RemoveNode { node_id } => {
                    node_ids.insert(node_id.clone())
                }
                Op::AddConnection { connection } => connection_ids.insert(connection.id.clone()),
                Op::UpdateConnection { connection_id, .. } | Op::RemoveConnection { connection_id } => {
                    connection_ids.insert(connection_id.clone())
                }
                Op::UpdateDesign { .. } => {
                    meta = true;
                    true
                }
            };
        }
        fn touched<T: Clone + PartialEq>(
            ids: BTreeSet<String>,
            before: &BTreeMap<String, T>,
            after: &BTreeMap<String, T>,
        ) -> Vec<Touched<T>> {
            ids.into_iter()
                .map(|id| Touched { before: before.get(&id).cloned(), after: after.get(&id).cloned(), id })
                .filter(|t| t.before != t.after)
                .collect()
        }
        Step {
            nodes: touched(node_ids, &before.nodes, &after.nodes),
            connections: touched(connection_ids, &before.connections, &after.connections),
            meta: (meta && before.meta != after.meta).then(|| Touched {
                id: "design".into(),
                before: Some(before.meta.clone()),
                after: Some(after.meta.clone()),
            }),
        }
    }

    /// Whether the edit changed nothing.
    pub(crate) fn is_empty(&self) -> bool {
        self.nodes.is_empty() && self.connections.is_empty() && self.meta.is_none()
    }

    /// The step the other way round: reverting it re-applies this one.
    pub(crate) fn inverse(&self) -> Step {
        Step {
            nodes: self.nodes.iter().map(Touched::inverse).collect(),
            connections: self.connections.iter().map(Touched::inverse).collect(),
            meta: self.meta.as_ref().map(Touched::inverse),
        }
    }

    /// `current` with this step reverted, or the elements that others changed since (as
    /// `node \`a\``, `connection \`c\``, `design name`).
    pub(crate) fn revert(&self, current: &Document) -> Result<Document, Vec<String>> {
        let mut target = current.clone();
        let mut conflicts = Vec::new();
        for t in &self.nodes {
            restore(&mut target.nodes, current.nodes.get(&t.id), t, "node", &mut conflicts);
        }
        for t in &self.connections {
            restore(&mut target.connections, current.connections.get(&t.id), t, "connection", &mut conflicts);
        }
        if let Some(t) = &self.meta
            && let (Some(before), Some(after)) = (&t.before, &t.after)
        {
            match revert_fields(&current.meta, before, after) {
                Ok(meta) => target.meta = meta,
                Err(fields) => conflicts.extend(fields.into_iter().map(|f| format!("design {f}"))),
            }
        }
        // Every connection must still join two nodes: one that others attached to a node this
        // would remove, or one this would restore to a node others removed, is a conflict.
        let restored: BTreeSet<&str> = self.connections.iter().map(|t| t.id.as_str()).collect();
        for c in target.connections.values() {
            for end in [&c.from.node_id, &c.to.node_id] {
                if !target.nodes.contains_key(end) {
                    conflicts.push(if restored.contains(c.id.as_str()) {
                        format!("node `{end}`")
                    } else {
                        format!("connection `{}`", c.id)
                    });
                }
            }
        }
        if conflicts.is_empty() {
            Ok(target)
        } else {
            let mut seen = BTreeSet::new();
            conflicts.retain(|c| seen.insert(c.clone()));
            Err(conflicts)
        }
    }
}

/// Puts one element back as it was before, if it is as the step left it.
fn restore<T>(
    map: &mut BTreeMap<String, T>,
    current: Option<&T>,
    t: &Touched<T>,
    what: &str,
    conflicts: &mut Vec<String>,
) where
    T: Clone + PartialEq + Serialize + DeserializeOwned,
{
    let conflict = || format!("{what} `{}`", t.id);
    match (&t.before, &t.after, current) {
        // Added by the step: remove it, unless it was changed or removed since.
        (None, Some(after), Some(now)) if now == after => {
            map.remove(&t.id);
        }
        // Removed by the step: add it back, unless the id was taken since.
        (Some(before), None, None) => {
            map.insert(t.id.clone(), before.clone());
        }
        // Changed by the step: put back the fields it changed, unless they changed since.
        (Some(before), Some(after), Some(now)) => match revert_fields(now, before, after) {
            Ok(reverted) => {
                map.insert(t.id.clone(), reverted);
            }
            Err(_) => conflicts.push(conflict()),
        },
        (None, None, _) => {}
        _ => conflicts.push(conflict()),
    }
}

/// `now` with the fields that differ between `before` and `after` set back to `before`, or
/// the names of those fields whose value is no longer `after`.
fn revert_fields<T: Serialize + DeserializeOwned + Clone>(
    now: &T,
    before: &T,
    after: &T,
) -> Result<T, Vec<String>> {
    let (before, after, mut now_fields) = (fields_of(before), fields_of(after), fields_of(now));
    let mut changed_since = Vec::new();
    for (key, old) in &before {
        let new = after.get(key);
        if new == Some(old) {
            continue;
        }
        if now_fields.get(key) != new {
            changed_since.push(key.clone());
            continue;
        }
        now_fields.insert(key.clone(), old.clone());
    }
    if !changed_since.is_empty() {
        return Err(changed_since);
    }
    serde_json::from_value(Value::Object(now_fields)).map_err(|_| vec!["fields".to_owned()])
}

/// How many conflicting elements an error names at most.
const NAMED: usize = 20;

impl Designs {
    /// Undoes (or redoes) the caller's last edit of a design, as a new revision. Returns the
    /// commit and the revision whose edit it reverted.
    pub(crate) async fn step(
        &self,
        p: &csp_platform::auth::Principal,
        id: &str,
        expected: i64,
        direction: Direction,
    ) -> Result<(Committed, i64), Error> {
        let pending = self.begin_at(p, id, expected, Access::Editor).await?;
        let Some(row) = repo::top_step(&pending.txn, id, &p.user_id, direction.stack()).await? else {
            let what = match direction {
                Direction::Undo => ("NOTHING_TO_UNDO", "you have no edit of this design to undo"),
                Direction::Redo => ("NOTHING_TO_REDO", "you have no undone edit of this design to redo"),
            };
            return Err(Error::Precondition { reason: what.0, message: what.1.into() });
        };
        let stored: Step = serde_json::from_str(&row.step)
            .map_err(|e| Error::Internal(format!("undo step {} of design {id}: {e}", row.id)))?;
        let step = match direction {
            Direction::Undo => stored.clone(),
            Direction::Redo => stored.inverse(),
        };
        let target = match step.revert(&pending.before) {
            Ok(target) => target,
            Err(elements) => {
                // Nothing was written: the revision stays. The step can never apply cleanly,
                // so it leaves the history (else it would block every older one).
                drop(pending);
                repo::delete_step(&self.db, row.id).await?;
                let reason = match direction {
                    Direction::Undo => "UNDO_CONFLICT",
                    Direction::Redo => "REDO_CONFLICT",
                };
                let mut named: Vec<&str> = elements.iter().take(NAMED).map(String::as_str).collect();
                if elements.len() > NAMED {
                    named.push("…");
                }
                return Err(Error::Conflict {
                    message: format!(
                        "revision {} cannot be {}: others have since changed {}; it was taken off your {} history",
                        row.revision,
                        match direction {
                            Direction::Undo => "undone",
                            Direction::Redo => "redone",
                        },
                        named.join(", "),
                        direction.stack(),
                    ),
                    reason,
                    elements: elements.into_iter().take(NAMED).collect(),
                });
            }
        };
        let ops = model::ops_between(&pending.before, &target);
        let mut after = pending.before.clone();
        let ops = crate::designs::apply_all(
            &mut after,
            &self.rules(),
            ops.into_iter().map(|op| (String::new(), op)).collect(),
        )?;
        repo::move_step(&pending.txn, &row, direction.other().stack(), self.limits.undo_depth).await?;
        let summary = format!("{} revision {}: {}", direction.verb(), row.revision, model::summarize(&ops));
        let committed = self.finish(p, pending, after, ops, summary, false).await?;
        Ok((committed, row.revision))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use serde_json::json;

    use super::*;
    use crate::model::{PortAddress, Position};

    fn node(id: &str) -> Node {
        Node {
            id: id.into(),
            type_id: "transform.set".into(),
            type_version: String::new(),
            label: String::new(),
            config: json!({}),
            position: Position::default(),
            size: Default::default(),
            style: json!({}),
        }
    }

    fn connection(id: &str, from: &str, to: &str) -> Connection {
        Connection {
            id: id.into(),
            from: PortAddress { node_id: from.into(), port: "out".into() },
            to: PortAddress { node_id: to.into(), port: "in".into() },
            capacity: 0,
            style: json!({}),
        }
    }

    fn doc(nodes: &[Node], connections: &[Connection]) -> Document {
        let mut d = Document::new(Meta {
            name: "d".into(),
            description: String::new(),
            metadata: json!({}),
            canvas: json!({}),
            is_template: false,
        });
        d.nodes = nodes.iter().map(|n| (n.id.clone(), n.clone())).collect();
        d.connections = connections.iter().map(|c| (c.id.clone(), c.clone())).collect();
        d
    }

    fn moved(id: &str, x: f64) -> Node {
        Node { position: Position { x, y: 0.0 }, ..node(id) }
    }

    #[test]
    fn undo_keeps_other_peoples_later_edits() {
        // Ada moves `a`; then Bob adds `b` and relabels `a`.
        let start = doc(&[node("a")], &[]);
        let ada = doc(&[moved("a", 10.0)], &[]);
        let step = Step::of(
            &start,
            &ada,
            &[Op::UpdateNode {
                node_id: "a".into(),
                label: None,
                config: None,
                position: Some(Position { x: 10.0, y: 0.0 }),
                size: None,
                style: None,
                type_version: None,
            }],
        );
        let mut bob = ada.clone();
        bob.nodes.get_mut("a").unwrap().label = "Bob's".into();
        bob.nodes.insert("b".into(), node("b"));
        let undone = step.revert(&bob).unwrap();
        assert_eq!(undone.nodes["a"].position.x, 0.0, "Ada's move is reverted");
        assert_eq!(undone.nodes["a"].label, "Bob's", "Bob's label stays");
        assert!(undone.nodes.contains_key("b"), "Bob's node stays");
        // Redo is the inverse.
        let redone = step.inverse().revert(&undone).unwrap();
        assert_eq!(redone, bob);
    }

    #[test]
    fn conflicts_name_the_elements_others_changed() {
        let start = doc(&[node("a")], &[]);
        let ada = doc(&[moved("a", 10.0), node("n")], &[]);
        let ops = [
            Op::AddNode { node: node("n") },
            Op::UpdateNode {
                node_id: "a".into(),
                label: None,
                config: None,
                position: Some(Position { x: 10.0, y: 0.0 }),
                size: None,
                style: None,
                type_version: None,
            },
        ];
        let step = Step::of(&start, &ada, &ops);
        // Bob moves `a` too, and connects his node to Ada's new `n`.
        let mut bob = ada.clone();
        bob.nodes.insert("a".into(), moved("a", 20.0));
        bob.nodes.insert("z".into(), node("z"));
        bob.connections.insert("cz".into(), connection("cz", "z", "n"));
        let conflicts = step.revert(&bob).unwrap_err();
        assert_eq!(conflicts, ["node `a`", "connection `cz`"]);
    }

    #[test]
    fn restoring_a_removed_node_needs_its_neighbours() {
        let start = doc(&[node("a"), node("b")], &[connection("c", "a", "b")]);
        let removed = doc(&[node("b")], &[]);
        let ops =
            [Op::RemoveConnection { connection_id: "c".into() }, Op::RemoveNode { node_id: "a".into() }];
        let step = Step::of(&start, &removed, &ops);
        assert_eq!(step.revert(&removed).unwrap(), start);
        // Bob removes `b` meanwhile: the connection cannot come back.
        let conflicts = step.revert(&doc(&[], &[])).unwrap_err();
        assert_eq!(conflicts, ["node `b`"]);
        // Bob re-used the id `a`.
        let conflicts = step.revert(&doc(&[node("a"), node("b")], &[])).unwrap_err();
        assert_eq!(conflicts, ["node `a`"]);
    }

    #[test]
    fn design_fields_revert_one_by_one() {
        let start = doc(&[], &[]);
        let mut renamed = start.clone();
        renamed.meta.name = "Ada's name".into();
        let step = Step::of(
            &start,
            &renamed,
            &[Op::UpdateDesign {
                name: Some("Ada's name".into()),
                description: None,
                metadata: None,
                canvas: None,
                is_template: None,
            }],
        );
        let mut later = renamed.clone();
        later.meta.description = "Bob's words".into();
        let undone = step.revert(&later).unwrap();
        assert_eq!(undone.meta.name, "d");
        assert_eq!(undone.meta.description, "Bob's words");
        later.meta.name = "Bob's name".into();
        assert_eq!(step.revert(&later).unwrap_err(), ["design name"]);
        assert!(Step::of(&start, &start, &[]).is_empty());
    }
}
