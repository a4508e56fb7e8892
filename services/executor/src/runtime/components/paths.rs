//! Dotted paths into messages: `payload.items.0.name`. A segment that is a number indexes an
//! array (and names a field of an object).

use serde_json::{Map, Value};

/// A parsed path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Path {
    text: String,
    segments: Vec<String>,
}

fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

impl Path {
    pub(crate) fn parse(text: &str) -> Self {
        Self { text: text.to_owned(), segments: text.split('.').map(str::to_owned).collect() }
    }

    pub(crate) fn as_str(&self) -> &str {
        &self.text
    }

    /// The value at the path, if any.
    pub(crate) fn get<'a>(&self, mut value: &'a Value) -> Option<&'a Value> {
        for segment in &self.segments {
            value = match value {
                Value::Object(map) => map.get(segment)?,
                Value::Array(items) => items.get(segment.parse::<usize>().ok()?)?,
                _ => return None,
            };
        }
        Some(value)
    }

    /// Why [`Path::set`] would fail on `value`, if it would.
    #[inline]
    pub(crate) fn check_set(&self, mut value: &Value) -> Result<(), String> {
        let last = self.segments.len() - 1;
        if last == 0 {
            // One field of the message: only its kind matters.
            return match value {
                Value::Object(_) => Ok(()),
                Value::Array(items) => match self.segments[0].parse::<usize>() {
                    Ok(index) if index <= items.len() => Ok(()),
                    _ => Err(self.blocked(0, value)),
                },
                other => Err(self.blocked(0, other)),
            };
        }
        for (i, segment) in self.segments.iter().enumerate() {
            let next = match value {
                Value::Object(map) => map.get(segment),
                Value::Array(items) => match segment.parse::<usize>() {
                    Ok(index) if index < items.len() || (i == last && index == items.len()) => {
                        items.get(index)
                    }
                    _ => return Err(self.blocked(i, value)),
                },
                Value::Null if i > 0 => None,
                other => return Err(self.blocked(i, other)),
            };
            match next {
                Some(next) if i < last => value = next,
                _ => return Ok(()),
            }
        }
        Ok(())
    }

    fn blocked(&self, at: usize, value: &Value) -> String {
        let parent =
            if at == 0 { "the message".to_owned() } else { format!("`{}`", self.segments[..at].join(".")) };
        format!("cannot set `{}`: {parent} is {}", self.text, kind(value))
    }

    /// Sets the value at the path, creating objects on the way.
    #[inline]
    pub(crate) fn set(&self, mut value: &mut Value, new: Value) -> Result<(), String> {
        let last = self.segments.len() - 1;
        if last == 0
            && let Value::Object(map) = value
        {
            map.insert(self.segments[0].clone(), new);
            return Ok(());
        }
        for (i, segment) in self.segments.iter().enumerate() {
            if value.is_null() && i > 0 {
                *value = Value::Object(Map::new());
            }
            value = match value {
                Value::Object(map) => {
                    if i == last {
                        map.insert(segment.clone(), new);
                        return Ok(());
                    }
                    map.entry(segment.clone()).or_insert(Value::Null)
                }
                Value::Array(items) => {
                    let index =
                        segment.parse::<usize>().map_err(|_| self.blocked(i, &Value::Array(Vec::new())))?;
                    if i == last {
                        match index.cmp(&items.len()) {
                            std::cmp::Ordering::Less => items[index] = new,
                            std::cmp::Ordering::Equal => items.push(new),
                            std::cmp::Ordering::Greater => {
                                return Err(format!(
                                    "cannot set `{}`: index {index} is past the end",
                                    self.text
                                ));
                            }
                        }
                        return Ok(());
                    }
                    items
                        .get_mut(index)
                        .ok_or_else(|| format!("cannot set `{}`: index {index} is past the end", self.text))?
                }
                other => return Err(self.blocked(i, other)),
            };
        }
        Ok(())
    }

    /// Removes and returns the value at the path, if any.
    pub(crate) fn take(&self, mut value: &mut Value) -> Option<Value> {
        let (last, parents) = self.segments.split_last()?;
        for segment in parents {
            value = match value {
                Value::Object(map) => map.get_mut(segment)?,
                Value::Array(items) => items.get_mut(segment.parse::<usize>().ok()?)?,
                _ => return None,
            };
        }
        match value {
            Value::Object(map) => map.remove(last),
            Value::Array(items) => {
                let index = last.parse::<usize>().ok()?;
                (index < items.len()).then(|| items.remove(index))
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn set_get_take() {
        let mut v = json!({ "payload": { "items": [{ "name": "a" }] } });
        Path::parse("payload.step1").set(&mut v, json!(1)).unwrap();
        Path::parse("payload.items.0.name").set(&mut v, json!("b")).unwrap();
        Path::parse("payload.items.1").set(&mut v, json!("appended")).unwrap();
        Path::parse("new.deep.field").set(&mut v, json!(true)).unwrap();
        assert_eq!(Path::parse("payload.items.0.name").get(&v), Some(&json!("b")));
        assert_eq!(Path::parse("new.deep.field").get(&v), Some(&json!(true)));
        assert_eq!(Path::parse("payload.items.1").take(&mut v), Some(json!("appended")));
        assert_eq!(Path::parse("payload.nothing").take(&mut v), None);
        assert_eq!(v["payload"]["step1"], json!(1));
    }

    #[test]
    fn scalars_block_paths() {
        let v = json!({ "a": 5 });
        let e = Path::parse("a.b").check_set(&v).unwrap_err();
        assert_eq!(e, "cannot set `a.b`: `a` is a number");
        assert_eq!(
            Path::parse("x").check_set(&json!(3)).unwrap_err(),
            "cannot set `x`: the message is a number"
        );
        assert!(Path::parse("a").check_set(&v).is_ok());
        assert!(Path::parse("b.c.d").check_set(&v).is_ok());
        let mut n = json!(3);
        assert!(Path::parse("x").set(&mut n, json!(1)).is_err());
    }
}
