//! Conversions between protobuf's JSON-like types (`Struct`, `Value`, `ListValue`) and
//! `serde_json::Value`.
//!
//! Protobuf numbers are doubles: integers beyond 2^53 lose precision on the way through, as
//! they do in JavaScript clients.

use prost_types::{ListValue, Struct, Value, value::Kind};
use serde_json::{Map, Number, Value as Json};

/// A JSON value as a protobuf `Value`.
pub fn to_value(json: Json) -> Value {
    let kind = match json {
        Json::Null => Kind::NullValue(0),
        Json::Bool(b) => Kind::BoolValue(b),
        Json::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or_default()),
        Json::String(s) => Kind::StringValue(s),
        Json::Array(items) => {
            Kind::ListValue(ListValue { values: items.into_iter().map(to_value).collect() })
        }
        Json::Object(map) => Kind::StructValue(to_struct_map(map)),
    };
    Value { kind: Some(kind) }
}

fn to_struct_map(map: Map<String, Json>) -> Struct {
    Struct { fields: map.into_iter().map(|(k, v)| (k, to_value(v))).collect() }
}

/// A JSON object as a protobuf `Struct`; anything else becomes an empty `Struct`.
pub fn to_struct(json: Json) -> Struct {
    match json {
        Json::Object(map) => to_struct_map(map),
        _ => Struct::default(),
    }
}

/// A protobuf `Value` as JSON. Whole numbers become JSON integers.
pub fn from_value(value: Value) -> Json {
    match value.kind {
        None | Some(Kind::NullValue(_)) => Json::Null,
        Some(Kind::BoolValue(b)) => Json::Bool(b),
        Some(Kind::NumberValue(n)) => number(n),
        Some(Kind::StringValue(s)) => Json::String(s),
        Some(Kind::ListValue(list)) => Json::Array(list.values.into_iter().map(from_value).collect()),
        Some(Kind::StructValue(s)) => from_struct(s),
    }
}

/// A protobuf `Struct` as a JSON object.
pub fn from_struct(value: Struct) -> Json {
    Json::Object(value.fields.into_iter().map(|(k, v)| (k, from_value(v))).collect())
}

fn number(n: f64) -> Json {
    if n.fract() == 0.0 && n.abs() < 9_007_199_254_740_992.0 {
        Json::Number(Number::from(n as i64))
    } else {
        Number::from_f64(n).map_or(Json::Null, Json::Number)
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn json_round_trips_through_struct() {
        let original = json!({ "a": 1, "b": [true, null, "x", 2.5], "c": { "d": -3 } });
        assert_eq!(from_struct(to_struct(original.clone())), original);
        assert_eq!(from_value(to_value(json!(7))), json!(7), "whole numbers stay integers");
    }
}
