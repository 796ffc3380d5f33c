//! Flows: what the `flows` table says to do with a message, checked once when loaded.
//!
//! A row becomes a [`Flow`] only when every part of it can work: a valid MQTT topic filter, a
//! known action, an endpoint URL where the action needs one and a `payload_schema` of one of the
//! two accepted shapes. A row that fails is a [`BrokenFlow`]: it is reported and skipped, so one
//! bad row never stops the others. The message path then deals only in flows that can work.
//!
//! [`topic_filter`] and [`schema`] check a row's two mini-languages; [`table`] holds every
//! statement on the `flows` table, for the service and the CLI alike.

pub mod schema;
pub mod table;
pub mod topic_filter;

pub use schema::PayloadSchema;
pub use topic_filter::TopicFilter;

use std::collections::BTreeSet;
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
    /// Commit the counter, then POST the payload as JSON to this URL. `raw` is the row's text as
    /// stored: the outbox keeps it with each request and compares it with the row at send time.
    PostEndpoint { url: url::Url, raw: String },
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
                let url = endpoint(row.endpoint_url.as_deref()).map_err(broken)?;
                Action::PostEndpoint { url, raw: row.endpoint_url.clone().unwrap_or_default() }
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

/// The URL a POST_ENDPOINT row's `endpoint_url` names, or why it names none: the check of the
/// load, and of the outbox at send time (the row may have changed since).
pub fn endpoint(raw: Option<&str>) -> Result<url::Url, String> {
    let raw = raw.unwrap_or_default();
    // The outbox keeps the row's text with each request; a longer one could not be queued.
    let chars = raw.chars().count();
    if chars > crate::outbox::queue::URL_CHARS {
        return Err(format!(
            "endpoint_url is {chars} characters long, more than the {} that gateway_outbox.endpoint_url holds",
            crate::outbox::queue::URL_CHARS
        ));
    }
    let raw = raw.trim();
    if raw.is_empty() {
        return Err("action POST_ENDPOINT needs an endpoint_url".to_owned());
    }
    let url = url::Url::parse(raw).map_err(|e| format!("invalid endpoint_url: {e}"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!("endpoint_url must be http or https, not {:?}", url.scheme()));
    }
    Ok(url)
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

#[cfg(test)]
mod tests {
    use super::*;
    use rstest::rstest;

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
    #[case(row("POST_ENDPOINT", "a", Some(&format!("http://h/{}", "p".repeat(500))), "{}"), "more than the 500")]
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

    #[test]
    fn a_post_flow_keeps_its_rows_url_text_which_may_percent_encode_longer() {
        let raw = format!(" http://h/{} ", "é".repeat(240));
        let flow = Flow::try_from(row("POST_ENDPOINT", "a", Some(&raw), "{}")).unwrap();
        let Action::PostEndpoint { url, raw: kept } = flow.action else { panic!("not a POST flow") };
        assert_eq!(kept, raw, "the text as stored, so the outbox column that holds it fits it");
        assert!(url.as_str().len() > 500, "encoded, it would not fit: {}", url.as_str().len());
    }
}
