//! The built-in component types.

use serde_json::{Value, json};

use crate::{
    Behaviour, Category, ComponentSpec, ExampleSpec, PortSpec, ReadMode, Violation, WriteMode, schema::object,
};

const V1: &str = "1.0.0";

fn any() -> Value {
    json!({})
}

fn error_message() -> Value {
    json!({
        "type": "object",
        "description": "A message that could not be processed, with why.",
        "properties": {
            "message": { "description": "The message as it arrived." },
            "error": { "type": "string" },
            "node_id": { "type": "string" },
            "attempts": { "type": "integer", "minimum": 1 }
        },
        "required": ["message", "error"]
    })
}

fn error_port() -> PortSpec {
    PortSpec::output("error", "Messages that failed (with the `route` error policy).", error_message())
}

fn input() -> PortSpec {
    PortSpec::input("in", "Messages to process.", any(), true, true)
}

fn output() -> PortSpec {
    PortSpec::output("out", "Processed messages.", any())
}

fn behaviour(read: ReadMode, write: WriteMode, buffers: bool) -> Behaviour {
    Behaviour { read, write, buffers }
}

fn example(title: &str, description: &str, config: Value) -> ExampleSpec {
    ExampleSpec { title: title.into(), description: description.into(), config, input: None, output: None }
}

fn example_io(title: &str, description: &str, config: Value, input: Value, output: Value) -> ExampleSpec {
    ExampleSpec {
        title: title.into(),
        description: description.into(),
        config,
        input: Some(input),
        output: Some(output),
    }
}

#[allow(clippy::too_many_arguments)]
fn spec(
    type_id: &str,
    category: Category,
    display_name: &str,
    description: &str,
    icon: &str,
    inputs: Vec<PortSpec>,
    outputs: Vec<PortSpec>,
    config_schema: Value,
    examples: Vec<ExampleSpec>,
    behaviour: Behaviour,
    tags: &[&str],
) -> ComponentSpec {
    ComponentSpec {
        type_id: type_id.into(),
        version: V1.into(),
        category,
        display_name: display_name.into(),
        description: description.into(),
        icon: icon.into(),
        inputs,
        outputs,
        dynamic_ports: false,
        config_schema,
        examples,
        behaviour: Some(behaviour),
        tags: tags.iter().map(|t| (*t).to_owned()).collect(),
    }
}

fn dynamic(mut spec: ComponentSpec) -> ComponentSpec {
    spec.dynamic_ports = true;
    spec
}

/// A dotted path into a message, e.g. `payload.items.0.name`.
fn path_schema(description: &str) -> Value {
    json!({ "type": "string", "minLength": 1, "maxLength": 512, "pattern": r"^[^.\s][^\s]*$", "description": description })
}

fn jq_schema(description: &str) -> Value {
    json!({ "type": "string", "minLength": 1, "maxLength": 10000, "description": description })
}

fn port_name_schema() -> Value {
    json!({ "type": "string", "pattern": "^[a-z][a-z0-9_]{0,31}$" })
}

