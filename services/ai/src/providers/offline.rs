//! The offline provider: answers computed here, a pure function of the request — no network,
//! no key. The default on the embedded setup and in tests. It answers like a model would, in
//! every shape the service asks for:
//!
//! - text: a short answer naming what was asked (and, after tool results, what the tools said);
//! - tool calls: when tools are offered and none has answered since the last user message, it
//!   calls the tool named in that message (else the first), with arguments made from the
//!   tool's JSON Schema and the message's words;
//! - JSON for Analyze (`analysis`): sentiment from a small lexicon, the first sentence as the
//!   summary, frequent words as keywords, the label sharing most words with the text, and
//!   capitalised names as entities; JSON for GenerateCode (`code`): code, tests and
//!   documentation for the language and specification; any other JSON: a value matching the
//!   schema.
//!
//! Token counts are its own (exact for it, so not marked estimated).

use std::collections::{BTreeMap, HashMap};

use async_trait::async_trait;
use futures::{StreamExt as _, stream};
use serde_json::{Map, Value, json};

use super::{PieceStream, Provider, ProviderError, ProviderRequest};
use crate::{
    model::{Message, Piece, Reply, ResponseFormat, Role, Tokens, ToolCall, ToolSpec},
    tokens,
};

/// The offline provider.
pub(crate) struct Offline;

#[async_trait]
impl Provider for Offline {
    fn available(&self) -> bool {
        true
    }

    async fn complete(&self, request: &ProviderRequest) -> Result<Reply, ProviderError> {
        Ok(answer(request))
    }

    async fn stream(&self, request: &ProviderRequest) -> Result<PieceStream, ProviderError> {
        let reply = answer(request);
        let mut pieces: Vec<Result<Piece, ProviderError>> = Vec::new();
        let mut chunk = String::new();
        for word in reply.message.content.split_inclusive(' ') {
            chunk.push_str(word);
            if chunk.len() >= 16 {
                pieces.push(Ok(Piece::Text(std::mem::take(&mut chunk))));
            }
        }
        if !chunk.is_empty() {
            pieces.push(Ok(Piece::Text(chunk)));
        }
        pieces.extend(reply.message.tool_calls.into_iter().map(|c| Ok(Piece::ToolCall(c))));
        pieces.push(Ok(Piece::Done { finish_reason: reply.finish_reason, tokens: reply.tokens }));
        Ok(stream::iter(pieces).boxed())
    }
}

fn last_user(messages: &[Message]) -> (usize, &str) {
    messages
        .iter()
        .enumerate()
        .rev()
        .find(|(_, m)| m.role == Role::User)
        .map_or((0, ""), |(i, m)| (i, m.content.as_str()))
}

