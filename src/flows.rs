//! Flows: what the `flows` table says to do with a message, checked once when loaded.
//!
//! A row becomes a [`Flow`] only when every part of it can work: a valid MQTT topic filter, a
//! known action, an endpoint URL where the action needs one and a `payload_schema` of one of the
//! two accepted shapes. A row that fails is a [`BrokenFlow`]: it is reported and skipped, so one
//! bad row never stops the others. The message path then deals only in flows that can work.

use serde_json::{Map, Value};
use std::collections::BTreeSet;
use std::fmt;
use std::sync::Arc;

/// A `flows` row as stored, before any checking.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct FlowRow {
    pub id: i32,
    pub code: String,
    pub topic: String,
    pub action: String,
    pub payload_schema: Option<String>,
    pub endpoint_url: Option<String>,
}

/// What a flow does with a valid message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// One `data` row per top-level key, with the counter, in one transaction.
    StoreDb,
    /// Commit the counter, then POST the payload as JSON to this URL.
    PostEndpoint { url: url::Url },
}

impl Action {
    pub fn name(&self) -> &'static str {
        match self {
            Action::StoreDb => "STORE_DB",
            Action::PostEndpoint { .. } => "POST_ENDPOINT",
        }
    }
}

/// A flow that can process messages.
#[derive(Debug, Clone, PartialEq)]
pub struct Flow {
    pub id: i32,
    pub code: String,
    pub filter: TopicFilter,
    pub action: Action,
    pub schema: PayloadSchema,
}

/// A row that cannot work, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokenFlow {
    pub id: i32,
    pub code: String,
    pub reason: String,
}

impl TryFrom<FlowRow> for Flow {
    type Error = BrokenFlow;

    fn try_from(row: FlowRow) -> Result<Flow, BrokenFlow> {
        let broken = |reason: String| BrokenFlow { id: row.id, code: row.code.clone(), reason };
        let filter = TopicFilter::parse(&row.topic)
            .map_err(|e| broken(format!("invalid topic filter {:?}: {e}", row.topic)))?;
        // The original compared the action strings; accepting other spellings only widens what
        // works, it never refuses a row that worked before.
        let action = match row.action.trim().to_ascii_uppercase().as_str() {
            "STORE_DB" => Action::StoreDb,
            "POST_ENDPOINT" => {
                let raw = row.endpoint_url.as_deref().map(str::trim).unwrap_or_default();
                if raw.is_empty() {
                    return Err(broken("action POST_ENDPOINT needs an endpoint_url".to_owned()));
                }
                let url = url::Url::parse(raw).map_err(|e| broken(format!("invalid endpoint_url: {e}")))?;
                if !matches!(url.scheme(), "http" | "https") {
                    return Err(broken(format!(
                        "endpoint_url must be http or https, not {:?}",
                        url.scheme()
                    )));
                }
                Action::PostEndpoint { url }
            }
            other => {
                return Err(broken(format!("unknown action {other:?} (expected STORE_DB or POST_ENDPOINT)")))
            }
        };
        let schema_text = row.payload_schema.as_deref().unwrap_or("null");
        let schema =
            PayloadSchema::parse(schema_text).map_err(|e| broken(format!("invalid payload_schema: {e}")))?;
        Ok(Flow { id: row.id, code: row.code, filter, action, schema })
    }
}

/// Every enabled flow at one moment, as the message path sees it.
#[derive(Debug, Default, Clone)]
pub struct FlowSet {
    pub flows: Vec<Arc<Flow>>,
    pub broken: Vec<BrokenFlow>,
}

impl FlowSet {
    pub fn from_rows(rows: Vec<FlowRow>) -> FlowSet {
        let mut set = FlowSet::default();
        for row in rows {
            match Flow::try_from(row) {
                Ok(flow) => set.flows.push(Arc::new(flow)),
                Err(broken) => set.broken.push(broken),
            }
        }
        set
    }

    /// The distinct filters to subscribe: several flows may share one.
    pub fn filters(&self) -> BTreeSet<String> {
        self.flows.iter().map(|f| f.filter.as_str().to_owned()).collect()
    }

    /// The flows a message on `topic` goes to, in `id` order.
    pub fn matching<'a>(&'a self, topic: &'a str) -> impl Iterator<Item = &'a Arc<Flow>> + 'a {
        self.flows.iter().filter(move |f| f.filter.matches(topic))
    }
}

/// A valid MQTT topic filter (MQTT 3.1.1, section 4.7).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicFilter(String);

