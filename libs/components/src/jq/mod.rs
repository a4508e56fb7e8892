//! jq filters (the `jaq` crates): compiled once, run per message within [`Limits`].

use std::sync::Arc;

use jaq_core::{
    Ctx, Vars,
    load::{Arena, File, Loader},
};
use jaq_json::Val;

mod budget;

pub use budget::{Exhausted, Limits};
use budget::{Meter, Metered, Run};

/// Says whether a run should stop now (an execution that was cancelled).
pub type StopCheck = Arc<dyn Fn() -> bool + Send + Sync>;

/// A compiled jq filter, with the limits each of its runs is held to.
pub struct Filter {
    filter: jaq_core::compile::Filter<jaq_core::Native<Metered>>,
    limits: Limits,
    stop: Option<StopCheck>,
}

impl std::fmt::Debug for Filter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("jq::Filter").field("limits", &self.limits).finish_non_exhaustive()
    }
}

/// Compiles a jq expression, or says what is wrong and where.
pub fn compile(code: &str) -> Result<Filter, String> {
    let defs = jaq_core::defs().chain(jaq_std::defs()).chain(jaq_json::defs());
    // jaq's own `range/3` yields without running a term, so it is replaced by a metered one.
    let funs = jaq_core::funs()
        .filter(|(name, args, _)| !(*name == "range" && args.len() == 3))
        .chain([budget::range()])
        .chain(jaq_std::funs())
        .chain(jaq_json::funs());
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
    Ok(Filter { filter, limits: Limits::default(), stop: None })
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

    /// The same filter, its runs held to `limits` and stopped as soon as `stop` says so.
    pub fn bounded(self, limits: Limits, stop: Option<StopCheck>) -> Self {
        Self { limits, stop, ..self }
    }

    /// Runs the filter, handing each output to `f` until it returns `false`. A run over its
    /// [`Limits`] (or stopped) ends with an error saying which limit it reached.
    pub fn each(
        &self,
        input: &serde_json::Value,
        mut f: impl FnMut(serde_json::Value) -> bool,
    ) -> Result<(), String> {
        use serde::Deserialize as _;
        let input = Val::deserialize(input).map_err(|e| format!("unreadable input: {e}"))?;
        let never = || false;
        let stop: &dyn Fn() -> bool = match &self.stop {
            Some(stop) => stop.as_ref(),
            None => &never,
        };
        let meter = Meter::new(self.limits, stop);
        let run = || -> Result<(), String> {
            let ctx = Ctx::<Metered>::new(Run { lut: &self.filter.lut, meter: &meter }, Vars::new([]));
            let mut produced = 0usize;
            for output in self.filter.id.run((ctx, input)).map(jaq_core::unwrap_valr) {
                let value = output.map_err(|e| e.to_string())?;
                produced += 1;
                if produced > meter.limits().outputs {
                    return Err(Exhausted::Outputs.describe(meter.limits()));
                }
                if !f(to_json(&value)) {
                    break;
                }
            }
            Ok(())
        };
        budget::guarded(run).unwrap_or_else(|stopped| Err(stopped.describe(meter.limits())))
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
    use std::time::{Duration, Instant};

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

    fn tight() -> Limits {
        Limits { time: Duration::from_millis(300), memory: 32 << 20, outputs: 1_000, stack: 256 << 10 }
    }

    /// Runs `code` on `input` within `limits`: the error, and how long it took to get it.
    fn runaway(code: &str, input: serde_json::Value, limits: Limits) -> (String, Duration) {
        let filter = compile(code).unwrap().bounded(limits, None);
        let started = Instant::now();
        let err = filter.run(&input).expect_err(code);
        (err, started.elapsed())
    }

    #[test]
    fn runaway_expressions_are_stopped_by_the_limit_they_reach() {
        // Memory is given all the time it needs, and time all the memory.
        let memory = Limits { time: Duration::from_secs(30), memory: 8 << 20, ..tight() };
        let time = Limits { memory: 1 << 30, ..tight() };
        for (code, input, limits, said) in [
            // Collecting an endless generator: memory.
            ("[range(1e18)]", json!(null), memory, "held more than 8 MiB"),
            ("[repeat(.)]", json!("a message"), memory, "held more than 8 MiB"),
            // A string that doubles at every step.
            ("def f: (. + .) | f; f", json!("x"), memory, "held more than 8 MiB"),
            // Endless without holding anything: time.
            ("last(range(1e18))", json!(null), time, "ran longer than 300 ms"),
            ("def f: f; f", json!(null), time, "ran longer than 300 ms"),
            ("reduce range(1e18) as $x (0; . + 1)", json!(null), time, "ran longer than 300 ms"),
            // Endless outputs.
            ("range(1e18)", json!(null), tight(), "more than 1000 results"),
            ("repeat(.)", json!(1), tight(), "more than 1000 results"),
            // Recursion that is not a tail call: the stack.
            ("def f: 1 + f; f", json!(null), time, "recursed too deeply"),
        ] {
            let (err, took) = runaway(code, input, limits);
            assert!(err.contains(said), "{code}: {err}");
            assert!(took < Duration::from_secs(30), "{code} took {took:?}");
        }
    }

    #[test]
    fn a_run_is_stopped_when_its_caller_says_so() {
        let stopped = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stopped.clone();
        let stop: StopCheck = Arc::new(move || flag.load(std::sync::atomic::Ordering::Relaxed));
        let limits = Limits { time: Duration::from_secs(60), ..tight() };
        let filter = compile("last(range(1e18))").unwrap().bounded(limits, Some(stop));
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            stopped.store(true, std::sync::atomic::Ordering::Relaxed);
        });
        let started = Instant::now();
        let err = filter.run(&json!(null)).unwrap_err();
        assert!(err.contains("stopped"), "{err}");
        assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());
    }

    #[test]
    fn bounded_filters_still_do_their_work() {
        let limits = tight();
        let f = compile("[range(0; 10; 3)], [range(5; 0; -2)], ([limit(3; repeat(1))] | add)")
            .unwrap()
            .bounded(limits, None);
        assert_eq!(f.run(&json!(null)).unwrap(), [json!([0, 3, 6, 9]), json!([5, 3, 1]), json!(3)]);
        // A stopped run leaves nothing behind for the next.
        assert!(compile("[repeat(.)]").unwrap().bounded(limits, None).run(&json!(1)).is_err());
        assert_eq!(f.run(&json!(null)).unwrap().len(), 3);
        // Deep but finite recursion and large but bounded data are fine.
        let deep = compile("def f: if . < 100 then . + 1 | f else . end; f").unwrap().bounded(limits, None);
        assert_eq!(deep.run(&json!(0)).unwrap(), [json!(100)]);
        let big = compile("[range(100000)] | length").unwrap().bounded(limits, None);
        assert_eq!(big.run(&json!(null)).unwrap(), [json!(100000)]);
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