fn answer(request: &ProviderRequest) -> Reply {
    let (at, asked) = last_user(&request.messages);
    let answered: Vec<&Message> = request.messages[at..].iter().filter(|m| m.role == Role::Tool).collect();
    let mut message = Message::new(Role::Assistant, "");
    let mut finish = "stop";
    match &request.response {
        ResponseFormat::Json { name, schema } => {
            let value = match name.as_str() {
                "analysis" => analysis(asked, schema),
                "code" => code(asked),
                _ => generate(schema, &words(asked), 0),
            };
            message.content = value.to_string();
        }
        ResponseFormat::Text if !request.tools.is_empty() && answered.is_empty() => {
            let tool = pick_tool(&request.tools, asked);
            let arguments = generate(&tool.parameters, &words(asked), 0);
            message.tool_calls.push(ToolCall {
                id: format!("call_{:016x}", fnv(&format!("{}{asked}", tool.name))),
                name: tool.name.clone(),
                arguments: arguments.to_string(),
            });
            finish = "tool_calls";
        }
        ResponseFormat::Text => {
            message.content = if answered.is_empty() {
                format!("Offline answer to: {}", clip_words(asked, 60))
            } else {
                let results: Vec<String> = answered.iter().map(|m| clip_words(&m.content, 30)).collect();
                format!(
                    "Using the tools' results ({}), the answer to \"{}\" is ready.",
                    results.join("; "),
                    clip_words(asked, 20)
                )
            };
        }
    }
    // Respect the output budget, as a model does.
    let mut completion = tokens::count(&message.content)
        + message
            .tool_calls
            .iter()
            .map(|c| tokens::count(&c.name) + tokens::count(&c.arguments))
            .sum::<u64>();
    if request.max_tokens > 0 && completion > u64::from(request.max_tokens) && message.tool_calls.is_empty() {
        let words: Vec<&str> = message.content.split_inclusive(' ').collect();
        let mut kept = String::new();
        for word in words {
            if tokens::count(&format!("{kept}{word}")) > u64::from(request.max_tokens) {
                break;
            }
            kept.push_str(word);
        }
        message.content = kept;
        completion = tokens::count(&message.content);
        finish = "length";
    }
    let prompt = tokens::messages(&request.messages)
        + request
            .tools
            .iter()
            .map(|t| tokens::count(&t.name) + tokens::count(&t.parameters.to_string()))
            .sum::<u64>();
    Reply {
        message,
        finish_reason: finish.into(),
        tokens: Some(Tokens { prompt, completion, estimated: false }),
    }
}

fn fnv(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}

fn clip_words(text: &str, max: usize) -> String {
    let words: Vec<&str> = text.split_whitespace().collect();
    if words.len() <= max { words.join(" ") } else { format!("{} …", words[..max].join(" ")) }
}

fn words(text: &str) -> Vec<String> {
    text.split(|c: char| !c.is_alphanumeric()).filter(|w| !w.is_empty()).map(str::to_owned).collect()
}

fn pick_tool<'a>(tools: &'a [ToolSpec], asked: &str) -> &'a ToolSpec {
    let lower = asked.to_lowercase();
    tools.iter().find(|t| lower.contains(&t.name.to_lowercase())).unwrap_or(&tools[0])
}

/// A value matching `schema`, made from `words` (deterministically).
fn generate(schema: &Value, words: &[String], depth: usize) -> Value {
    if depth > 8 {
        return Value::Null;
    }
    if let Some(value) = schema.get("const") {
        return value.clone();
    }
    if let Some(Value::Array(options)) = schema.get("enum") {
        return options.first().cloned().unwrap_or(Value::Null);
    }
    let kind = match schema.get("type") {
        Some(Value::String(t)) => t.as_str(),
        Some(Value::Array(types)) => {
            types.iter().filter_map(Value::as_str).find(|t| *t != "null").unwrap_or("null")
        }
        _ if schema.get("properties").is_some() => "object",
        _ => "string",
    };
    match kind {
        "object" => {
            let mut out = Map::new();
            if let Some(Value::Object(properties)) = schema.get("properties") {
                for (i, (name, property)) in properties.iter().enumerate() {
                    let word = words.get(i).cloned().unwrap_or_else(|| name.clone());
                    let value = match generate(property, &[word], depth + 1) {
                        Value::String(s) if s.is_empty() => Value::String(name.clone()),
                        other => other,
                    };
                    out.insert(name.clone(), value);
                }
            }
            Value::Object(out)
        }
        "array" => {
            let item = schema.get("items").cloned().unwrap_or(json!({}));
            let min = schema.get("minItems").and_then(Value::as_u64).unwrap_or(1).max(1) as usize;
            Value::Array((0..min).map(|i| generate(&item, &words[i.min(words.len())..], depth + 1)).collect())
        }
        "integer" => json!(schema.get("minimum").and_then(Value::as_i64).unwrap_or(1)),
        "number" => json!(schema.get("minimum").and_then(Value::as_f64).unwrap_or(1.0)),
        "boolean" => json!(true),
        "null" => Value::Null,
        _ => Value::String(words.first().cloned().unwrap_or_default()),
    }
}

