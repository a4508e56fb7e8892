//! The exported design document (format `csp-designer.design`, version 1): a design's content
//! without its identity, owner, revision or timestamps, so that exporting, importing and
//! exporting again gives the same bytes. The schema is documented in the crate README.
//!
//! Canonical form: pretty-printed JSON (two-space indent, a final newline), object keys in
//! lexicographic order at every level, nodes and connections ordered by id, every field
//! present.

use serde::{Deserialize, Serialize};

use crate::model::{Connection, Document, Meta, Node};

/// The format's name.
pub const FORMAT: &str = "csp-designer.design";
/// The format's version.
pub const FORMAT_VERSION: i32 = 1;

/// The document as written.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Exported {
    format: String,
    format_version: i32,
    design: Meta,
    nodes: Vec<Node>,
    connections: Vec<Connection>,
}

/// A design's content as a document.
pub fn export(document: &Document) -> String {
    let exported = Exported {
        format: FORMAT.to_owned(),
        format_version: FORMAT_VERSION,
        design: document.meta.clone(),
        nodes: document.nodes.values().cloned().collect(),
        connections: document.connections.values().cloned().collect(),
    };
    // Through `Value`: its maps are ordered, so struct fields come out sorted like the
    // free-form objects inside them.
    let value = serde_json::to_value(&exported).unwrap_or_default();
    let mut text = serde_json::to_string_pretty(&value).unwrap_or_default();
    text.push('\n');
    text
}

/// The parts of an imported document; the caller checks them with the usual rules.
#[derive(Debug)]
pub struct Imported {
    /// Design-level fields.
    pub meta: Meta,
    /// Nodes, in document order.
    pub nodes: Vec<Node>,
    /// Connections, in document order.
    pub connections: Vec<Connection>,
}

/// Parses a document, saying where it is wrong.
pub fn import(text: &str) -> Result<Imported, String> {
    /// The header alone, so a document of another format or version is named as such rather
    /// than refused for fields this version does not know.
    #[derive(Deserialize)]
    struct Header {
        format: Option<String>,
        format_version: Option<i64>,
    }
    let header: Header = serde_json::from_str(text).map_err(|e| format!("not a design document: {e}"))?;
    match header.format.as_deref() {
        Some(FORMAT) => {}
        Some(other) => return Err(format!("`format` is `{other}`; expected `{FORMAT}`")),
        None => return Err(format!("`format` is missing; expected `{FORMAT}`")),
    }
    match header.format_version {
        Some(v) if v == i64::from(FORMAT_VERSION) => {}
        Some(v) => {
            return Err(format!(
                "format version {v} is not supported; this service reads version {FORMAT_VERSION}"
            ));
        }
        None => return Err("`format_version` is missing".into()),
    }
    let mut deserializer = serde_json::Deserializer::from_str(text);
    let exported: Exported = serde_path_to_error::deserialize(&mut deserializer).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        // serde_json's message already names line and column.
        if path == "." || path.is_empty() { inner.to_string() } else { format!("at `{path}`: {inner}") }
    })?;
    Ok(Imported { meta: exported.design, nodes: exported.nodes, connections: exported.connections })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::model::{PortAddress, Position, Size};

    fn sample() -> Document {
        let mut d = Document::new(Meta {
            name: "Orders".into(),
            description: "Cleans orders".into(),
            metadata: json!({ "z": 1, "a": [1.5, "x"] }),
            canvas: json!({ "zoom": 1.25 }),
            is_template: false,
        });
        for (id, t) in [("b", "transform.map"), ("a", "source.constant")] {
            d.nodes.insert(
                id.into(),
                Node {
                    id: id.into(),
                    type_id: t.into(),
                    type_version: String::new(),
                    label: id.to_uppercase(),
                    config: json!({ "expression": ".", "count": 3 }),
                    position: Position { x: 10.0, y: -2.5 },
                    size: Size { width: 120.0, height: 40.0 },
                    style: json!({}),
                },
            );
        }
        d.connections.insert(
            "c1".into(),
            Connection {
                id: "c1".into(),
                from: PortAddress { node_id: "a".into(), port: "out".into() },
                to: PortAddress { node_id: "b".into(), port: "in".into() },
                capacity: 0,
                style: json!({ "color": "#fff" }),
            },
        );
        d
    }

    #[test]
    fn export_import_export_is_byte_identical() {
        let text = export(&sample());
        let imported = import(&text).unwrap();
        let mut again = Document::new(imported.meta);
        again.nodes = imported.nodes.into_iter().map(|n| (n.id.clone(), n)).collect();
        again.connections = imported.connections.into_iter().map(|c| (c.id.clone(), c)).collect();
        assert_eq!(export(&again), text);
        assert!(text.starts_with("{\n  \"connections\": ["), "{text}");
        assert!(text.find("\"a\"").unwrap() < text.find("\"b\"").unwrap(), "nodes ordered by id");
    }

    #[test]
    fn bad_documents_say_where() {
        let good: serde_json::Value = serde_json::from_str(&export(&sample())).unwrap();
        let mut unknown = good.clone();
        unknown["nodes"][1]["colour"] = json!("red");
        let e = import(&unknown.to_string()).unwrap_err();
        assert!(e.contains("nodes[1]") && e.contains("colour"), "{e}");

        let mut wrong = good.clone();
        wrong["connections"][0]["capacity"] = json!("many");
        let e = import(&wrong.to_string()).unwrap_err();
        assert!(e.contains("connections[0].capacity"), "{e}");

        let mut version = good;
        version["format_version"] = json!(7);
        assert!(import(&version.to_string()).unwrap_err().contains("version 7"));

        let deep = format!(
            r#"{{"format":"{FORMAT}","format_version":1,"design":{{"name":"x"}},"nodes":[{{"id":"a","type":"t.t","config":{}1{}}}],"connections":[]}}"#,
            r#"{"a":"#.repeat(10_000),
            "}".repeat(10_000)
        );
        assert!(import(&deep).unwrap_err().contains("recursion limit"));
        assert!(import("{} trailing").is_err());
    }
}
