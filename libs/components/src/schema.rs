//! Configuration checks against JSON Schema (the `jsonschema` crate), with a JSON pointer per
//! violation, and defaults filled in from the schema.
//!
//! Remote `$ref`s are never fetched: schemas come from users, and resolving URLs on their
//! behalf would let them make the registry call arbitrary hosts.

use std::{
    sync::{Arc, LazyLock},
    time::Duration,
};

use serde_json::{Map, Value};

/// Compiled validators kept, by schema text: the most used, each until it has not been used
/// for an hour.
const CACHE_CAPACITY: u64 = 1024;
const CACHE_IDLE: Duration = Duration::from_secs(3600);

/// One way a value breaks its schema.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// JSON pointer to the offending value; `""` is the whole configuration.
    pub pointer: String,
    /// What is wrong, for people.
    pub message: String,
    /// The JSON Schema keyword (or rule) that failed.
    pub keyword: String,
}

impl Violation {
    /// A violation of a rule beyond JSON Schema.
    pub fn rule(pointer: impl Into<String>, message: impl Into<String>) -> Self {
        Self { pointer: pointer.into(), message: message.into(), keyword: "rule".into() }
    }
}

/// Escapes a property name for a JSON pointer (RFC 6901).
pub fn escape(segment: &str) -> String {
    segment.replace('~', "~0").replace('/', "~1")
}

/// Checks that `schema` is a usable JSON Schema: valid against its meta-schema, compilable,
/// with no references outside itself.
pub fn check_schema(schema: &Value) -> Result<(), String> {
    if !(schema.is_object() || schema.is_boolean()) {
        return Err("a JSON Schema must be an object or a boolean".into());
    }
    jsonschema::meta::validate(schema).map_err(|e| {
        let at = e.instance_path().as_str();
        if at.is_empty() { e.to_string() } else { format!("{e} (at {at})") }
    })?;
    compiled(schema).map(|_| ())
}

/// The compiled validator of a schema (cached by schema text).
pub fn compiled(schema: &Value) -> Result<Arc<jsonschema::Validator>, String> {
    static CACHE: LazyLock<moka::sync::Cache<String, Arc<jsonschema::Validator>>> = LazyLock::new(|| {
        moka::sync::Cache::builder().max_capacity(CACHE_CAPACITY).time_to_idle(CACHE_IDLE).build()
    });
    CACHE
        .try_get_with(schema.to_string(), || {
            jsonschema::validator_for(schema).map(Arc::new).map_err(|e| e.to_string())
        })
        .map_err(|e| (*e).clone())
}

/// Validates `value` against `schema`; on success returns it with schema defaults filled in.
pub fn validate(schema: &Value, value: &Value) -> Result<Value, Vec<Violation>> {
    let validator = compiled(schema)
        .map_err(|e| vec![Violation::rule("", format!("the schema itself is invalid: {e}"))])?;
    let violations = violations(&validator, value);
    if !violations.is_empty() {
        return Err(violations);
    }
    let mut effective = value.clone();
    fill_defaults(schema, &mut effective);
    Ok(effective)
}

/// Every way `value` breaks the validator's schema, each with its JSON pointer.
pub fn violations(validator: &jsonschema::Validator, value: &Value) -> Vec<Violation> {
    let mut violations = Vec::new();
    for error in validator.iter_errors(value) {
        let at = error.instance_path().as_str().to_owned();
        let keyword = error.kind().keyword().to_owned();
        match error.kind() {
            jsonschema::error::ValidationErrorKind::Required { property } => {
                let name = property.as_str().map(str::to_owned).unwrap_or_else(|| property.to_string());
                violations.push(Violation {
                    pointer: format!("{at}/{}", escape(&name)),
                    message: "is required".into(),
                    keyword,
                });
            }
            jsonschema::error::ValidationErrorKind::AdditionalProperties { unexpected } => {
                for name in unexpected {
                    violations.push(Violation {
                        pointer: format!("{at}/{}", escape(name)),
                        message: "is not a known setting".into(),
                        keyword: keyword.clone(),
                    });
                }
            }
            _ => violations.push(Violation { pointer: at, message: error.to_string(), keyword }),
        }
    }
    violations
}

