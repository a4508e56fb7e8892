//! May an output port feed an input port? The output's message schema must be a structural
//! subset of the input's: every message the output may send is one the input accepts.
//!
//! Three verdicts:
//! - [`Verdict::Compatible`]: proven (same schema, an input that accepts anything, or a subset);
//! - [`Verdict::Unchecked`]: nothing conflicts, but the output promises less than the input
//!   asks (an untyped output, a number without the input's minimum): the executor checks
//!   such messages when they arrive;
//! - [`Verdict::Incompatible`]: a real conflict — different types, a required field the output
//!   cannot have, a value outside the input's `enum` — with the JSON pointer where it is.
//!
//! The check understands `type`, `enum`, `const`, `properties`, `required`,
//! `additionalProperties`, `items`, numeric and length bounds, and `anyOf`/`oneOf`; keywords it
//! does not model make the verdict at most `Unchecked`, never a false `Compatible`.

use std::cmp::Ordering;

use serde_json::{Map, Value};

use crate::schema::escape;

/// The outcome of a compatibility check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Every message the output may send is accepted.
    Compatible,
    /// No conflict, but some messages are only checked at run time.
    Unchecked {
        /// Where the output promises less than the input asks.
        pointer: String,
    },
    /// Some messages the output may send are refused.
    Incompatible {
        /// Where the conflict is.
        pointer: String,
        /// What it is.
        reason: String,
    },
}

impl Verdict {
    fn and(self, other: Verdict) -> Verdict {
        match (self, other) {
            (v @ Verdict::Incompatible { .. }, _) | (_, v @ Verdict::Incompatible { .. }) => v,
            (v @ Verdict::Unchecked { .. }, _) | (_, v @ Verdict::Unchecked { .. }) => v,
            _ => Verdict::Compatible,
        }
    }

    fn unchecked(pointer: &str) -> Verdict {
        Verdict::Unchecked { pointer: pointer.to_owned() }
    }

    fn incompatible(pointer: &str, reason: impl Into<String>) -> Verdict {
        Verdict::Incompatible { pointer: pointer.to_owned(), reason: reason.into() }
    }
}

/// Checks whether messages valid against `output` are valid against `input`.
pub fn check(output: &Value, input: &Value) -> Verdict {
    subset(output, input, "")
}

const MODELLED: &[&str] = &[
    "type",
    "enum",
    "const",
    "properties",
    "required",
    "additionalProperties",
    "items",
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "exclusiveMaximum",
    "minLength",
    "maxLength",
    "minItems",
    "maxItems",
    "anyOf",
    "oneOf",
    "title",
    "description",
    "default",
    "examples",
    "$comment",
    "format",
    "pattern",
];

fn accepts_anything(schema: &Value) -> bool {
    match schema {
        Value::Bool(b) => *b,
        Value::Object(map) => map
            .keys()
            .all(|k| matches!(k.as_str(), "title" | "description" | "default" | "examples" | "$comment")),
        _ => false,
    }
}

/// JSON types a schema allows, if it says.
fn types(schema: &Map<String, Value>) -> Option<Vec<String>> {
    if let Some(t) = schema.get("type") {
        return match t {
            Value::String(s) => Some(vec![s.clone()]),
            Value::Array(a) => Some(a.iter().filter_map(|v| v.as_str().map(str::to_owned)).collect()),
            _ => None,
        };
    }
    let values = values_of(schema)?;
    Some(values.iter().map(|v| type_of(v).to_owned()).collect())
}

/// The exact values a schema allows, if it lists them.
fn values_of(schema: &Map<String, Value>) -> Option<Vec<Value>> {
    if let Some(c) = schema.get("const") {
        return Some(vec![c.clone()]);
    }
    schema.get("enum").and_then(Value::as_array).cloned()
}