const POSITIVE: &[&str] = &[
    "good",
    "great",
    "excellent",
    "love",
    "loved",
    "like",
    "happy",
    "wonderful",
    "fantastic",
    "amazing",
    "best",
    "nice",
    "pleased",
    "delighted",
    "awesome",
    "perfect",
    "recommend",
    "fast",
    "easy",
    "helpful",
];
const NEGATIVE: &[&str] = &[
    "bad",
    "terrible",
    "awful",
    "hate",
    "hated",
    "poor",
    "worst",
    "sad",
    "angry",
    "disappointed",
    "broken",
    "slow",
    "horrible",
    "useless",
    "refund",
    "bug",
    "broke",
    "never",
    "crash",
    "late",
];
const STOP: &[&str] = &[
    "the", "and", "that", "this", "with", "from", "have", "were", "was", "for", "are", "but", "not", "you",
    "your", "they", "them", "their", "there", "what", "when", "which", "will", "would", "could", "should",
    "about", "into", "than", "then", "very", "just", "also", "been", "being", "its", "it's", "our", "out",
    "all", "any", "can",
];
const PLACES: &[&str] = &[
    "paris",
    "london",
    "berlin",
    "tokyo",
    "madrid",
    "rome",
    "vienna",
    "amsterdam",
    "boston",
    "chicago",
    "seattle",
    "york",
    "france",
    "germany",
    "japan",
    "spain",
    "italy",
    "europe",
    "america",
    "china",
    "india",
];
const MONTHS: &[&str] = &[
    "january",
    "february",
    "march",
    "april",
    "may",
    "june",
    "july",
    "august",
    "september",
    "october",
    "november",
    "december",
    "monday",
    "tuesday",
    "wednesday",
    "thursday",
    "friday",
    "saturday",
    "sunday",
];

fn sentiment(text: &str) -> Value {
    let lower: Vec<String> = words(text).iter().map(|w| w.to_lowercase()).collect();
    let positive = lower.iter().filter(|w| POSITIVE.contains(&w.as_str())).count() as f64;
    let negative = lower.iter().filter(|w| NEGATIVE.contains(&w.as_str())).count() as f64;
    let score = if positive + negative == 0.0 { 0.0 } else { (positive - negative) / (positive + negative) };
    let label = if score > 0.0 {
        "positive"
    } else if score < 0.0 {
        "negative"
    } else {
        "neutral"
    };
    json!({ "label": label, "score": (score * 100.0).round() / 100.0 })
}

fn summary(text: &str) -> Value {
    let first = text.split_inclusive(['.', '!', '?']).next().unwrap_or(text).trim();
    Value::String(first.chars().take(300).collect())
}

fn keywords(text: &str) -> Value {
    let mut counts: HashMap<String, (usize, usize)> = HashMap::new();
    for (i, word) in words(text).into_iter().enumerate() {
        let word = word.to_lowercase();
        if word.chars().count() < 4 || STOP.contains(&word.as_str()) || word.chars().all(|c| c.is_numeric()) {
            continue;
        }
        counts.entry(word).or_insert((0, i)).0 += 1;
    }
    let mut ranked: Vec<(String, (usize, usize))> = counts.into_iter().collect();
    ranked.sort_by(|a, b| b.1.0.cmp(&a.1.0).then(a.1.1.cmp(&b.1.1)));
    Value::Array(ranked.into_iter().take(5).map(|(w, _)| Value::String(w)).collect())
}