/// Adds the `default` of every absent property the schema declares, recursively.
pub fn fill_defaults(schema: &Value, value: &mut Value) {
    let Some(schema) = schema.as_object() else { return };
    match value {
        Value::Object(object) => {
            if let Some(Value::Object(properties)) = schema.get("properties") {
                for (name, property) in properties {
                    match object.get_mut(name) {
                        Some(existing) => fill_defaults(property, existing),
                        None => {
                            if let Some(default) = property.get("default") {
                                let mut default = default.clone();
                                fill_defaults(property, &mut default);
                                object.insert(name.clone(), default);
                            }
                        }
                    }
                }
            }
        }
        Value::Array(items) => {
            if let Some(item_schema) = schema.get("items") {
                for item in items {
                    fill_defaults(item_schema, item);
                }
            }
        }
        _ => {}
    }
}

/// An object schema from `(name, property schema)` pairs, with `required` names and no other
/// properties allowed.
pub fn object(properties: &[(&str, Value)], required: &[&str]) -> Value {
    let properties: Map<String, Value> =
        properties.iter().map(|(k, v)| ((*k).to_owned(), v.clone())).collect();
    serde_json::json!({
        "type": "object",
        "properties": properties,
        "required": required,
        "additionalProperties": false,
    })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn a_schema_in_use_stays_compiled_when_many_others_pass_through() {
        let busy = json!({ "type": "object", "properties": { "busy": { "type": "integer" } } });
        let first = compiled(&busy).unwrap();
        // Twice the cache's capacity of schemas used once each, the busy one used all along.
        for i in 0..2 * CACHE_CAPACITY {
            compiled(&json!({ "type": "object", "properties": { format!("p{i}"): { "type": "string" } } }))
                .unwrap();
            if i % 4 == 0 {
                assert!(Arc::ptr_eq(&first, &compiled(&busy).unwrap()), "compiled again after {i} others");
            }
        }
    }

    #[test]
    fn violations_point_at_the_offending_value() {
        let schema = json!({
            "type": "object",
            "properties": {
                "size": { "type": "integer", "minimum": 1, "default": 10 },
                "items": { "type": "array", "items": object(&[("path", json!({"type": "string"}))], &["path"]) },
            },
            "required": ["items"],
            "additionalProperties": false,
        });
        let err = validate(&schema, &json!({ "size": 0, "items": [{}, { "path": 3 }], "colour": "red" }))
            .unwrap_err();
        let pointers: Vec<&str> = err.iter().map(|v| v.pointer.as_str()).collect();
        assert!(pointers.contains(&"/size"), "{err:?}");
        assert!(pointers.contains(&"/items/0/path"), "{err:?}");
        assert!(pointers.contains(&"/items/1/path"), "{err:?}");
        assert!(pointers.contains(&"/colour"), "{err:?}");
        assert_eq!(validate(&schema, &json!({})).unwrap_err()[0].pointer, "/items");

        let ok = validate(&schema, &json!({ "items": [] })).unwrap();
        assert_eq!(ok, json!({ "size": 10, "items": [] }), "defaults are filled in");
    }

    #[test]
    fn schemas_are_checked_before_use() {
        assert!(check_schema(&json!({ "type": "object" })).is_ok());
        assert!(check_schema(&json!({ "type": 5 })).is_err());
        assert!(check_schema(&json!({ "minimum": "zero" })).is_err());
        assert!(check_schema(&json!("string")).is_err());
        let remote = check_schema(&json!({ "$ref": "http://169.254.169.254/latest/meta-data" }));
        assert!(remote.is_err(), "remote references are not fetched");
    }
}
