//! `transform.*` and `validate.json_schema`.

use std::sync::Arc;

use csp_components::jq;
use serde_json::{Value, json};

use super::{Context, Emit, Failure, Transform, paths::Path, text};
use crate::runtime::channel::Msg;

enum SetOp {
    Set(Path, Value),
    Delete(Path),
    Rename(Path, Path),
    Copy(Path, Path),
}

/// `transform.set`: set, delete, rename and copy fields by path, in order, in place (the
/// message is copied only if another receiver still shares it).
pub(crate) struct Set {
    ops: Vec<SetOp>,
    out: usize,
}

impl Set {
    pub(crate) fn new(config: &Value, out: usize) -> Result<Self, String> {
        let operations =
            config.get("operations").and_then(Value::as_array).ok_or("`operations` is required")?;
        let ops = operations
            .iter()
            .map(|op| {
                let path = Path::parse(text(op, "path").unwrap_or_default());
                let to = || Path::parse(text(op, "to").unwrap_or_default());
                match text(op, "op").unwrap_or("set") {
                    "delete" => SetOp::Delete(path),
                    "rename" => SetOp::Rename(path, to()),
                    "copy" => SetOp::Copy(path, to()),
                    _ => SetOp::Set(path, op.get("value").cloned().unwrap_or(Value::Null)),
                }
            })
            .collect();
        Ok(Self { ops, out })
    }
}

impl Transform for Set {
    #[inline]
    fn process(&mut self, _port: usize, mut msg: Msg, out: &mut Emit) -> Result<(), Failure> {
        // Refuse before changing anything, so a failed message leaves as it came.
        for op in &self.ops {
            let check = match op {
                SetOp::Set(path, _) => path.check_set(&msg),
                SetOp::Rename(_, to) | SetOp::Copy(_, to) => to.check_set(&msg),
                SetOp::Delete(_) => Ok(()),
            };
            if let Err(e) = check {
                return Err(Failure::new(e, msg));
            }
        }
        let value = triomphe::Arc::make_mut(&mut msg);
        for op in &self.ops {
            let done = match op {
                SetOp::Set(path, new) => path.set(value, new.clone()),
                SetOp::Delete(path) => {
                    path.take(value);
                    Ok(())
                }
                SetOp::Rename(from, to) => match from.take(value) {
                    Some(moved) => to.set(value, moved),
                    None => Ok(()),
                },
                SetOp::Copy(from, to) => match from.get(value).cloned() {
                    Some(copied) => to.set(value, copied),
                    None => Ok(()),
                },
            };
            if let Err(e) = done {
                return Err(Failure::new(e, msg));
            }
        }
        out.push(self.out, msg);
        Ok(())
    }
}

/// `transform.map`: every result of a jq expression.
pub(crate) struct Map {
    filter: jq::Filter,
    out: usize,
}

impl Map {
    pub(crate) fn new(filter: jq::Filter, out: usize) -> Self {
        Self { filter, out }
    }
}

impl Transform for Map {
    fn process(&mut self, _port: usize, msg: Msg, out: &mut Emit) -> Result<(), Failure> {
        let port = self.out;
        let mut results = Vec::new();
        match self.filter.each(&msg, |value| {
            results.push(value);
            true
        }) {
            Ok(()) => {
                for value in results {
                    out.value(port, value);
                }
                Ok(())
            }
            Err(e) => Err(Failure::new(e, msg)),
        }
    }
}

/// `transform.filter`: the messages a jq predicate holds for, unchanged.
pub(crate) struct Filter {
    filter: jq::Filter,
    out: usize,
}

impl Filter {
    pub(crate) fn new(filter: jq::Filter, out: usize) -> Self {
        Self { filter, out }
    }
}

impl Transform for Filter {
    fn process(&mut self, _port: usize, msg: Msg, out: &mut Emit) -> Result<(), Failure> {
        match self.filter.test(&msg) {
            Ok(true) => {
                out.push(self.out, msg);
                Ok(())
            }
            Ok(false) => Ok(()),
            Err(e) => Err(Failure::new(e, msg)),
        }
    }
}

/// `transform.reduce`: folds messages with a jq expression over `{acc, item}`.
pub(crate) struct Reduce {
    filter: jq::Filter,
    acc: Value,
    each: bool,
    out: usize,
}

