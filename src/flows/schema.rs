//! Payload schemas: the fields a flow's `payload_schema` column requires of a payload, and
//! their types as Python's `isinstance` judged them.

use serde_json::{Map, Value};

/// A JSON type named in a `payload_schema`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FieldType {
    String,
    Number,
    Integer,
    Boolean,
    Object,
    Array,
}

impl FieldType {
    fn parse(name: &str) -> Option<FieldType> {
        Some(match name.trim().to_ascii_lowercase().as_str() {
            "string" | "str" => FieldType::String,
            "number" | "float" => FieldType::Number,
            "int" | "integer" => FieldType::Integer,
            "bool" | "boolean" => FieldType::Boolean,
            "object" | "dict" => FieldType::Object,
            "array" | "list" => FieldType::Array,
            _ => return None,
        })
    }

    fn name(self) -> &'static str {
        match self {
            FieldType::String => "string",
            FieldType::Number => "number",
            FieldType::Integer => "integer",
            FieldType::Boolean => "boolean",
            FieldType::Object => "object",
            FieldType::Array => "array",
        }
    }

    /// Python's isinstance checks, quirks kept: `bool` is an `int` there, so `true` passes as
    /// an integer or a number; `5.0` is a float, so it does not pass as an integer.
    fn accepts(self, value: &Value) -> bool {
        match (self, value) {
            (FieldType::String, Value::String(_)) => true,
            (FieldType::Number, Value::Number(_) | Value::Bool(_)) => true,
            (FieldType::Integer, Value::Bool(_)) => true,
            (FieldType::Integer, Value::Number(n)) => !n.as_str().contains(['.', 'e', 'E']),
            (FieldType::Boolean, Value::Bool(_)) => true,
            (FieldType::Object, Value::Object(_)) => true,
            (FieldType::Array, Value::Array(_)) => true,
            _ => false,
        }
    }
}

fn json_type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.as_str().contains(['.', 'e', 'E']) => "float",
        Value::Number(_) => "integer",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// The fields a payload must have, each with its type (or any type when the properties form
/// gives none).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PayloadSchema {
    fields: Vec<(String, Option<FieldType>)>,
}

impl PayloadSchema {
    /// Accepts `{"field": "type", ...}` and `{"properties": {"field": {"type": "type"}}}`.
    pub fn parse(text: &str) -> Result<PayloadSchema, String> {
        let value: Value = serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
        let Value::Object(top) = value else {
            return Err(format!("expected a JSON object, got {}", json_type_name(&value)));
        };
        let fields = match top.get("properties") {
            Some(Value::Object(props)) => Self::properties_form(props)?,
            _ => Self::simple_form(&top)?,
        };
        Ok(PayloadSchema { fields })
    }

    fn simple_form(top: &Map<String, Value>) -> Result<Vec<(String, Option<FieldType>)>, String> {
        top.iter()
            .map(|(name, ty)| match ty {
                Value::String(t) => FieldType::parse(t)
                    .map(|t| (name.clone(), Some(t)))
                    .ok_or_else(|| format!("field {name:?} has unknown type {t:?}")),
                other => Err(format!(
                    "field {name:?} should name a type as a string, got {}",
                    json_type_name(other)
                )),
            })
            .collect()
    }

    fn properties_form(props: &Map<String, Value>) -> Result<Vec<(String, Option<FieldType>)>, String> {
        props
            .iter()
            .map(|(name, spec)| {
                let Value::Object(spec) = spec else {
                    return Err(format!("property {name:?} should be an object"));
                };
                match spec.get("type") {
                    None => Ok((name.clone(), None)),
                    Some(Value::String(t)) => FieldType::parse(t)
                        .map(|t| (name.clone(), Some(t)))
                        .ok_or_else(|| format!("property {name:?} has unknown type {t:?}")),
                    Some(other) => Err(format!(
                        "property {name:?} type should be a string, got {}",
                        json_type_name(other)
                    )),
                }
            })
            .collect()
    }