fn classification(text: &str, labels: &[String]) -> Value {
    let lower: Vec<String> = words(text).iter().map(|w| w.to_lowercase()).collect();
    let scores: Vec<usize> = labels
        .iter()
        .map(|label| words(label).iter().filter(|w| lower.contains(&w.to_lowercase())).count())
        .collect();
    let total: usize = scores.iter().sum();
    let best =
        scores.iter().enumerate().max_by(|a, b| a.1.cmp(b.1).then(b.0.cmp(&a.0))).map_or(0, |(i, _)| i);
    let confidence =
        if total == 0 { 1.0 / labels.len().max(1) as f64 } else { scores[best] as f64 / total as f64 };
    json!({ "label": labels.get(best).cloned().unwrap_or_default(), "confidence": (confidence * 100.0).round() / 100.0 })
}

fn entities(text: &str) -> Value {
    let mut found: Vec<Value> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for sentence in text.split_inclusive(['.', '!', '?']) {
        let tokens: Vec<String> = words(sentence);
        let mut i = 0;
        while i < tokens.len() {
            let capital = |w: &str| {
                w.chars().next().is_some_and(char::is_uppercase)
                    || w.chars().all(|c| c.is_ascii_digit()) && w.len() == 4
            };
            if !capital(&tokens[i]) {
                i += 1;
                continue;
            }
            let start = i;
            while i < tokens.len() && capital(&tokens[i]) {
                i += 1;
            }
            let name = tokens[start..i].join(" ");
            // A lone capitalised first word of a sentence is usually not a name.
            if start == 0
                && i - start == 1
                && !PLACES.contains(&name.to_lowercase().as_str())
                && !MONTHS.contains(&name.to_lowercase().as_str())
            {
                continue;
            }
            let lower = name.to_lowercase();
            let last = tokens[i - 1].to_lowercase();
            let kind = if MONTHS.iter().any(|m| lower.contains(m)) || name.chars().all(|c| c.is_ascii_digit())
            {
                "date"
            } else if ["inc", "corp", "ltd", "llc", "gmbh", "company", "university"].contains(&last.as_str())
            {
                "organization"
            } else if PLACES.iter().any(|p| lower.split(' ').any(|w| w == *p)) {
                "location"
            } else if i - start >= 2 {
                "person"
            } else {
                "other"
            };
            if seen.insert(name.clone()) {
                found.push(json!({ "text": name, "type": kind }));
            }
        }
    }
    Value::Array(found)
}

/// The analysis the `analysis` schema asks for: one key per kind it lists.
fn analysis(text: &str, schema: &Value) -> Value {
    let mut out = BTreeMap::new();
    let properties = schema.get("properties").and_then(Value::as_object).cloned().unwrap_or_default();
    for (kind, property) in properties {
        let value = match kind.as_str() {
            "sentiment" => sentiment(text),
            "summary" => summary(text),
            "keywords" => keywords(text),
            "classification" => {
                let labels: Vec<String> = property
                    .pointer("/properties/label/enum")
                    .and_then(Value::as_array)
                    .map(|l| l.iter().filter_map(Value::as_str).map(str::to_owned).collect())
                    .unwrap_or_default();
                classification(text, &labels)
            }
            "entities" => entities(text),
            _ => generate(&property, &words(text), 1),
        };
        out.insert(kind, value);
    }
    json!(out)
}