fn provider_model() -> [(&'static str, Value); 2] {
    [
        (
            "provider",
            json!({ "type": "string", "description": "Provider name; empty means the default.", "default": "" }),
        ),
        (
            "model",
            json!({ "type": "string", "description": "Model name; empty means the provider's default.", "default": "" }),
        ),
    ]
}

pub(crate) fn all() -> Vec<ComponentSpec> {
    let mut specs = Vec::new();

    // --- sources ---
    specs.push(spec(
        "source.input",
        Category::Source,
        "Execution input",
        "Emits the messages the execution was started with for this node, in order, then closes.",
        "log-in",
        vec![],
        vec![PortSpec::output("out", "The execution's input messages.", any())],
        object(
            &[
                ("name", json!({ "type": "string", "maxLength": 64, "description": "Name of the input, shown to whoever starts the execution; defaults to the node id." })),
                ("schema", json!({ "type": "object", "description": "JSON Schema every input message must match." })),
            ],
            &[],
        ),
        vec![example("Orders", "An input named `orders` whose messages must be objects.", json!({ "name": "orders", "schema": { "type": "object" } }))],
        behaviour(ReadMode::None, WriteMode::Many, false),
        &["input", "start"],
    ));
    specs.push(spec(
        "source.constant",
        Category::Source,
        "Constant",
        "Emits the same message a number of times, then closes.",
        "pin",
        vec![],
        vec![PortSpec::output("out", "The constant.", any())],
        object(
            &[
                ("value", json!({ "description": "The message to emit." })),
                ("count", json!({ "type": "integer", "minimum": 1, "maximum": 1_000_000_000, "default": 1 })),
            ],
            &["value"],
        ),
        vec![example(
            "Greeting",
            "Three greetings.",
            json!({ "value": { "greeting": "hello" }, "count": 3 }),
        )],
        behaviour(ReadMode::None, WriteMode::Many, false),
        &["value", "fixed"],
    ));
    specs.push(spec(
        "source.sequence",
        Category::Source,
        "Sequence",
        "Emits the numbers start, start+step, ... (count of them), each as a number or as an object field.",
        "list-ordered",
        vec![],
        vec![PortSpec::output("out", "Numbers, or objects holding them.", json!({ "type": ["number", "object"] }))],
        object(
            &[
                ("start", json!({ "type": "integer", "default": 0 })),
                ("count", json!({ "type": "integer", "minimum": 0, "maximum": 10_000_000_000_i64 })),
                ("step", json!({ "type": "integer", "default": 1, "not": { "const": 0 } })),
                ("field", json!({ "type": "string", "minLength": 1, "maxLength": 64, "description": "Emit {field: n} instead of n." })),
                ("interval_ms", json!({ "type": "integer", "minimum": 0, "maximum": 86_400_000, "default": 0, "description": "Pause between messages." })),
            ],
            &["count"],
        ),
        vec![
            example("A million numbers", "0 to 999999, as fast as downstream takes them.", json!({ "count": 1_000_000 })),
            example_io("Numbered objects", "{\"n\": 1} to {\"n\": 10}.", json!({ "start": 1, "count": 10, "field": "n" }), Value::Null, json!({ "n": 1 })),
        ],
        behaviour(ReadMode::None, WriteMode::Many, false),
        &["range", "counter", "generate"],
    ));

    // --- sinks ---
    specs.push(spec(
        "sink.output",
        Category::Sink,
        "Execution output",
        "Collects the messages it receives as the execution's result.",
        "log-out",
        vec![PortSpec::input("in", "Messages to collect.", any(), true, true)],
        vec![],
        object(
            &[
                ("name", json!({ "type": "string", "maxLength": 64, "description": "Name of the output in the result; defaults to the node id." })),
                ("limit", json!({ "type": "integer", "minimum": 0, "maximum": 1_000_000, "default": 10_000, "description": "Messages kept in the result; further ones are counted, not kept." })),
            ],
            &[],
        ),
        vec![example("Result", "Keep up to 100 messages as `result`.", json!({ "name": "result", "limit": 100 }))],
        behaviour(ReadMode::One, WriteMode::None, false),
        &["result", "end"],
    ));
    specs.push(spec(
        "sink.log",
        Category::Sink,
        "Log",
        "Writes each message to the execution's event stream as a log line.",
        "scroll-text",
        vec![PortSpec::input("in", "Messages to log.", any(), true, true)],
        vec![],
        object(
            &[
                ("level", json!({ "enum": ["debug", "info", "warn", "error"], "default": "info" })),
                ("message", json!({ "type": "string", "maxLength": 500, "default": "", "description": "Text logged before the message." })),
            ],
            &[],
        ),
        vec![example("Warnings", "Log each message as a warning.", json!({ "level": "warn", "message": "suspicious order" }))],
        behaviour(ReadMode::One, WriteMode::None, false),
        &["debug", "print"],
    ));

    // --- transforms ---
    specs.push(spec(
        "transform.set",
        Category::Transform,
        "Set fields",
        "Sets, deletes, renames or copies fields by path, in order (like Node-RED's change node).",
        "pencil",
        vec![input()],
        vec![output(), error_port()],
        object(
            &[(
                "operations",
                json!({
                    "type": "array",
                    "minItems": 1,
                    "maxItems": 100,
                    "items": {
                        "type": "object",
                        "properties": {
                            "op": { "enum": ["set", "delete", "rename", "copy"], "default": "set" },
                            "path": path_schema("Field to change, dotted: `payload.step1`."),
                            "value": { "description": "For set: the new value." },
                            "to": path_schema("For rename and copy: the destination path.")
                        },
                        "required": ["path"],
                        "additionalProperties": false
                    }
                }),
            )],
            &["operations"],
        ),
        vec![example_io(
            "Mark a step",
            "Set payload.step1 to 1 and drop a field.",
            json!({ "operations": [{ "op": "set", "path": "payload.step1", "value": 1 }, { "op": "delete", "path": "debug" }] }),
            json!({ "payload": {}, "debug": true }),
            json!({ "payload": { "step1": 1 } }),
        )],
        behaviour(ReadMode::One, WriteMode::One, false),
        &["change", "assign", "field", "rename", "delete"],
    ));
    specs.push(spec(
        "transform.map",
        Category::Transform,
        "Map (jq)",
        "Replaces each message by the result of a jq expression; every result is sent.",
        "function-square",
        vec![input()],
        vec![output(), error_port()],
        object(&[("expression", jq_schema("jq expression applied to each message."))], &["expression"]),
        vec![example_io(
            "Total",
            "Price times quantity.",
            json!({ "expression": "{total: (.price * .qty)}" }),
            json!({ "price": 2.5, "qty": 4 }),
            json!({ "total": 10.0 }),
        )],
        behaviour(ReadMode::One, WriteMode::One, false),
        &["jq", "project", "reshape"],
    ));
    specs.push(spec(
        "transform.filter",
        Category::Transform,
        "Filter (jq)",
        "Passes on the messages for which a jq expression is true.",
        "filter",
        vec![input()],
        vec![output(), error_port()],
        object(
            &[("expression", jq_schema("jq predicate; messages for which it is true pass."))],
            &["expression"],
        ),
        vec![example("Large orders", "Orders over 100.", json!({ "expression": ".amount > 100" }))],
        behaviour(ReadMode::One, WriteMode::AtMostOne, false),
        &["jq", "select", "where"],
    ));
    specs.push(spec(
        "transform.reduce",
        Category::Transform,
        "Reduce (jq)",
        "Folds messages into an accumulator: the expression gets {acc, item} and returns the new acc, sent when the input closes (or after each message).",
        "sigma",
        vec![input()],
        vec![output(), error_port()],
        object(
            &[
                ("expression", jq_schema("jq expression over {acc, item} giving the new accumulator.")),
                ("initial", json!({ "description": "The first accumulator.", "default": null })),
                ("emit", json!({ "enum": ["end", "each"], "default": "end" })),
            ],
            &["expression"],
        ),
        vec![example("Sum", "Sum of amounts, sent at the end.", json!({ "expression": ".acc + .item.amount", "initial": 0 }))],
        behaviour(ReadMode::One, WriteMode::AtMostOne, true),
        &["jq", "fold", "aggregate", "sum"],
    ));
    specs.push(spec(
        "transform.template",
        Category::Transform,
        "Template",
        "Renders a Jinja template with the message's fields; the text replaces the message, or goes into a field.",
        "file-text",
        vec![input()],
        vec![PortSpec::output("out", "Rendered messages.", any()), error_port()],
        object(
            &[
                ("template", json!({ "type": "string", "minLength": 1, "maxLength": 100_000 })),
                ("field", json!({ "type": "string", "minLength": 1, "maxLength": 64, "description": "Put the text into this field of the message instead of replacing it." })),
            ],
            &["template"],
        ),
        vec![example_io("Greeting", "Hello, name.", json!({ "template": "Hello, {{ name }}!" }), json!({ "name": "Ada" }), json!("Hello, Ada!"))],
        behaviour(ReadMode::One, WriteMode::One, false),
        &["jinja", "text", "format"],
    ));

    // --- control ---
    specs.push(dynamic(spec(
        "control.switch",
        Category::Control,
        "Switch",
        "Routes each message to the output of the first case whose jq predicate is true (or of every true case), else to `default`.",
        "git-branch",
        vec![input()],
        vec![PortSpec::output("default", "Messages no case matched.", any()), error_port()],
        object(
            &[
                (
                    "cases",
                    json!({
                        "type": "array",
                        "minItems": 1,
                        "maxItems": 32,
                        "items": {
                            "type": "object",
                            "properties": { "port": port_name_schema(), "expression": jq_schema("jq predicate.") },
                            "required": ["port", "expression"],
                            "additionalProperties": false
                        }
                    }),
                ),
                ("mode", json!({ "enum": ["first", "all"], "default": "first" })),
            ],
            &["cases"],
        ),
        vec![example("By size", "Large orders one way, the rest another.", json!({ "cases": [{ "port": "large", "expression": ".amount > 100" }, { "port": "small", "expression": ".amount <= 100" }] }))],
        behaviour(ReadMode::One, WriteMode::AtMostOne, false),
        &["route", "if", "branch"],
    )));
    specs.push(spec(
        "control.split",
        Category::Control,
        "Split",
        "Sends each element of an array (the message, or a field of it) as its own message.",
        "split",
        vec![input()],
        vec![PortSpec::output("out", "The elements.", any()), error_port()],
        object(&[("path", path_schema("Field holding the array; empty means the message itself."))], &[]),
        vec![example("Items", "Each item of an order.", json!({ "path": "items" }))],
        behaviour(ReadMode::One, WriteMode::Many, false),
        &["explode", "flatten", "each"],
    ));
    specs.push(dynamic(spec(
        "control.join",
        Category::Control,
        "Join",
        "Takes one message from each input and sends them together (zip): as an object keyed by input, or an array.",
        "merge",
        vec![],
        vec![PortSpec::output("out", "The joined messages.", json!({ "type": ["object", "array"] }))],
        object(
            &[
                ("inputs", json!({ "type": "array", "items": port_name_schema(), "minItems": 2, "maxItems": 16, "default": ["left", "right"] })),
                ("into", json!({ "enum": ["object", "array"], "default": "object" })),
            ],
            &[],
        ),
        vec![example_io("Pair", "Zip two streams into {a, b}.", json!({ "inputs": ["a", "b"] }), Value::Null, json!({ "a": 1, "b": 2 }))],
        behaviour(ReadMode::All, WriteMode::One, false),
        &["zip", "combine", "barrier"],
    )));
    specs.push(spec(
        "control.merge",
        Category::Control,
        "Merge",
        "Sends on every message from any of its connections, in arrival order (fair interleaving).",
        "combine",
        vec![PortSpec::input("in", "Any number of connections.", any(), true, true)],
        vec![PortSpec::output("out", "The merged messages.", any())],
        object(&[], &[]),
        vec![example("Merge", "Interleave several streams.", json!({}))],
        behaviour(ReadMode::Any, WriteMode::One, false),
        &["interleave", "fan-in"],
    ));
    specs.push(dynamic(spec(
        "control.alt",
        Category::Control,
        "Alternative (alt)",
        "CSP choice: waits on several named inputs and takes whichever is ready first (fairly, or in the listed order of priority), tagging the message with its input.",
        "shuffle",
        vec![],
        vec![PortSpec::output("out", "Messages, as {port, message} when tagged.", any())],
        object(
            &[
                ("inputs", json!({ "type": "array", "items": port_name_schema(), "minItems": 2, "maxItems": 16 })),
                ("priority", json!({ "enum": ["fair", "ordered"], "default": "fair" })),
                ("tag", json!({ "type": "boolean", "default": true })),
            ],
            &["inputs"],
        ),
        vec![example("Commands or ticks", "React to whichever arrives first, commands first.", json!({ "inputs": ["commands", "ticks"], "priority": "ordered" }))],
        behaviour(ReadMode::Any, WriteMode::One, false),
        &["choice", "select", "csp"],
    )));
    specs.push(spec(
        "control.batch",
        Category::Control,
        "Batch",
        "Collects messages into arrays of `size` (the last may be smaller), or sends what it has after `timeout_ms`.",
        "package",
        vec![input()],
        vec![PortSpec::output("out", "Arrays of messages.", json!({ "type": "array" }))],
        object(
            &[
                ("size", json!({ "type": "integer", "minimum": 1, "maximum": 100_000 })),
                ("timeout_ms", json!({ "type": "integer", "minimum": 0, "maximum": 3_600_000, "default": 0, "description": "0: wait for a full batch." })),
            ],
            &["size"],
        ),
        vec![example("Tens", "Ten at a time, or what there is every half second.", json!({ "size": 10, "timeout_ms": 500 }))],
        behaviour(ReadMode::One, WriteMode::AtMostOne, true),
        &["group", "chunk", "window"],
    ));
    specs.push(spec(
        "control.delay",
        Category::Control,
        "Delay / throttle",
        "Holds each message for `delay_ms` (plus up to `jitter_ms`), many messages waiting at once; with `rate_per_second`, also lets at most that many through per second, in order (a throttle).",
        "timer",
        vec![input()],
        vec![output()],
        object(
            &[
                ("delay_ms", json!({ "type": "integer", "minimum": 0, "maximum": 86_400_000, "default": 0 })),
                (
                    "jitter_ms",
                    json!({ "type": "integer", "minimum": 0, "maximum": 86_400_000, "default": 0 }),
                ),
                (
                    "rate_per_second",
                    json!({ "type": "number", "exclusiveMinimum": 0, "maximum": 1_000_000, "description": "At most this many messages a second, evenly spaced." }),
                ),
            ],
            &[],
        ),
        vec![
            example("A second", "One second per message.", json!({ "delay_ms": 1000 })),
            example("Five a second", "A throttle: at most five messages a second, in order.", json!({ "rate_per_second": 5 })),
        ],
        behaviour(ReadMode::One, WriteMode::One, false),
        &["wait", "sleep", "throttle", "rate limit"],
    ));

    // --- validation ---
    specs.push(spec(
        "validate.json_schema",
        Category::Validate,
        "JSON Schema",
        "Sends messages matching a JSON Schema to `valid`, the others (with the reasons) to `invalid`.",
        "shield-check",
        vec![input()],
        vec![
            PortSpec::output("valid", "Messages that match.", any()),
            PortSpec::output(
                "invalid",
                "Messages that do not, with the violations.",
                json!({
                    "type": "object",
                    "properties": { "message": {}, "errors": { "type": "array", "items": { "type": "object" } } },
                    "required": ["message", "errors"]
                }),
            ),
        ],
        object(&[("schema", json!({ "type": ["object", "boolean"], "description": "The JSON Schema." }))], &["schema"]),
        vec![example(
            "Orders",
            "Orders need an id and a positive amount.",
            json!({ "schema": { "type": "object", "required": ["id", "amount"], "properties": { "amount": { "type": "number", "exclusiveMinimum": 0 } } } }),
        )],
        behaviour(ReadMode::One, WriteMode::One, false),
        &["schema", "check", "validate"],
    ));

    // --- metrics ---
    specs.push(spec(
        "metrics.counter",
        Category::Metrics,
        "Counter",
        "Counts messages (by a jq key when given), passes them on, and sends the counts when its input closes.",
        "hash",
        vec![input()],
        vec![
            PortSpec::output("out", "The messages, unchanged.", any()),
            PortSpec::output("counts", "The counts: {total, by_key}.", json!({ "type": "object", "properties": { "total": { "type": "integer" }, "by_key": { "type": "object" } }, "required": ["total"] })),
        ],
        object(
            &[
                ("name", json!({ "type": "string", "pattern": "^[a-z][a-z0-9_]{0,63}$", "description": "Metric name, also exported to Prometheus as a label." })),
                ("group_by", jq_schema("jq expression giving each message's key.")),
            ],
            &["name"],
        ),
        vec![example("Orders by country", "Count orders per country.", json!({ "name": "orders", "group_by": ".country" }))],
        behaviour(ReadMode::One, WriteMode::One, false),
        &["count", "tally", "observe"],
    ));
    specs.push(spec(
        "metrics.stats",
        Category::Metrics,
        "Statistics",
        "Summarises numbers (the message, or a field): count, sum, min, max, mean, p50, p99; sent at the end or every N messages.",
        "chart-line",
        vec![input()],
        vec![PortSpec::output(
            "out",
            "Statistics.",
            json!({
                "type": "object",
                "properties": {
                    "count": { "type": "integer" }, "sum": { "type": "number" }, "min": { "type": "number" },
                    "max": { "type": "number" }, "mean": { "type": "number" }, "p50": { "type": "number" }, "p99": { "type": "number" }
                },
                "required": ["count", "sum", "min", "max", "mean", "p50", "p99"]
            }),
        )],
        object(
            &[
                ("path", path_schema("Field holding the number; empty means the message itself.")),
                ("every", json!({ "type": "integer", "minimum": 1, "maximum": 100_000_000, "description": "Also send the statistics so far every this many messages." })),
            ],
            &[],
        ),
        vec![example("Latency", "Statistics of `latency_ms`.", json!({ "path": "latency_ms" }))],
        behaviour(ReadMode::One, WriteMode::AtMostOne, true),
        &["statistics", "percentile", "mean", "histogram"],
    ));

    // --- AI ---
    let [provider, model] = provider_model();
    specs.push(spec(
        "ai.chat",
        Category::Ai,
        "Chat",
        "Sends each message (rendered through a prompt template) to a chat model and sends on the reply.",
        "message-circle",
        vec![input()],
        vec![
            PortSpec::output("out", "Replies: {text, model, usage}.", json!({ "type": "object", "properties": { "text": { "type": "string" }, "model": { "type": "string" }, "usage": { "type": "object" } }, "required": ["text"] })),
            error_port(),
        ],
        object(
            &[
                provider.clone(),
                model.clone(),
                ("system", json!({ "type": "string", "maxLength": 20_000, "default": "" })),
                ("prompt_template", json!({ "type": "string", "maxLength": 20_000, "default": "{{ message }}", "description": "Jinja template; `message` is the whole message, its fields are also top-level names." })),
                ("temperature", json!({ "type": "number", "minimum": 0, "maximum": 2 })),
                ("max_tokens", json!({ "type": "integer", "minimum": 1, "maximum": 200_000 })),
            ],
            &[],
        ),
        vec![example("Summarise", "A terse summary of each text.", json!({ "system": "You are terse.", "prompt_template": "Summarise: {{ text }}", "temperature": 0.2 }))],
        behaviour(ReadMode::One, WriteMode::One, false),
        &["llm", "gpt", "claude", "prompt"],
    ));
    specs.push(spec(
        "ai.analyze",
        Category::Ai,
        "Analyze text",
        "Extracts sentiment, a summary, keywords, a classification or entities from a text field, as structured JSON.",
        "scan-text",
        vec![input()],
        vec![PortSpec::output("out", "The message with the analysis under `analysis`.", any()), error_port()],
        object(
            &[
                provider.clone(),
                model.clone(),
                ("kinds", json!({ "type": "array", "minItems": 1, "uniqueItems": true, "items": { "enum": ["sentiment", "summary", "keywords", "classification", "entities"] } })),
                ("labels", json!({ "type": "array", "items": { "type": "string", "minLength": 1 }, "maxItems": 50, "description": "Labels for classification." })),
                ("path", path_schema("Field holding the text; empty means the message itself.")),
            ],
            &["kinds"],
        ),
        vec![example("Reviews", "Sentiment and keywords of review texts.", json!({ "kinds": ["sentiment", "keywords"], "path": "review" }))],
        behaviour(ReadMode::One, WriteMode::One, false),
        &["nlp", "sentiment", "classify", "entities"],
    ));
    specs.push(spec(
        "ai.agent",
        Category::Ai,
        "Agent",
        "Runs a model with tools (other components or remote endpoints): calls the tools it asks for and feeds the results back, up to `max_steps`.",
        "bot",
        vec![input()],
        vec![PortSpec::output("out", "Final answers with the steps taken.", any()), error_port()],
        object(
            &[
                provider.clone(),
                model.clone(),
                ("system", json!({ "type": "string", "maxLength": 20_000, "default": "" })),
                (
                    "tools",
                    json!({
                        "type": "array",
                        "maxItems": 32,
                        "items": {
                            "type": "object",
                            "properties": {
                                "name": { "type": "string", "pattern": "^[a-zA-Z0-9_-]{1,64}$" },
                                "description": { "type": "string", "maxLength": 2000 },
                                "parameters": { "type": "object" },
                                "component_type": { "type": "string" },
                                "component_config": { "type": "object" },
                                "remote_address": { "type": "string", "format": "uri" }
                            },
                            "required": ["name", "description"],
                            "additionalProperties": false
                        },
                        "default": []
                    }),
                ),
                ("max_steps", json!({ "type": "integer", "minimum": 1, "maximum": 20, "default": 5 })),
            ],
            &[],
        ),
        vec![example(
            "Order helper",
            "Answers questions, looking up totals with a jq tool.",
            json!({ "system": "Answer with totals.", "tools": [{ "name": "total", "description": "Total of an order", "parameters": { "type": "object" }, "component_type": "transform.map", "component_config": { "expression": ".price * .qty" } }] }),
        )],
        behaviour(ReadMode::One, WriteMode::One, false),
        &["tools", "function calling", "assistant"],
    ));
    specs.push(spec(
        "ai.codegen",
        Category::Ai,
        "Generate code",
        "Writes code, tests and documentation for each specification message.",
        "code",
        vec![input()],
        vec![PortSpec::output("out", "{code, tests, documentation}.", json!({ "type": "object", "properties": { "code": { "type": "string" }, "tests": { "type": "string" }, "documentation": { "type": "string" } }, "required": ["code"] })), error_port()],
        object(
            &[
                provider,
                model,
                ("language", json!({ "type": "string", "minLength": 1, "maxLength": 32 })),
                ("include_tests", json!({ "type": "boolean", "default": true })),
            ],
            &["language"],
        ),
        vec![example("Python", "Python code with tests.", json!({ "language": "python" }))],
        behaviour(ReadMode::One, WriteMode::One, false),
        &["code", "generate", "program"],
    ));

    // --- remote and sub-designs ---
    specs.push(spec(
        "remote.call",
        Category::Remote,
        "Remote call",
        "Processes messages with a component served at a gRPC address (csp.component.v1.ComponentRuntime).",
        "cloud",
        vec![input()],
        vec![output(), error_port()],
        object(
            &[
                ("address", json!({ "type": "string", "pattern": "^https?://[^\\s/]+(:[0-9]+)?/?$", "description": "e.g. http://sentiment:50051" })),
                ("config", json!({ "type": "object", "default": {}, "description": "Configuration sent to the component." })),
                ("timeout_ms", json!({ "type": "integer", "minimum": 1, "maximum": 3_600_000, "default": 30_000 })),
            ],
            &["address"],
        ),
        vec![example("Sentiment", "A sentiment service.", json!({ "address": "http://sentiment:50051", "config": { "language": "en" } }))],
        behaviour(ReadMode::One, WriteMode::Many, false),
        &["grpc", "external", "service"],
    ));
    specs.push(dynamic(spec(
        "design.call",
        Category::Control,
        "Sub-design",
        "Runs another design as one node: its `source.input` nodes are this node's inputs, its `sink.output` nodes its outputs.",
        "layers",
        vec![],
        vec![error_port()],
        object(
            &[
                ("design_id", json!({ "type": "string", "minLength": 1, "maxLength": 64 })),
                ("revision", json!({ "type": "integer", "minimum": 0, "default": 0, "description": "0: the latest revision when the execution starts." })),
            ],
            &["design_id"],
        ),
        vec![example("Cleaning", "Run the design `clean-orders`.", json!({ "design_id": "7b2c1d8e-0000-4000-8000-000000000001" }))],
        behaviour(ReadMode::Any, WriteMode::Many, true),
        &["subflow", "reuse", "nested"],
    )));
    specs
}

fn check_jq(config: &Value, pointer: &str, violations: &mut Vec<Violation>) {
    if let Some(code) = config.pointer(pointer).and_then(Value::as_str)
        && let Err(why) = crate::jq::compile(code)
    {
        violations.push(Violation::rule(pointer, format!("is not a valid jq expression: {why}")));
    }
}

fn check_template(config: &Value, pointer: &str, violations: &mut Vec<Violation>) {
    if let Some(text) = config.pointer(pointer).and_then(Value::as_str) {
        let env = minijinja::Environment::new();
        if let Err(e) = env.template_from_str(text) {
            violations.push(Violation::rule(pointer, format!("is not a valid template: {e}")));
        }
    }
}

fn check_unique(names: &[&str], pointer: &str, reserved: &[&str], violations: &mut Vec<Violation>) {
    let mut seen = std::collections::BTreeSet::new();
    for (i, name) in names.iter().enumerate() {
        if !seen.insert(*name) || reserved.contains(name) {
            violations
                .push(Violation::rule(format!("{pointer}/{i}"), format!("port name `{name}` is used twice")));
        }
    }
}

/// Rules beyond JSON Schema, for a valid, effective configuration.
pub(crate) fn check(type_id: &str, config: &Value, violations: &mut Vec<Violation>) {
    match type_id {
        "transform.map" | "transform.filter" | "transform.reduce" => {
            check_jq(config, "/expression", violations)
        }
        "metrics.counter" => check_jq(config, "/group_by", violations),
        "transform.template" => check_template(config, "/template", violations),
        "ai.chat" => check_template(config, "/prompt_template", violations),
        "control.switch" => {
            let cases = config.get("cases").and_then(Value::as_array).cloned().unwrap_or_default();
            for i in 0..cases.len() {
                check_jq(config, &format!("/cases/{i}/expression"), violations);
            }
            // Several cases may share a port (an "or"); only the fixed outputs' names are taken.
            for (i, case) in cases.iter().enumerate() {
                if let Some(name @ ("default" | "error")) = case.get("port").and_then(Value::as_str) {
                    violations
                        .push(Violation::rule(format!("/cases/{i}/port"), format!("`{name}` is reserved")));
                }
            }
        }
        "control.join" | "control.alt" => {
            let names: Vec<&str> = config
                .get("inputs")
                .and_then(Value::as_array)
                .map(|a| a.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            check_unique(&names, "/inputs", &[], violations);
        }
        "validate.json_schema" | "source.input" => {
            if let Some(schema) = config.get("schema")
                && let Err(why) = crate::schema::check_schema(schema)
            {
                violations.push(Violation::rule("/schema", format!("is not a valid JSON Schema: {why}")));
            }
        }
        "transform.set" => {
            let operations = config.get("operations").and_then(Value::as_array).cloned().unwrap_or_default();
            for (i, operation) in operations.iter().enumerate() {
                let op = operation.get("op").and_then(Value::as_str).unwrap_or("set");
                let has_to = operation.get("to").is_some();
                match op {
                    "rename" | "copy" if !has_to => {
                        violations.push(Violation::rule(
                            format!("/operations/{i}/to"),
                            format!("is required for {op}"),
                        ));
                    }
                    "set" if operation.get("value").is_none() => {
                        violations
                            .push(Violation::rule(format!("/operations/{i}/value"), "is required for set"));
                    }
                    _ => {}
                }
            }
        }
        _ => {}
    }
}

/// Ports named by the configuration.
pub(crate) fn dynamic_ports(
    type_id: &str,
    config: &Value,
    inputs: &mut Vec<PortSpec>,
    outputs: &mut Vec<PortSpec>,
) {
    let names = |key: &str| -> Vec<String> {
        config
            .get(key)
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(|v| v.as_str().map(str::to_owned)).collect())
            .unwrap_or_default()
    };
    match type_id {
        "control.switch" => {
            let mut ports: Vec<String> = config
                .get("cases")
                .and_then(Value::as_array)
                .map(|cases| {
                    cases
                        .iter()
                        .filter_map(|c| c.get("port").and_then(Value::as_str).map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default();
            ports.dedup();
            let mut seen = std::collections::BTreeSet::new();
            for port in ports.into_iter().filter(|p| seen.insert(p.clone())).rev() {
                outputs.insert(0, PortSpec::output(&port, "Messages this case matched.", any()));
            }
        }
        "control.join" | "control.alt" => {
            for name in names("inputs") {
                inputs.push(PortSpec::input(&name, "Messages of this input.", any(), true, false));
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{builtin, ports_for, validate_config};

    #[test]
    fn configured_ports_are_resolved() {
        let switch = builtin("control.switch").unwrap();
        let config = validate_config(switch, &json!({ "cases": [{ "port": "large", "expression": ".a > 1" }, { "port": "small", "expression": ".a <= 1" }] })).unwrap();
        let (_, outputs) = ports_for(switch, &config);
        let names: Vec<&str> = outputs.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["large", "small", "default", "error"]);

        let join = builtin("control.join").unwrap();
        let config = validate_config(join, &json!({})).unwrap();
        let (inputs, _) = ports_for(join, &config);
        assert_eq!(
            inputs.iter().map(|p| p.name.as_str()).collect::<Vec<_>>(),
            ["left", "right"],
            "from the default"
        );
    }

    #[test]
    fn rules_beyond_the_schema() {
        let check = |id: &str, config: Value| {
            validate_config(builtin(id).unwrap(), &config).unwrap_err()[0].pointer.clone()
        };
        assert_eq!(check("transform.map", json!({ "expression": ".a |" })), "/expression");
        assert_eq!(check("transform.template", json!({ "template": "{{ unclosed" })), "/template");
        assert_eq!(check("control.join", json!({ "inputs": ["a", "a"] })), "/inputs/1");
        assert_eq!(check("validate.json_schema", json!({ "schema": { "type": "nonsense" } })), "/schema");
        assert_eq!(
            check("transform.set", json!({ "operations": [{ "op": "rename", "path": "a" }] })),
            "/operations/0/to"
        );
        assert_eq!(
            check("control.switch", json!({ "cases": [{ "port": "default", "expression": "true" }] })),
            "/cases/0/port"
        );
    }
}