    /// Checks a decoded payload; fields the schema does not name are allowed.
    pub fn validate(&self, payload: &Map<String, Value>) -> Result<(), String> {
        for (name, ty) in &self.fields {
            let Some(value) = payload.get(name) else {
                return Err(format!("missing required field '{name}'"));
            };
            if let Some(ty) = ty {
                if !ty.accepts(value) {
                    return Err(format!(
                        "field '{name}' must be of type {}, got {}",
                        ty.name(),
                        json_type_name(value)
                    ));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rstest::rstest;

    fn obj(s: &str) -> Map<String, Value> {
        serde_json::from_str(s).unwrap()
    }

    #[rstest]
    #[case(r#"{"temperature": "float"}"#, r#"{"temperature": 21}"#, true)]
    #[case(r#"{"temperature": "float"}"#, r#"{"temperature": 21.5, "extra": "ok"}"#, true)]
    #[case(r#"{"temperature": "float"}"#, r#"{"temperature": true}"#, true)]
    #[case(r#"{"temperature": "float"}"#, r#"{"temperature": "21"}"#, false)]
    #[case(r#"{"temperature": "float"}"#, r#"{"humidity": 1}"#, false)]
    #[case(r#"{"temperature": "float"}"#, r#"{"temperature": null}"#, false)]
    #[case(r#"{"n": "int"}"#, r#"{"n": 5}"#, true)]
    #[case(r#"{"n": "integer"}"#, r#"{"n": 5.0}"#, false)]
    #[case(r#"{"n": "int"}"#, r#"{"n": false}"#, true)]
    #[case(r#"{"n": "int"}"#, r#"{"n": 123456789012345678901234567890}"#, true)]
    #[case(r#"{"b": "bool"}"#, r#"{"b": 1}"#, false)]
    #[case(r#"{"s": "str"}"#, r#"{"s": "x"}"#, true)]
    #[case(r#"{"o": "object", "a": "array"}"#, r#"{"o": {}, "a": []}"#, true)]
    #[case(r#"{"o": "object"}"#, r#"{"o": []}"#, false)]
    #[case(r#"{"properties": {"t": {"type": "number"}}}"#, r#"{"t": 1.5}"#, true)]
    #[case(r#"{"properties": {"t": {"type": "number"}}}"#, r#"{"t": "x"}"#, false)]
    #[case(r#"{"properties": {"t": {}}}"#, r#"{"t": "anything"}"#, true)]
    #[case(r#"{"properties": {"t": {}}}"#, r#"{}"#, false)]
    #[case(r#"{}"#, r#"{"x": 1}"#, true)]
    fn schemas_validate_like_the_original(#[case] schema: &str, #[case] payload: &str, #[case] ok: bool) {
        let schema = PayloadSchema::parse(schema).unwrap();
        assert_eq!(schema.validate(&obj(payload)).is_ok(), ok, "{payload}");
    }

    #[test]
    fn validation_errors_name_the_field_and_types() {
        let schema = PayloadSchema::parse(r#"{"temperature": "float"}"#).unwrap();
        assert_eq!(
            schema.validate(&obj(r#"{"temperature": "hot"}"#)).unwrap_err(),
            "field 'temperature' must be of type number, got string"
        );
        assert_eq!(schema.validate(&obj(r#"{}"#)).unwrap_err(), "missing required field 'temperature'");
    }

    #[rstest]
    #[case("[]")]
    #[case("\"float\"")]
    #[case("not json")]
    #[case(r#"{"t": "decimal"}"#)]
    #[case(r#"{"t": 5}"#)]
    #[case(r#"{"properties": {"t": "float"}}"#)]
    #[case(r#"{"properties": {"t": {"type": 1}}}"#)]
    fn malformed_schemas_are_refused(#[case] schema: &str) {
        assert!(PayloadSchema::parse(schema).is_err(), "{schema}");
    }
}
