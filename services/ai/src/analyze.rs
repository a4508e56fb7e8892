//! Analyze and GenerateCode: what the model is asked, the JSON Schema its answer must match,
//! and the check of that answer.

use serde_json::{Value, json};

use crate::model::{Message, ResponseFormat, Role};

/// One kind of analysis.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Kind {
    Sentiment,
    Summary,
    Keywords,
    Classification,
    Entities,
}

impl Kind {
    pub(crate) const ALL: [Kind; 5] =
        [Kind::Sentiment, Kind::Summary, Kind::Keywords, Kind::Classification, Kind::Entities];

    pub(crate) fn key(self) -> &'static str {
        match self {
            Kind::Sentiment => "sentiment",
            Kind::Summary => "summary",
            Kind::Keywords => "keywords",
            Kind::Classification => "classification",
            Kind::Entities => "entities",
        }
    }

    fn schema(self, labels: &[String]) -> Value {
        match self {
            Kind::Sentiment => json!({
                "type": "object",
                "properties": {
                    "label": { "enum": ["positive", "negative", "neutral"] },
                    "score": { "type": "number", "minimum": -1, "maximum": 1 }
                },
                "required": ["label", "score"],
                "additionalProperties": false
            }),
            Kind::Summary => json!({ "type": "string", "minLength": 1, "maxLength": 2000 }),
            Kind::Keywords => {
                json!({ "type": "array", "items": { "type": "string", "minLength": 1 }, "maxItems": 20 })
            }
            Kind::Classification => json!({
                "type": "object",
                "properties": {
                    "label": { "enum": labels },
                    "confidence": { "type": "number", "minimum": 0, "maximum": 1 }
                },
                "required": ["label", "confidence"],
                "additionalProperties": false
            }),
            Kind::Entities => json!({
                "type": "array",
                "maxItems": 100,
                "items": {
                    "type": "object",
                    "properties": {
                        "text": { "type": "string", "minLength": 1 },
                        "type": { "enum": ["person", "organization", "location", "date", "other"] }
                    },
                    "required": ["text", "type"],
                    "additionalProperties": false
                }
            }),
        }
    }

    fn instruction(self) -> &'static str {
        match self {
            Kind::Sentiment => "sentiment: label positive, negative or neutral, and a score from -1 to 1",
            Kind::Summary => "summary: a short summary in the text's language",
            Kind::Keywords => "keywords: the key words and phrases, most important first",
            Kind::Classification => {
                "classification: the one label that fits best, with a confidence from 0 to 1"
            }
            Kind::Entities => {
                "entities: the named people, organizations, locations and dates, each with its type"
            }
        }
    }
}

/// The schema of an analysis of these kinds.
pub(crate) fn schema(kinds: &[Kind], labels: &[String]) -> Value {
    let properties: serde_json::Map<String, Value> =
        kinds.iter().map(|k| (k.key().to_owned(), k.schema(labels))).collect();
    let required: Vec<&str> = kinds.iter().map(|k| k.key()).collect();
    json!({ "type": "object", "properties": properties, "required": required, "additionalProperties": false })
}

/// What the model is asked.
pub(crate) fn messages(text: &str, kinds: &[Kind], labels: &[String]) -> (Vec<Message>, ResponseFormat) {
    let mut asked: Vec<String> = kinds.iter().map(|k| format!("- {}", k.instruction())).collect();
    if kinds.contains(&Kind::Classification) {
        asked.push(format!("The labels are: {}.", labels.join(", ")));
    }
    let system = format!(
        "Analyse the user's text. Answer with one JSON object and nothing else, with these keys:\n{}",
        asked.join("\n")
    );
    let format = ResponseFormat::Json { name: "analysis".into(), schema: schema(kinds, labels) };
    (vec![Message::new(Role::System, system), Message::new(Role::User, text)], format)
}

/// The schema of generated code.
pub(crate) fn code_schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "code": { "type": "string" },
            "tests": { "type": "string" },
            "documentation": { "type": "string" }
        },
        "required": ["code", "tests", "documentation"],
        "additionalProperties": false
    })
}

/// What the model is asked for code.
pub(crate) fn code_messages(spec: &str, language: &str) -> (Vec<Message>, ResponseFormat) {
    let system = "You write production-quality code. Answer with one JSON object and nothing else: \
                  `code` (the implementation), `tests` (tests of it in the language's usual framework) \
                  and `documentation` (Markdown: what it does and how to use it).";
    let user = format!("Language: {language}\n{spec}");
    let format = ResponseFormat::Json { name: "code".into(), schema: code_schema() };
    (vec![Message::new(Role::System, system), Message::new(Role::User, user)], format)
}

/// The answer as JSON matching `schema`, or what is wrong with it (for asking again).
pub(crate) fn check(answer: &str, schema: &Value) -> Result<Value, String> {
    let text = answer.trim();
    // Some models wrap JSON in a Markdown fence.
    let text = text
        .strip_prefix("```json")
        .or_else(|| text.strip_prefix("```"))
        .and_then(|t| t.strip_suffix("```"))
        .unwrap_or(text)
        .trim();
    let value: Value = serde_json::from_str(text).map_err(|e| format!("it is not JSON ({e})"))?;
    let validator = jsonschema::validator_for(schema).map_err(|e| format!("the schema is invalid: {e}"))?;
    let problems: Vec<String> =
        validator.iter_errors(&value).take(5).map(|e| format!("{} at `{}`", e, e.instance_path())).collect();
    if problems.is_empty() { Ok(value) } else { Err(problems.join("; ")) }
}

/// The follow-up that asks again after a malformed answer.
pub(crate) fn ask_again(answer: &str, problem: &str) -> [Message; 2] {
    [
        Message::new(Role::Assistant, answer.chars().take(20_000).collect::<String>()),
        Message::new(
            Role::User,
            format!(
                "That answer does not match the required JSON Schema: {problem}. Answer again with only the JSON object."
            ),
        ),
    ]
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn answers_are_checked_against_the_kinds_schema() {
        let labels = vec!["billing".to_owned(), "bug".to_owned()];
        let s = schema(&[Kind::Sentiment, Kind::Classification], &labels);
        let good = r#"{"sentiment": {"label": "positive", "score": 0.5}, "classification": {"label": "bug", "confidence": 0.9}}"#;
        assert!(check(good, &s).is_ok());
        assert!(check(&format!("```json\n{good}\n```"), &s).is_ok());
        let bad = r#"{"sentiment": {"label": "ecstatic", "score": 2}, "classification": {"label": "bug", "confidence": 0.9}}"#;
        let problem = check(bad, &s).unwrap_err();
        assert!(problem.contains("/sentiment"), "{problem}");
        assert!(check("not json", &s).unwrap_err().contains("not JSON"));
    }
}
