//! Run ids as they arrive: the one parser for every place a run is named (a view's path, a
//! JSON body of a view, an event or an admin route, the configuration, an origin's list of
//! runs, a field of the event stream), so that one run has one id wherever it is named and an
//! invalidation reaches the keys its reads were stored under.

use serde_json::{Number, Value};

/// The largest run id accepted as a JSON number: beyond 2^53 - 1 a number no longer names
/// one integer everywhere (JavaScript's `Number.MAX_SAFE_INTEGER`). Larger ids work as strings.
pub const MAX_INTEGER_ID: u64 = 9_007_199_254_740_991;

/// `model_run_id` as an OpenAPI pattern (what [`super::is_run_id`] accepts).
pub const RUN_ID_PATTERN: &str = "^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$";

/// A run id as it arrives, typed by where it comes from.
#[derive(Debug, Clone, Copy)]
pub enum RawRunId<'a> {
    /// Text that is text: a path segment, a JSON string.
    Text(&'a str),
    /// A JSON value: a string is [`RawRunId::Text`], a number must be a non-negative integer
    /// (`42` and `42.0` are the id `"42"`, as JSON Schema's `integer` has it), anything else
    /// is refused.
    Json(&'a Value),
}

/// Parses a run id: the id as every key, tag and origin path names it, or why it is none.
pub fn parse_run_id(raw: RawRunId<'_>) -> Result<String, String> {
    let id = match raw {
        RawRunId::Text(s) => s.to_owned(),
        RawRunId::Json(Value::String(s)) => s.clone(),
        RawRunId::Json(Value::Number(n)) => {
            integral(n).map(|n| n.to_string()).ok_or_else(|| {
                format!(
                    "model_run_id {n} must be a string or an integer from 0 to {MAX_INTEGER_ID}"
                )
            })?
        }
        RawRunId::Json(_) => {
            return Err("model_run_id must be a string or a non-negative integer".into());
        }
    };
    super::validate_run_id(&id)?;
    Ok(id)
}

/// The runs that untyped text may name: a field of the event stream, where a client that
/// writes a number writes its decimal form (`42`, or `42.0` from a float) and nothing tells
/// it from a string id. The text read as a string (when it is an id) and read as a JSON number
/// (when it is an integer in range) are both named, the number's id first: an event that
/// invalidates one run too many is harmless, one that misses the run it meant is not. Plain
/// digits read the same both ways and name one run.
pub fn run_ids_in_untyped_text(text: &str) -> Result<Vec<String>, String> {
    let as_text = parse_run_id(RawRunId::Text(text));
    // `Number`'s parser skips surrounding whitespace; a stream field with spaces is no number.
    let as_number = text
        .parse::<Number>()
        .ok()
        .filter(|_| text.trim() == text && !text.is_empty())
        .and_then(|n| parse_run_id(RawRunId::Json(&Value::Number(n))).ok());
    let mut ids: Vec<String> = as_number.into_iter().collect();
    match as_text {
        Ok(id) if !ids.contains(&id) => ids.push(id),
        Ok(_) => {}
        Err(e) if ids.is_empty() => return Err(e),
        Err(_) => {}
    }
    Ok(ids)
}

/// The decimal text of an integral JSON number in `0..=MAX_INTEGER_ID` (`42.0` is `42`).
pub fn integral_text(n: &Number) -> Option<String> {
    integral(n).map(|n| n.to_string())
}

/// An integral JSON number in `0..=MAX_INTEGER_ID`, read exactly (serde_json's
/// `float_roundtrip` makes `2173985236552219.0` that integer, not one unit off).
fn integral(n: &Number) -> Option<u64> {
    n.as_u64()
        .or_else(|| {
            n.as_f64()
                .filter(|f| f.fract() == 0.0 && (0.0..=MAX_INTEGER_ID as f64).contains(f))
                .map(|f| f as u64)
        })
        .filter(|n| *n <= MAX_INTEGER_ID)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn json_id(text: &str) -> Result<String, String> {
        let value: Value = serde_json::from_str(text).expect("json");
        parse_run_id(RawRunId::Json(&value))
    }

    #[test]
    fn a_json_number_is_its_integer_and_a_string_is_itself() {
        for (text, id) in [
            ("42", "42"),
            ("42.0", "42"),
            ("4.2e1", "42"),
            ("\"42.0\"", "42.0"),
            ("\"run-1\"", "run-1"),
            ("2173985236552219.0", "2173985236552219"),
            ("9007199254740991.0", "9007199254740991"),
        ] {
            assert_eq!(json_id(text).as_deref(), Ok(id), "{text}");
        }
        for bad in [
            "-1",
            "1.5",
            "9007199254740992",
            "null",
            "[\"1\"]",
            "\"..\"",
            "\"\"",
        ] {
            assert!(json_id(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn text_is_taken_as_it_is() {
        assert_eq!(parse_run_id(RawRunId::Text("42.0")).as_deref(), Ok("42.0"));
        assert!(parse_run_id(RawRunId::Text("a/b")).is_err());
    }

    #[test]
    fn untyped_text_names_every_run_it_may_mean() {
        let ids = |t: &str| run_ids_in_untyped_text(t);
        assert_eq!(ids("42"), Ok(vec!["42".to_owned()]));
        assert_eq!(ids("42.0"), Ok(vec!["42".to_owned(), "42.0".to_owned()]));
        assert_eq!(ids("1e3"), Ok(vec!["1000".to_owned(), "1e3".to_owned()]));
        assert_eq!(ids("run-7"), Ok(vec!["run-7".to_owned()]));
        // Not integral, or out of range, as a number: the string alone.
        assert_eq!(ids("1.5"), Ok(vec!["1.5".to_owned()]));
        assert_eq!(
            ids("9007199254740993"),
            Ok(vec!["9007199254740993".to_owned()])
        );
        for bad in ["", " 42", "42 ", "-1", "-1.0", "a b", "..", "+42"] {
            assert!(ids(bad).is_err(), "{bad:?}");
        }
        // Whatever the JSON parser makes of a number, the untyped reading includes it.
        for n in [json!(0), json!(7.0), json!(123456789)] {
            let text = n.to_string();
            let typed = parse_run_id(RawRunId::Json(&n)).expect("valid");
            assert!(ids(&text).expect("valid").contains(&typed), "{text}");
        }
    }
}