fn type_of(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

fn type_fits(sub: &str, sup: &[String]) -> bool {
    sup.iter().any(|t| t == sub || (t == "number" && sub == "integer"))
}

fn subset(sub: &Value, sup: &Value, at: &str) -> Verdict {
    if accepts_anything(sup) || sub == sup || sub == &Value::Bool(false) {
        return Verdict::Compatible;
    }
    if sup == &Value::Bool(false) {
        return Verdict::incompatible(at, "the input accepts nothing here");
    }
    if accepts_anything(sub) {
        return Verdict::unchecked(at);
    }
    let (Some(sub), Some(sup)) = (sub.as_object(), sup.as_object()) else {
        return Verdict::unchecked(at);
    };

    // Alternatives on the output side: every one must fit.
    for key in ["anyOf", "oneOf"] {
        if let Some(branches) = sub.get(key).and_then(Value::as_array) {
            let mut rest = sub.clone();
            rest.remove(key);
            return branches.iter().fold(Verdict::Compatible, |verdict, branch| {
                let mut merged = rest.clone();
                if let Some(b) = branch.as_object() {
                    merged.extend(b.clone());
                }
                verdict.and(subset(&Value::Object(merged), &Value::Object(sup.clone()), at))
            });
        }
    }
    // Alternatives on the input side: one must fit.
    for key in ["anyOf", "oneOf"] {
        if let Some(branches) = sup.get(key).and_then(Value::as_array) {
            let verdicts: Vec<Verdict> =
                branches.iter().map(|b| subset(&Value::Object(sub.clone()), b, at)).collect();
            if verdicts.contains(&Verdict::Compatible) {
                return Verdict::Compatible;
            }
            return verdicts.into_iter().find(|v| matches!(v, Verdict::Unchecked { .. })).unwrap_or_else(
                || Verdict::incompatible(at, "the output fits none of the input's alternatives"),
            );
        }
    }

    let mut verdict = Verdict::Compatible;
    if sup.keys().any(|k| !MODELLED.contains(&k.as_str())) {
        verdict = verdict.and(Verdict::unchecked(at));
    }

    // Types.
    let sub_types = types(sub);
    if let Some(sup_types) = types(sup) {
        match &sub_types {
            Some(sub_types) => {
                if let Some(bad) = sub_types.iter().find(|t| !type_fits(t, &sup_types)) {
                    return Verdict::incompatible(
                        at,
                        format!("the output may send {bad}, the input takes {}", sup_types.join(" or ")),
                    );
                }
            }
            None => verdict = verdict.and(Verdict::unchecked(at)),
        }
    }

    // Exact values.
    if let Some(allowed) = values_of(sup) {
        match values_of(sub) {
            Some(values) => {
                if let Some(bad) = values.iter().find(|v| !allowed.contains(v)) {
                    return Verdict::incompatible(
                        at,
                        format!("the output may send {bad}, which the input does not accept"),
                    );
                }
            }
            None if sub_types.is_some() => {
                return Verdict::incompatible(
                    at,
                    "the input accepts only listed values; the output does not promise them",
                );
            }
            None => verdict = verdict.and(Verdict::unchecked(at)),
        }
    }

    // Bounds: the output must promise at least as tight a bound.
    for (key, tighter) in [
        ("minimum", Ordering::Greater),
        ("exclusiveMinimum", Ordering::Greater),
        ("maximum", Ordering::Less),
        ("exclusiveMaximum", Ordering::Less),
        ("minLength", Ordering::Greater),
        ("maxLength", Ordering::Less),
        ("minItems", Ordering::Greater),
        ("maxItems", Ordering::Less),
    ] {
        if let Some(limit) = sup.get(key).and_then(Value::as_f64) {
            let promised = sub.get(key).and_then(Value::as_f64);
            let ok = match promised {
                Some(p) => p == limit || p.partial_cmp(&limit) == Some(tighter),
                None => false,
            };
            if !ok {
                verdict = verdict.and(Verdict::unchecked(&format!("{at}/{key}")));
            }
        }
    }
    if let Some(pattern) = sup.get("pattern")
        && sub.get("pattern") != Some(pattern)
    {
        verdict = verdict.and(Verdict::unchecked(at));
    }

    // Objects.
    let empty = Map::new();
    let sub_props = sub.get("properties").and_then(Value::as_object).unwrap_or(&empty);
    let sup_props = sup.get("properties").and_then(Value::as_object).unwrap_or(&empty);
    let sub_closed = sub.get("additionalProperties") == Some(&Value::Bool(false));
    let sub_required: Vec<&str> = sub
        .get("required")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    if let Some(required) = sup.get("required").and_then(Value::as_array) {
        for name in required.iter().filter_map(Value::as_str) {
            if !sub_required.contains(&name) {
                let pointer = format!("{at}/{}", escape(name));
                if sub_closed && !sub_props.contains_key(name) {
                    return Verdict::incompatible(
                        &pointer,
                        format!("the input requires `{name}`, which the output never has"),
                    );
                }
                return Verdict::incompatible(
                    &pointer,
                    format!("the input requires `{name}`, which the output does not promise"),
                );
            }
        }
    }
    for (name, sup_schema) in sup_props {
        let pointer = format!("{at}/{}", escape(name));
        match sub_props.get(name) {
            Some(sub_schema) => verdict = verdict.and(subset(sub_schema, sup_schema, &pointer)),
            None if sub_closed => {}
            None if accepts_anything(sup_schema) => {}
            None => verdict = verdict.and(Verdict::unchecked(&pointer)),
        }
    }
    if sup.get("additionalProperties") == Some(&Value::Bool(false)) {
        if let Some(extra) = sub_props.keys().find(|k| !sup_props.contains_key(*k)) {
            return Verdict::incompatible(
                &format!("{at}/{}", escape(extra)),
                format!("the input does not take `{extra}`"),
            );
        }
        if !sub_closed {
            verdict = verdict.and(Verdict::unchecked(at));
        }
    } else if let Some(extra_schema) = sup.get("additionalProperties").filter(|v| v.is_object()) {
        for (name, sub_schema) in sub_props.iter().filter(|(k, _)| !sup_props.contains_key(*k)) {
            verdict = verdict.and(subset(sub_schema, extra_schema, &format!("{at}/{}", escape(name))));
        }
    }

    // Arrays.
    if let Some(sup_items) = sup.get("items") {
        let sub_items = sub.get("items").cloned().unwrap_or(Value::Bool(true));
        verdict = verdict.and(subset(&sub_items, sup_items, &format!("{at}/items")));
    }
    verdict
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn verdict(output: Value, input: Value) -> Verdict {
        check(&output, &input)
    }

    #[test]
    fn same_schema_and_any_input_are_compatible() {
        let order =
            json!({ "type": "object", "properties": { "id": { "type": "string" } }, "required": ["id"] });
        assert_eq!(verdict(order.clone(), order.clone()), Verdict::Compatible);
        assert_eq!(verdict(order, json!({})), Verdict::Compatible);
        assert_eq!(verdict(json!({ "type": "integer" }), json!({ "type": "number" })), Verdict::Compatible);
    }

    #[test]
    fn structural_subsets_are_compatible() {
        let output = json!({
            "type": "object",
            "properties": { "id": { "type": "string" }, "amount": { "type": "integer", "minimum": 1 }, "extra": { "type": "boolean" } },
            "required": ["id", "amount"]
        });
        let input = json!({
            "type": "object",
            "properties": { "amount": { "type": "number", "minimum": 0 } },
            "required": ["amount"]
        });
        assert_eq!(verdict(output, input), Verdict::Compatible);
        let small = json!({ "enum": ["a", "b"] });
        assert_eq!(verdict(small, json!({ "type": "string", "enum": ["a", "b", "c"] })), Verdict::Compatible);
        let either = json!({ "anyOf": [{ "type": "integer" }, { "type": "number" }] });
        assert_eq!(verdict(either, json!({ "type": "number" })), Verdict::Compatible);
    }

    #[test]
    fn conflicts_are_incompatible_with_where() {
        let text =
            json!({ "type": "object", "properties": { "v": { "type": "string" } }, "required": ["v"] });
        let number =
            json!({ "type": "object", "properties": { "v": { "type": "number" } }, "required": ["v"] });
        match verdict(text, number) {
            Verdict::Incompatible { pointer, reason } => {
                assert_eq!(pointer, "/v");
                assert!(reason.contains("string"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
        let missing = verdict(
            json!({ "type": "object", "properties": { "a": {} } }),
            json!({ "type": "object", "required": ["b"] }),
        );
        assert!(
            matches!(missing, Verdict::Incompatible { ref pointer, .. } if pointer == "/b"),
            "{missing:?}"
        );
        let outside = verdict(json!({ "enum": ["x", "z"] }), json!({ "enum": ["x", "y"] }));
        assert!(matches!(outside, Verdict::Incompatible { .. }), "{outside:?}");
        assert!(matches!(
            verdict(json!({ "type": "array" }), json!({ "type": "object" })),
            Verdict::Incompatible { .. }
        ));
    }

    #[test]
    fn promising_less_is_checked_at_run_time() {
        assert_eq!(
            verdict(json!({}), json!({ "type": "object" })),
            Verdict::Unchecked { pointer: String::new() }
        );
        let loose = verdict(json!({ "type": "number" }), json!({ "type": "number", "minimum": 0 }));
        assert_eq!(loose, Verdict::Unchecked { pointer: "/minimum".into() });
        let odd = verdict(
            json!({ "type": "string" }),
            json!({ "type": "string", "contentMediaType": "text/html" }),
        );
        assert!(matches!(odd, Verdict::Unchecked { .. }), "keywords not modelled never prove compatibility");
    }
}
