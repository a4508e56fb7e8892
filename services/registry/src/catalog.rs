//! The catalogue in memory: every version of every type, loaded from the database. Reads are
//! served from here (design validation asks about every node of a design); writes go to the
//! database and then reload it, here and — through the bus — on every other replica.

use std::{collections::BTreeMap, sync::Arc};

use chrono::{DateTime, Utc};
use csp_components::{Category, ComponentSpec};
use semver::Version;

use crate::entity::component_type;

/// Reachability of a remote component.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Availability {
    Unknown,
    Available,
    Unavailable,
}

impl Availability {
    pub(crate) fn parse(text: &str) -> Self {
        match text {
            "available" => Availability::Available,
            "unavailable" => Availability::Unavailable,
            _ => Availability::Unknown,
        }
    }

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Availability::Available => "available",
            Availability::Unavailable => "unavailable",
            Availability::Unknown => "",
        }
    }
}

/// Where a remote component is served, and how it was last seen.
#[derive(Debug, Clone)]
pub(crate) struct Remote {
    pub(crate) address: String,
    pub(crate) timeout_ms: i32,
    pub(crate) availability: Availability,
    pub(crate) last_checked_at: Option<DateTime<Utc>>,
    pub(crate) last_error: String,
}

/// One published version of a type.
#[derive(Debug, Clone)]
pub(crate) struct Entry {
    pub(crate) spec: ComponentSpec,
    pub(crate) version: Version,
    pub(crate) builtin: bool,
    pub(crate) deprecated: bool,
    pub(crate) deprecation_message: String,
    pub(crate) remote: Option<Remote>,
    pub(crate) created_at: DateTime<Utc>,
}

impl Entry {
    pub(crate) fn from_row(row: component_type::Model) -> Option<Self> {
        let spec: ComponentSpec = match serde_json::from_str(&row.spec) {
            Ok(spec) => spec,
            Err(error) => {
                tracing::error!(type_id = %row.type_id, version = %row.version, %error, "unreadable component type; skipped");
                return None;
            }
        };
        let version = Version::parse(&row.version).ok()?;
        Some(Self {
            spec,
            version,
            builtin: row.builtin,
            deprecated: row.deprecated,
            deprecation_message: row.deprecation_message,
            remote: row.remote_address.map(|address| Remote {
                address,
                timeout_ms: row.remote_timeout_ms,
                availability: Availability::parse(&row.availability),
                last_checked_at: row.last_checked_at,
                last_error: row.last_error,
            }),
            created_at: row.created_at,
        })
    }
}

/// Filters of a listing.
#[derive(Debug, Clone, Default)]
pub(crate) struct Query {
    pub(crate) category: Option<Category>,
    pub(crate) text: String,
    pub(crate) include_deprecated: bool,
    pub(crate) after: Option<String>,
    pub(crate) limit: usize,
}

/// Every version of every type.
#[derive(Debug, Default)]
pub(crate) struct Catalog {
    types: BTreeMap<String, BTreeMap<Version, Arc<Entry>>>,
}

impl Catalog {
    pub(crate) fn from_rows(rows: Vec<component_type::Model>) -> Self {
        let mut types: BTreeMap<String, BTreeMap<Version, Arc<Entry>>> = BTreeMap::new();
        for entry in rows.into_iter().filter_map(Entry::from_row) {
            types
                .entry(entry.spec.type_id.clone())
                .or_default()
                .insert(entry.version.clone(), Arc::new(entry));
        }
        Self { types }
    }

    /// The highest version of a type.
    pub(crate) fn latest(&self, type_id: &str) -> Option<&Arc<Entry>> {
        self.types.get(type_id).and_then(|versions| versions.values().next_back())
    }

    /// A pinned version, or the latest.
    pub(crate) fn get(&self, type_id: &str, version: Option<&Version>) -> Option<&Arc<Entry>> {
        match version {
            Some(version) => self.types.get(type_id).and_then(|versions| versions.get(version)),
            None => self.latest(type_id),
        }
    }

    /// Every version of a type, newest first.
    pub(crate) fn versions(&self, type_id: &str) -> Vec<String> {
        self.types.get(type_id).map(|v| v.keys().rev().map(ToString::to_string).collect()).unwrap_or_default()
    }

    pub(crate) fn contains(&self, type_id: &str) -> bool {
        self.types.contains_key(type_id)
    }

    /// The latest version of each matching type, by type id, after the cursor; and whether
    /// there are more.
    pub(crate) fn list(&self, query: &Query) -> (Vec<Arc<Entry>>, bool) {
        let text = query.text.trim().to_lowercase();
        let mut matching = self
            .types
            .iter()
            .filter(|(id, _)| query.after.as_deref().is_none_or(|after| id.as_str() > after))
            .filter_map(|(_, versions)| versions.values().next_back())
            .filter(|e| query.include_deprecated || !e.deprecated)
            .filter(|e| query.category.is_none_or(|c| e.spec.category == c))
            .filter(|e| text.is_empty() || matches_text(&e.spec, &text));
        let page: Vec<Arc<Entry>> = matching.by_ref().take(query.limit).cloned().collect();
        let more = matching.next().is_some();
        (page, more)
    }

    /// Non-deprecated types per category.
    pub(crate) fn counts(&self) -> BTreeMap<Category, usize> {
        let mut counts = BTreeMap::new();
        for entry in self.types.values().filter_map(|v| v.values().next_back()).filter(|e| !e.deprecated) {
            *counts.entry(entry.spec.category).or_default() += 1;
        }
        counts
    }

    /// Every remote endpoint in use (latest, non-deprecated versions), with their types.
    pub(crate) fn remote_addresses(&self) -> BTreeMap<String, Vec<(String, String)>> {
        let mut addresses: BTreeMap<String, Vec<(String, String)>> = BTreeMap::new();
        for versions in self.types.values() {
            for entry in versions.values().filter(|e| !e.deprecated) {
                if let Some(remote) = &entry.remote {
                    addresses
                        .entry(remote.address.clone())
                        .or_default()
                        .push((entry.spec.type_id.clone(), entry.version.to_string()));
                }
            }
        }
        addresses
    }
}

fn matches_text(spec: &ComponentSpec, text: &str) -> bool {
    spec.type_id.to_lowercase().contains(text)
        || spec.display_name.to_lowercase().contains(text)
        || spec.description.to_lowercase().contains(text)
        || spec.tags.iter().any(|t| t.to_lowercase().contains(text))
}
