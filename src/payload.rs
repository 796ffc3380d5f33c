//! A payload as the original accepted it: UTF-8 text holding a JSON object, with Python's
//! `NaN` and `Infinity` literals, nested no deeper than [`MAX_DEPTH`]. Anything else is an
//! [`InvalidPayload`]: the processor logs it and counts the message invalid, before any flow.

use serde::Deserialize;
use serde_json::{Map, Value};

/// Deeper payloads are refused as invalid. Python's json module gives up near 1,000 levels
/// (its recursion limit); a legitimate sensor payload is a few levels deep. The bound keeps
/// parsing, formatting and dropping a value well inside a worker thread's stack.
pub const MAX_DEPTH: usize = 512;

/// Why a payload is not a JSON object.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum InvalidPayload {
    #[error("payload is not valid UTF-8: {0}")]
    NotUtf8(String),
    #[error("payload nests JSON deeper than {MAX_DEPTH} levels")]
    TooDeep,
    #[error("payload is not valid JSON: {0}")]
    NotJson(String),
    #[error("payload must be a JSON object, got {0}")]
    NotAnObject(&'static str),
}

/// Decodes a payload the way the original accepted it: UTF-8 text holding a JSON object.
pub fn decode(payload: &[u8]) -> Result<Map<String, Value>, InvalidPayload> {
    let text = std::str::from_utf8(payload).map_err(|e| InvalidPayload::NotUtf8(e.to_string()))?;
    if nesting_depth(text.as_bytes()) > MAX_DEPTH {
        return Err(InvalidPayload::TooDeep);
    }
    let text = python_literals(text);
    let mut de = serde_json::Deserializer::from_str(&text);
    // The depth was bounded above; serde_json's own limit (128) would refuse payloads Python
    // accepted.
    de.disable_recursion_limit();
    let value = Value::deserialize(&mut de)
        .and_then(|v| de.end().map(|()| v))
        .map_err(|e| InvalidPayload::NotJson(e.to_string()))?;
    match value {
        Value::Object(map) => Ok(map),
        Value::Array(_) => Err(InvalidPayload::NotAnObject("an array")),
        Value::String(_) => Err(InvalidPayload::NotAnObject("a string")),
        Value::Number(_) => Err(InvalidPayload::NotAnObject("a number")),
        Value::Bool(_) => Err(InvalidPayload::NotAnObject("a boolean")),
        Value::Null => Err(InvalidPayload::NotAnObject("null")),
    }
}

/// Python's `json` module (the original's parser, and what Python publishers write with)
/// accepts `NaN`, `Infinity` and `-Infinity` as values; serde_json does not. Outside strings,
/// each becomes a number literal with the same meaning to [`crate::pyfmt`]: infinities an
/// overflowing literal (a float of infinite value, as in Python), NaN the marker
/// [`crate::pyfmt::NAN_LITERAL`]. Text without them is returned as it is, without a copy.
fn python_literals(text: &str) -> std::borrow::Cow<'_, str> {
    let bytes = text.as_bytes();
    let mut out: Option<String> = None;
    // Everything before `copied` is in `out` already (or needs no copy).
    let mut copied = 0;
    for (i, _) in outside_strings(bytes) {
        if i < copied {
            continue; // inside a literal just replaced
        }
        let rest = &bytes[i..];
        let found =
            [("NaN", crate::pyfmt::NAN_LITERAL), ("Infinity", "1e999999"), ("-Infinity", "-1e999999")]
                .into_iter()
                .find(|(literal, _)| rest.starts_with(literal.as_bytes()));
        if let Some((literal, number)) = found {
            let out = out.get_or_insert_with(|| String::with_capacity(text.len() + 64));
            out.push_str(&text[copied..i]);
            out.push_str(number);
            copied = i + literal.len();
        }
    }
    match out {
        None => std::borrow::Cow::Borrowed(text),
        Some(mut out) => {
            out.push_str(&text[copied..]);
            std::borrow::Cow::Owned(out)
        }
    }
}