impl TopicFilter {
    pub fn parse(filter: &str) -> Result<TopicFilter, String> {
        if filter.is_empty() {
            return Err("a topic filter cannot be empty".to_owned());
        }
        if filter.len() > 65_535 {
            return Err("a topic filter is at most 65535 bytes".to_owned());
        }
        if filter.contains('\0') {
            return Err("a topic filter cannot contain NUL".to_owned());
        }
        let levels: Vec<&str> = filter.split('/').collect();
        for (i, level) in levels.iter().enumerate() {
            if level.contains('#') && (*level != "#" || i + 1 != levels.len()) {
                return Err("'#' must be a whole level and the last one".to_owned());
            }
            if level.contains('+') && *level != "+" {
                return Err("'+' must be a whole level".to_owned());
            }
        }
        Ok(TopicFilter(filter.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// MQTT matching, including the rule that a filter starting with a wildcard does not match
    /// topics starting with `$` (such as `$SYS/...`).
    pub fn matches(&self, topic: &str) -> bool {
        if topic.starts_with('$') && (self.0.starts_with('+') || self.0.starts_with('#')) {
            return false;
        }
        let mut topic_levels = topic.split('/');
        for level in self.0.split('/') {
            match (level, topic_levels.next()) {
                // `sport/#` also matches `sport` itself: '#' covers the parent level.
                ("#", _) => return true,
                ("+", Some(_)) => {}
                (l, Some(t)) if l == t => {}
                _ => return false,
            }
        }
        topic_levels.next().is_none()
    }
}

impl fmt::Display for TopicFilter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

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

    #[rstest]
    #[case("sensors/aht10", "sensors/aht10", true)]
    #[case("sensors/+", "sensors/aht10", true)]
    #[case("sensors/+", "sensors/aht10/x", false)]
    #[case("sensors/#", "sensors", true)]
    #[case("sensors/#", "sensors/a/b/c", true)]
    #[case("#", "anything/at/all", true)]
    #[case("+/+", "a/b", true)]
    #[case("+", "/a", false)]
    #[case("+/a", "/a", true)]
    #[case("a/+/c", "a//c", true)]
    #[case("#", "$SYS/broker/load", false)]
    #[case("+/broker", "$SYS/broker", false)]
    #[case("$SYS/#", "$SYS/broker", true)]
    #[case("a/b", "a/b/", false)]
    #[case("a/b", "A/b", false)]
    fn topic_filters_match_by_mqtt_rules(#[case] filter: &str, #[case] topic: &str, #[case] hit: bool) {
        assert_eq!(TopicFilter::parse(filter).unwrap().matches(topic), hit, "{filter} vs {topic}");
    }

    #[rstest]
    #[case("")]
    #[case("a/#/b")]
    #[case("a#")]
    #[case("a/b+")]
    #[case("a\0b")]
    fn invalid_topic_filters_are_refused(#[case] filter: &str) {
        assert!(TopicFilter::parse(filter).is_err());
    }

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

    fn row(action: &str, topic: &str, url: Option<&str>, schema: &str) -> FlowRow {
        FlowRow {
            id: 7,
            code: "F".into(),
            topic: topic.into(),
            action: action.into(),
            payload_schema: Some(schema.into()),
            endpoint_url: url.map(Into::into),
        }
    }

    #[rstest]
    #[case(row("STORE_DB", "a/#/b", None, "{}"), "invalid topic filter")]
    #[case(row("SEND_MAIL", "a", None, "{}"), "unknown action")]
    #[case(row("POST_ENDPOINT", "a", None, "{}"), "needs an endpoint_url")]
    #[case(row("POST_ENDPOINT", "a", Some("  "), "{}"), "needs an endpoint_url")]
    #[case(row("POST_ENDPOINT", "a", Some("ftp://x/y"), "{}"), "http or https")]
    #[case(row("POST_ENDPOINT", "a", Some("not a url"), "{}"), "invalid endpoint_url")]
    #[case(row("STORE_DB", "a", None, "[1]"), "invalid payload_schema")]
    fn broken_rows_say_what_is_wrong(#[case] row: FlowRow, #[case] reason: &str) {
        let broken = Flow::try_from(row).unwrap_err();
        assert!(broken.reason.contains(reason), "{}", broken.reason);
        assert_eq!((broken.id, broken.code.as_str()), (7, "F"));
    }

    #[test]
    fn flow_set_keeps_good_rows_and_reports_broken_ones() {
        let set = FlowSet::from_rows(vec![
            row("STORE_DB", "s/+", None, "{}"),
            row("BOGUS", "s/x", None, "{}"),
            FlowRow { id: 8, ..row("post_endpoint", "s/#", Some("http://h/p"), "{}") },
        ]);
        assert_eq!(set.flows.len(), 2);
        assert_eq!(set.broken.len(), 1);
        assert_eq!(set.matching("s/x").count(), 2);
        assert_eq!(set.filters().into_iter().collect::<Vec<_>>(), vec!["s/#", "s/+"]);
    }
}