/// Code for a request of the form the service sends: `Language: <lang>` then the specification.
fn code(asked: &str) -> Value {
    let mut lines = asked.lines();
    let language = lines
        .next()
        .and_then(|l| l.strip_prefix("Language:"))
        .map(|l| l.trim().to_lowercase())
        .unwrap_or_else(|| "python".into());
    let spec: String = lines.collect::<Vec<_>>().join(" ").trim().to_owned();
    let summary = clip_words(&spec, 20);
    let (code, tests) = match language.as_str() {
        "python" => (
            format!("def solution(value):\n    \"\"\"{summary}\"\"\"\n    return value\n"),
            "from solution import solution\n\n\ndef test_solution_returns_its_input():\n    assert solution(1) == 1\n".to_owned(),
        ),
        "rust" => (
            format!("/// {summary}\npub fn solution<T>(value: T) -> T {{\n    value\n}}\n"),
            "#[test]\nfn solution_returns_its_input() {\n    assert_eq!(solution(1), 1);\n}\n".to_owned(),
        ),
        "typescript" | "javascript" => (
            format!("/** {summary} */\nexport function solution<T>(value: T): T {{\n  return value;\n}}\n"),
            "import { solution } from './solution';\n\ntest('returns its input', () => {\n  expect(solution(1)).toBe(1);\n});\n".to_owned(),
        ),
        other => (
            format!("// {summary}\n// ({other}) solution(value) returns value\n"),
            format!("// ({other}) solution(1) == 1\n"),
        ),
    };
    json!({
        "code": code,
        "tests": tests,
        "documentation": format!("# solution\n\n{summary}\n\nWritten in {language}: `solution(value)` returns its input.\n"),
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn request(messages: Vec<Message>) -> ProviderRequest {
        ProviderRequest {
            model: "offline-1".into(),
            messages,
            tools: Vec::new(),
            temperature: None,
            max_tokens: 0,
            response: ResponseFormat::Text,
        }
    }

    #[test]
    fn answers_are_a_pure_function_of_the_request() {
        let r = request(vec![Message::new(Role::User, "What is CSP?")]);
        assert_eq!(answer(&r), answer(&r));
        assert_eq!(answer(&r).message.content, "Offline answer to: What is CSP?");
        let tokens = answer(&r).tokens.unwrap();
        assert!(tokens.prompt > 0 && tokens.completion > 0 && !tokens.estimated);
    }

    #[test]
    fn tools_are_called_then_their_results_used() {
        let mut r = request(vec![Message::new(Role::User, "Please use lookup for order 42")]);
        r.tools = vec![
            ToolSpec { name: "other".into(), description: String::new(), parameters: json!({}) },
            ToolSpec {
                name: "lookup".into(),
                description: "find an order".into(),
                parameters: json!({ "type": "object", "properties": { "order": { "type": "integer", "minimum": 1 } } }),
            },
        ];
        let first = answer(&r);
        assert_eq!(first.finish_reason, "tool_calls");
        let call = &first.message.tool_calls[0];
        assert_eq!(call.name, "lookup");
        assert_eq!(serde_json::from_str::<Value>(&call.arguments).unwrap(), json!({ "order": 1 }));
        r.messages.push(first.message.clone());
        r.messages.push(Message {
            role: Role::Tool,
            content: "{\"total\": 12}".into(),
            tool_calls: vec![],
            tool_call_id: call.id.clone(),
        });
        let second = answer(&r);
        assert_eq!(second.finish_reason, "stop");
        assert!(second.message.content.contains("total"), "{}", second.message.content);
    }

    #[test]
    fn analyses_are_what_the_text_says() {
        let text =
            "I love this product, the support team in Paris was excellent. Ada Lovelace said it was fast.";
        assert_eq!(sentiment(text)["label"], "positive");
        assert_eq!(sentiment("Terrible. It broke and support was slow.")["label"], "negative");
        assert_eq!(summary(text), json!("I love this product, the support team in Paris was excellent."));
        assert!(keywords(text).as_array().unwrap().contains(&json!("support")));
        let labels = ["billing question".to_owned(), "product feedback".to_owned()];
        assert_eq!(classification("Feedback on the product", &labels)["label"], "product feedback");
        let names: Vec<Value> = entities(text).as_array().unwrap().clone();
        assert!(names.contains(&json!({ "text": "Paris", "type": "location" })), "{names:?}");
        assert!(names.contains(&json!({ "text": "Ada Lovelace", "type": "person" })), "{names:?}");
    }

    #[test]
    fn output_budgets_are_respected() {
        let mut r = request(vec![Message::new(Role::User, "many words here ".repeat(50))]);
        r.max_tokens = 5;
        let reply = answer(&r);
        assert_eq!(reply.finish_reason, "length");
        assert!(reply.tokens.unwrap().completion <= 5);
    }
}