/// The bytes of JSON text outside its strings (the quotes included), with their positions.
/// Linear and allocation-free, so a hostile payload costs no more than reading it.
fn outside_strings(text: &[u8]) -> impl Iterator<Item = (usize, u8)> + '_ {
    let (mut in_string, mut escaped) = (false, false);
    text.iter().enumerate().filter_map(move |(i, &b)| {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            return None;
        }
        in_string = b == b'"';
        Some((i, b))
    })
}

/// The deepest bracket nesting in `text`, ignoring brackets inside strings.
fn nesting_depth(text: &[u8]) -> usize {
    let (mut depth, mut deepest) = (0usize, 0usize);
    for (_, b) in outside_strings(text) {
        match b {
            b'[' | b'{' => {
                depth += 1;
                deepest = deepest.max(depth);
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    deepest
}

#[cfg(test)]
mod tests {
    use super::*;
    use rstest::rstest;

    #[rstest]
    #[case(b"\xff\xfe".as_slice(), "not valid UTF-8")]
    #[case(b"{not json".as_slice(), "not valid JSON")]
    #[case(b"[1, 2]".as_slice(), "got an array")]
    #[case(b"42".as_slice(), "got a number")]
    #[case(b"".as_slice(), "not valid JSON")]
    #[case(b"{} trailing".as_slice(), "not valid JSON")]
    fn bad_payloads_are_explained(#[case] payload: &[u8], #[case] reason: &str) {
        let error = decode(payload).unwrap_err().to_string();
        assert!(error.contains(reason), "{error}");
    }

    #[rstest]
    #[case(r#"{"t": NaN, "h": 40}"#, "nan", "40")]
    #[case(r#"{"t": Infinity, "h": -Infinity}"#, "inf", "-inf")]
    #[case(r#"{"t": "NaN", "h": [NaN]}"#, "NaN", "[NaN]")]
    fn python_literals_are_accepted_and_stored_as_python_does(
        #[case] payload: &str,
        #[case] t: &str,
        #[case] h: &str,
    ) {
        let map = decode(payload.as_bytes()).unwrap();
        assert_eq!(crate::pyfmt::attribute_value(&map["t"]), t);
        assert_eq!(crate::pyfmt::attribute_value(&map["h"]), h);
    }

    #[test]
    fn python_literals_are_refused_in_post_bodies_as_requests_does() {
        let map = decode(br#"{"t": NaN}"#).unwrap();
        let error = crate::pyfmt::request_body_of(&map).unwrap_err().to_string();
        assert!(error.contains("Out of range float values are not JSON compliant"), "{error}");
    }

    #[test]
    fn python_literals_are_not_rewritten_inside_strings() {
        assert!(matches!(python_literals(r#"{"a": "NaN \" Infinity"}"#), std::borrow::Cow::Borrowed(_)));
        assert!(decode(br#"{"a": Nan}"#).is_err(), "only Python's exact spellings");
    }

    #[test]
    fn deep_nesting_is_refused_without_recursing() {
        let deep = format!("{{\"a\":{}{}}}", "[".repeat(10_000), "]".repeat(10_000));
        assert_eq!(decode(deep.as_bytes()), Err(InvalidPayload::TooDeep));
    }

    #[test]
    fn nesting_up_to_the_limit_is_accepted() {
        let n = MAX_DEPTH - 1;
        let ok = format!("{{\"a\":{}{}}}", "[".repeat(n), "]".repeat(n));
        assert!(decode(ok.as_bytes()).is_ok());
    }

    #[test]
    fn brackets_inside_strings_do_not_count() {
        let text = format!("{{\"a\":\"{}\\\"{}\"}}", "[".repeat(1000), "{".repeat(1000));
        assert_eq!(nesting_depth(text.as_bytes()), 1);
    }

    #[test]
    fn duplicate_keys_keep_first_position_and_last_value_like_python() {
        let map = decode(br#"{"a": 1, "b": 2, "a": 3}"#).unwrap();
        assert_eq!(serde_json::to_string(&map).unwrap(), r#"{"a":3,"b":2}"#);
    }
}