impl Reduce {
    pub(crate) fn new(config: &Value, filter: jq::Filter, out: usize) -> Self {
        Self {
            filter,
            acc: config.get("initial").cloned().unwrap_or(Value::Null),
            each: text(config, "emit") == Some("each"),
            out,
        }
    }
}

impl Transform for Reduce {
    fn process(&mut self, _port: usize, msg: Msg, out: &mut Emit) -> Result<(), Failure> {
        let input = json!({ "acc": self.acc, "item": &*msg });
        match self.filter.run(&input) {
            Ok(mut results) if !results.is_empty() => {
                self.acc = results.swap_remove(0);
                if self.each {
                    out.value(self.out, self.acc.clone());
                }
                Ok(())
            }
            Ok(_) => Err(Failure::new("the expression gave no accumulator", msg)),
            Err(e) => Err(Failure::new(e, msg)),
        }
    }

    fn finish(&mut self, out: &mut Emit) -> Result<(), String> {
        if !self.each {
            out.value(self.out, std::mem::take(&mut self.acc));
        }
        Ok(())
    }
}

/// `transform.template`: a Jinja template over the message's fields.
pub(crate) struct Template {
    env: minijinja::Environment<'static>,
    field: Option<String>,
    out: usize,
}

impl Template {
    pub(crate) fn new(config: &Value, out: usize) -> Result<Self, String> {
        let mut env = minijinja::Environment::new();
        let source = text(config, "template").ok_or("`template` is required")?.to_owned();
        env.add_template_owned("node", source)
            .map_err(|e| format!("`template` is not a valid template: {e}"))?;
        Ok(Self { env, field: text(config, "field").map(str::to_owned), out })
    }
}

/// The names a template (or prompt) sees: the message's fields, and the whole as `message`.
pub(crate) fn template_context(msg: &Value) -> Value {
    let mut context = match msg {
        Value::Object(map) => map.clone(),
        _ => serde_json::Map::new(),
    };
    context.insert("message".into(), msg.clone());
    Value::Object(context)
}

impl Transform for Template {
    fn process(&mut self, _port: usize, mut msg: Msg, out: &mut Emit) -> Result<(), Failure> {
        let rendered = match self
            .env
            .get_template("node")
            .and_then(|t| t.render(minijinja::value::Serde(template_context(&msg))))
        {
            Ok(text) => text,
            Err(e) => return Err(Failure::new(format!("the template failed: {e}"), msg)),
        };
        match &self.field {
            Some(field) => match triomphe::Arc::make_mut(&mut msg) {
                Value::Object(map) => {
                    map.insert(field.clone(), Value::String(rendered));
                    out.push(self.out, msg);
                }
                other => {
                    let what = match other {
                        Value::Array(_) => "an array",
                        Value::String(_) => "a string",
                        Value::Number(_) => "a number",
                        _ => "not an object",
                    };
                    let error = format!("cannot put the text into `{field}`: the message is {what}");
                    return Err(Failure::new(error, msg));
                }
            },
            None => out.value(self.out, Value::String(rendered)),
        }
        Ok(())
    }
}

/// `validate.json_schema`: `valid` or `invalid` (with the violations).
pub(crate) struct Validate {
    validator: Arc<jsonschema::Validator>,
    valid: usize,
    invalid: usize,
}

impl Validate {
    pub(crate) fn new(config: &Value, cx: &Context<'_>) -> Result<Self, String> {
        let schema = config.get("schema").ok_or("`schema` is required")?;
        let validator = csp_components::schema::compiled(schema).map_err(|e| format!("`schema`: {e}"))?;
        Ok(Self { validator, valid: cx.output("valid")?, invalid: cx.output("invalid")? })
    }
}

impl Transform for Validate {
    fn process(&mut self, _port: usize, msg: Msg, out: &mut Emit) -> Result<(), Failure> {
        if self.validator.is_valid(&msg) {
            out.push(self.valid, msg);
            return Ok(());
        }
        let errors: Vec<Value> = csp_components::schema::violations(&self.validator, &msg)
            .into_iter()
            .map(|v| json!({ "pointer": v.pointer, "message": v.message, "keyword": v.keyword }))
            .collect();
        out.value(self.invalid, json!({ "message": &*msg, "errors": errors }));
        Ok(())
    }
}
