//! Conversions between `csp.design.v1` messages and the model.

use csp_platform::FieldViolation;
use csp_proto::{design::v1 as pb, json};
use serde_json::Value;

use crate::model::{Connection, Document, Meta, Node, Op, PortAddress, Position, Size};

pub(crate) fn timestamp(time: chrono::DateTime<chrono::Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp { seconds: time.timestamp(), nanos: time.timestamp_subsec_nanos() as i32 }
}

fn object(value: Option<prost_types::Struct>) -> Value {
    value.map(json::from_struct).unwrap_or_else(|| Value::Object(Default::default()))
}

pub(crate) fn node_from_pb(node: pb::Node) -> Node {
    Node {
        id: node.id,
        type_id: node.r#type,
        type_version: node.type_version,
        label: node.label,
        config: object(node.config),
        position: node.position.map(|p| Position { x: p.x, y: p.y }).unwrap_or_default(),
        size: node.size.map(|s| Size { width: s.width, height: s.height }).unwrap_or_default(),
        style: object(node.style),
    }
}

pub(crate) fn node_to_pb(node: &Node) -> pb::Node {
    pb::Node {
        id: node.id.clone(),
        r#type: node.type_id.clone(),
        type_version: node.type_version.clone(),
        label: node.label.clone(),
        config: Some(json::to_struct(node.config.clone())),
        position: Some(pb::Position { x: node.position.x, y: node.position.y }),
        size: Some(pb::Size { width: node.size.width, height: node.size.height }),
        style: Some(json::to_struct(node.style.clone())),
    }
}

fn address_from_pb(address: Option<pb::PortAddress>) -> PortAddress {
    let address = address.unwrap_or_default();
    PortAddress { node_id: address.node_id, port: address.port }
}

pub(crate) fn connection_from_pb(connection: pb::Connection) -> Connection {
    Connection {
        id: connection.id,
        from: address_from_pb(connection.from),
        to: address_from_pb(connection.to),
        capacity: connection.capacity,
        style: object(connection.style),
    }
}

pub(crate) fn connection_to_pb(connection: &Connection) -> pb::Connection {
    pb::Connection {
        id: connection.id.clone(),
        from: Some(pb::PortAddress {
            node_id: connection.from.node_id.clone(),
            port: connection.from.port.clone(),
        }),
        to: Some(pb::PortAddress {
            node_id: connection.to.node_id.clone(),
            port: connection.to.port.clone(),
        }),
        capacity: connection.capacity,
        style: Some(json::to_struct(connection.style.clone())),
    }
}

pub(crate) fn update_node_from_pb(u: pb::UpdateNodeOp) -> Op {
    Op::UpdateNode {
        node_id: u.node_id,
        label: u.label,
        config: u.config.map(json::from_struct),
        position: u.position.map(|p| Position { x: p.x, y: p.y }),
        size: u.size.map(|s| Size { width: s.width, height: s.height }),
        style: u.style.map(json::from_struct),
        type_version: u.type_version,
    }
}

pub(crate) fn update_design_from_pb(u: pb::UpdateDesignOp) -> Op {
    Op::UpdateDesign {
        name: u.name,
        description: u.description,
        metadata: u.metadata.map(json::from_struct),
        canvas: u.canvas.map(json::from_struct),
        is_template: u.is_template,
    }
}

/// An op from the request; `field` names it in errors.
pub(crate) fn op_from_pb(op: pb::Op, field: &str) -> Result<Op, FieldViolation> {
    use pb::op::Op as K;
    Ok(match op.op {
        Some(K::AddNode(a)) => Op::AddNode {
            node: a
                .node
                .map(node_from_pb)
                .ok_or_else(|| FieldViolation::new(format!("{field}.add_node.node"), "is required"))?,
        },
        Some(K::UpdateNode(u)) => update_node_from_pb(u),
        Some(K::RemoveNode(r)) => Op::RemoveNode { node_id: r.node_id },
        Some(K::AddConnection(a)) => Op::AddConnection {
            connection: a.connection.map(connection_from_pb).ok_or_else(|| {
                FieldViolation::new(format!("{field}.add_connection.connection"), "is required")
            })?,
        },
        Some(K::UpdateConnection(u)) => Op::UpdateConnection {
            connection_id: u.connection_id,
            capacity: u.capacity,
            style: u.style.map(json::from_struct),
        },
        Some(K::RemoveConnection(r)) => Op::RemoveConnection { connection_id: r.connection_id },
        Some(K::UpdateDesign(u)) => update_design_from_pb(u),
        None => return Err(FieldViolation::new(field, "names no edit")),
    })
}

/// The name of an op's kind in the request, for field paths (`ops[2].add_node`).
pub(crate) fn op_field(op: &Op) -> &'static str {
    match op {
        Op::AddNode { .. } => "add_node",
        Op::UpdateNode { .. } => "update_node",
        Op::RemoveNode { .. } => "remove_node",
        Op::AddConnection { .. } => "add_connection",
        Op::UpdateConnection { .. } => "update_connection",
        Op::RemoveConnection { .. } => "remove_connection",
        Op::UpdateDesign { .. } => "update_design",
    }
}

pub(crate) fn op_to_pb(op: &Op) -> pb::Op {
    use pb::op::Op as K;
    let kind = match op.clone() {
        Op::AddNode { node } => K::AddNode(pb::AddNodeOp { node: Some(node_to_pb(&node)) }),
        Op::UpdateNode { node_id, label, config, position, size, style, type_version } => {
            K::UpdateNode(pb::UpdateNodeOp {
                node_id,
                label,
                config: config.map(json::to_struct),
                position: position.map(|p| pb::Position { x: p.x, y: p.y }),
                size: size.map(|s| pb::Size { width: s.width, height: s.height }),
                style: style.map(json::to_struct),
                type_version,
            })
        }
        Op::RemoveNode { node_id } => K::RemoveNode(pb::RemoveNodeOp { node_id }),
        Op::AddConnection { connection } => {
            K::AddConnection(pb::AddConnectionOp { connection: Some(connection_to_pb(&connection)) })
        }
        Op::UpdateConnection { connection_id, capacity, style } => {
            K::UpdateConnection(pb::UpdateConnectionOp {
                connection_id,
                capacity,
                style: style.map(json::to_struct),
            })
        }
        Op::RemoveConnection { connection_id } => {
            K::RemoveConnection(pb::RemoveConnectionOp { connection_id })
        }
        Op::UpdateDesign { name, description, metadata, canvas, is_template } => {
            K::UpdateDesign(pb::UpdateDesignOp {
                name,
                description,
                metadata: metadata.map(json::to_struct),
                canvas: canvas.map(json::to_struct),
                is_template,
            })
        }
    };
    pb::Op { op: Some(kind) }
}

pub(crate) fn meta_from_pb(
    name: String,
    description: String,
    metadata: Option<prost_types::Struct>,
    canvas: Option<prost_types::Struct>,
    is_template: bool,
) -> Meta {
    Meta { name, description, metadata: object(metadata), canvas: object(canvas), is_template }
}

/// The nodes and connections of a document, in id order.
pub(crate) fn content_to_pb(document: &Document) -> (Vec<pb::Node>, Vec<pb::Connection>) {
    (
        document.nodes.values().map(node_to_pb).collect(),
        document.connections.values().map(connection_to_pb).collect(),
    )
}
