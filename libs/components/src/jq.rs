//! jq filters (the `jaq` crates): compiled once, run per message.

use jaq_core::{
    Ctx, Vars, data,
    load::{Arena, File, Loader},
};
use jaq_json::Val;

/// A compiled jq filter.
pub struct Filter {
    filter: jaq_core::compile::Filter<jaq_core::Native<data::JustLut<Val>>>,
}

impl std::fmt::Debug for Filter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("jq::Filter")
    }
}

/// Compiles a jq expression, or says what is wrong and where.
pub fn compile(code: &str) -> Result<Filter, String> {
    let defs = jaq_core::defs().chain(jaq_std::defs()).chain(jaq_json::defs());
    let funs = jaq_core::funs().chain(jaq_std::funs()).chain(jaq_json::funs());
    let loader = Loader::new(defs);
    let arena = Arena::default();
    let modules = loader.load(&arena, File { code, path: () }).map_err(|errors| {
        let mut messages = Vec::new();
        for (_, error) in errors {
            match error {
                jaq_core::load::Error::Io(items) => {
                    messages.extend(items.into_iter().map(|(path, why)| format!("cannot load {path}: {why}")))
                }
                jaq_core::load::Error::Lex(items) => {
                    messages.extend(items.into_iter().map(|(expect, rest)| {
                        format!("expected {} at {}", expect.as_str(), position(code, rest))
                    }))
                }
                jaq_core::load::Error::Parse(items) => {
                    messages.extend(items.into_iter().map(|(expect, rest)| {
                        format!("expected {} at {}", expect.as_str(), position(code, rest))
                    }))
                }
            }
        }
        messages.join("; ")
    })?;
    let filter = jaq_core::Compiler::default().with_funs(funs).compile(modules).map_err(|errors| {
        errors
            .into_iter()
            .flat_map(|(_, undefined)| undefined)
            .map(|(name, kind)| format!("undefined {} `{name}`", kind.as_str()))
            .collect::<Vec<_>>()
            .join("; ")
    })?;
    Ok(Filter { filter })
}

/// "character N" for a suffix of `code` (or "the end").
fn position(code: &str, rest: &str) -> String {
    if rest.is_empty() {
        return "the end".into();
    }
    let offset = code.len().saturating_sub(rest.len());
    format!("character {}", code[..offset.min(code.len())].chars().count() + 1)
}

impl Filter {
    /// Runs the filter on a JSON value; every output, or the first error.
    pub fn run(&self, input: &serde_json::Value) -> Result<Vec<serde_json::Value>, String> {
        let mut outputs = Vec::new();
        self.each(input, |value| {
            outputs.push(value);
            true
        })?;
        Ok(outputs)
    }

    /// Runs the filter, handing each output to `f` until it returns `false`.
    pub fn each(
        &self,
        input: &serde_json::Value,
        mut f: impl FnMut(serde_json::Value) -> bool,
    ) -> Result<(), String> {
        use serde::Deserialize as _;
        let input = Val::deserialize(input).map_err(|e| format!("unreadable input: {e}"))?;
        let ctx = Ctx::<data::JustLut<Val>>::new(&self.filter.lut, Vars::new([]));
        for output in self.filter.id.run((ctx, input)).map(jaq_core::unwrap_valr) {
            let value = output.map_err(|e| e.to_string())?;
            if !f(to_json(&value)) {
                break;
            }
        }
        Ok(())
    }

    /// Whether the filter's first output is true (anything but `false` and `null`); no output
    /// is false.
    pub fn test(&self, input: &serde_json::Value) -> Result<bool, String> {
        let mut verdict = false;
        self.each(input, |value| {
            verdict = !matches!(value, serde_json::Value::Null | serde_json::Value::Bool(false));
            false
        })?;
        Ok(verdict)
    }
}

/// A jq value as JSON. Byte strings become (lossy) text; non-finite numbers become null, as
/// jq prints them.
fn to_json(value: &Val) -> serde_json::Value {
    use jaq_json::Num;
    use serde_json::Value as J;
    match value {
        Val::Null => J::Null,
        Val::Bool(b) => J::Bool(*b),
        Val::Num(Num::Int(i)) => J::from(*i as i64),
        Val::Num(Num::Float(f)) => serde_json::Number::from_f64(*f).map_or(J::Null, J::Number),
        Val::Num(other) => {
            let text = other.to_string();
            serde_json::from_str::<serde_json::Number>(&text)
                .map(J::Number)
                .or_else(|_| {
                    text.parse::<f64>().map(|f| serde_json::Number::from_f64(f).map_or(J::Null, J::Number))
                })
                .unwrap_or(J::Null)
        }
        Val::TStr(bytes) | Val::BStr(bytes) => J::String(String::from_utf8_lossy(bytes).into_owned()),
        Val::Arr(items) => J::Array(items.iter().map(to_json).collect()),
        Val::Obj(map) => J::Object(
            map.iter()
                .map(|(k, v)| {
                    let key = match k {
                        Val::TStr(b) | Val::BStr(b) => String::from_utf8_lossy(b).into_owned(),
                        other => other.to_string(),
                    };
                    (key, to_json(v))
                })
                .collect(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn filters_compile_once_and_run() {
        let f = compile(".price * .qty").unwrap();
        assert_eq!(f.run(&json!({"price": 2.5, "qty": 4})).unwrap(), [json!(10.0)]);
        let each = compile(".[] | select(. > 1)").unwrap();
        assert_eq!(each.run(&json!([1, 2, 3])).unwrap(), [json!(2), json!(3)]);
        assert_eq!(compile("map(.a) | add").unwrap().run(&json!([{"a": 1}, {"a": 2}])).unwrap(), [json!(3)]);
    }

    #[test]
    fn compiled_filters_can_move_between_threads() {
        fn send_sync<T: Send + Sync>(_: &T) {}
        send_sync(&compile(".").unwrap());
    }

    #[test]
    fn outputs_keep_their_shape() {
        let f = compile(r#"{a: 1, b: [true, null, "x", 1.5, 12345678901234]}"#).unwrap();
        assert_eq!(
            f.run(&json!(null)).unwrap(),
            [json!({"a": 1, "b": [true, null, "x", 1.5, 12345678901234_i64]})]
        );
    }

    #[test]
    fn mistakes_are_reported_with_where() {
        let err = compile(".price *").unwrap_err();
        assert!(err.contains("expected"), "{err}");
        let err = compile("nosuchfn(1)").unwrap_err();
        assert!(err.contains("undefined filter `nosuchfn`"), "{err}");
        let err = compile(".a | )").unwrap_err();
        assert!(err.contains("character"), "{err}");
    }
}
