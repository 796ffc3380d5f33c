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
mod tree;

pub use schema::PayloadSchema;
pub use topic_filter::TopicFilter;

use sha2::Digest;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, OnceLock};

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
    /// The MQTT 5 Subscription Identifier of its filter (see [`FlowSet::subscriptions`]).
    pub subscription_id: u32,
    metrics: FlowMetrics,
}

impl Flow {
    /// `mqtt_gateway_messages_processed_total` of this flow.
    pub fn processed(&self) -> &metrics::Counter {
        self.metrics.processed.get_or_init(|| {
            metrics::counter!("mqtt_gateway_messages_processed_total", "flow" => self.code.clone(), "action" => self.action.name())
        })
    }

    /// `mqtt_gateway_messages_failed_total` of this flow.
    pub fn failed(&self) -> &metrics::Counter {
        self.metrics.failed.get_or_init(|| {
            metrics::counter!("mqtt_gateway_messages_failed_total", "flow" => self.code.clone(), "action" => self.action.name())
        })
    }

    /// `mqtt_gateway_last_message_timestamp_seconds` of this flow.
    pub fn last_message(&self) -> &metrics::Gauge {
        self.metrics.last_message.get_or_init(|| crate::metrics::last_message_gauge(&self.code))
    }
}

/// A flow's metric series, each registered the first time it is used: a flow without traffic
/// has no series (fifty thousand idle flows add nothing to `/metrics`), and a message costs no
/// label hashing, only the update of a handle kept here for the life of the flow set.
#[derive(Default)]
struct FlowMetrics {
    processed: OnceLock<metrics::Counter>,
    failed: OnceLock<metrics::Counter>,
    last_message: OnceLock<metrics::Gauge>,
}

impl Clone for FlowMetrics {
    /// A copy starts without handles; they are found again on first use.
    fn clone(&self) -> FlowMetrics {
        FlowMetrics::default()
    }
}

impl PartialEq for FlowMetrics {
    /// Handles say nothing about what a flow is.
    fn eq(&self, _: &FlowMetrics) -> bool {
        true
    }
}

impl std::fmt::Debug for FlowMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FlowMetrics")
    }
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
        Ok(Flow {
            id: row.id,
            code: row.code,
            filter,
            action,
            schema,
            subscription_id: 0,
            metrics: FlowMetrics::default(),
        })
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
    /// In id order: a message goes to its flows in that order.
    pub flows: Vec<Arc<Flow>>,
    pub broken: Vec<BrokenFlow>,
    /// Indexes into `flows` by topic filter.
    tree: tree::TopicTree,
    /// Distinct topic filters, counted once at build: the status line reads it every few
    /// seconds, and counting fifty thousand filters each time would cost the runtime's thread.
    filter_count: usize,
}

impl FlowSet {
    pub fn from_rows(rows: Vec<FlowRow>) -> FlowSet {
        let mut set = FlowSet::default();
        let mut flows = Vec::new();
        for row in rows {
            match Flow::try_from(row) {
                Ok(flow) => flows.push(flow),
                Err(broken) => set.broken.push(broken),
            }
        }
        let ids = subscription_ids(flows.iter().map(|f| &f.filter));
        set.filter_count = ids.len();
        for mut flow in flows {
            flow.subscription_id = ids[flow.filter.as_str()];
            set.tree.insert(&flow.filter, set.flows.len() as u32);
            set.flows.push(Arc::new(flow));
        }
        set
    }

    /// How many distinct filters the flows subscribe: several flows may share one.
    pub fn filter_count(&self) -> usize {
        self.filter_count
    }

    /// Each distinct filter with its MQTT 5 Subscription Identifier. With overlapping filters
    /// (`a/#` and `a/+/c`) a version 5 broker may send one copy of a message per matching
    /// subscription, each naming its identifier: the copy then goes only to the flows of the
    /// filter it names that matches, so each flow takes the message once.
    pub fn subscriptions(&self) -> BTreeMap<String, u32> {
        self.flows.iter().map(|f| (f.filter.as_str().to_owned(), f.subscription_id)).collect()
    }

    /// The flows a message on `topic` goes to, in `id` order: a walk down the topic's levels,
    /// whatever the number of flows. `found` is scratch space, reused across calls.
    pub fn matching<'a>(
        &'a self,
        topic: &str,
        found: &'a mut Vec<u32>,
    ) -> impl Iterator<Item = &'a Arc<Flow>> + 'a {
        found.clear();
        self.tree.matches(topic, found);
        found.sort_unstable();
        found.iter().map(|&i| &self.flows[i as usize])
    }

    /// The flows one copy of a message goes to: those of the subscriptions it names (MQTT 5),
    /// or every matching flow when it names none, or none of ours (a 3.1.1 broker, or a copy
    /// queued for a subscription made before the flows changed: nothing is dropped for it).
    pub fn routed<'a>(
        &'a self,
        topic: &str,
        ids: &[u32],
        found: &'a mut Vec<u32>,
    ) -> impl Iterator<Item = &'a Arc<Flow>> + 'a {
        found.clear();
        self.tree.matches(topic, found);
        let named = |i: &u32| ids.contains(&self.flows[*i as usize].subscription_id);
        if !ids.is_empty() && found.iter().any(named) {
            found.retain(named);
        }
        found.sort_unstable();
        found.iter().map(|&i| &self.flows[i as usize])
    }
}

/// Subscription Identifiers are 1 to 268,435,455.
const MAX_SUBSCRIPTION_ID: u32 = 268_435_455;

/// A Subscription Identifier per filter: one per shape ([`TopicFilter::shape`]), since filters of
/// one shape never match the same topic, so that they can share SUBSCRIBE packets; and the same
/// across restarts and flow changes (the broker keeps it with what it queues for the gateway):
/// from a hash of the shape, with the next free value on the rare collision of two shapes.
fn subscription_ids<'a>(filters: impl Iterator<Item = &'a TopicFilter>) -> BTreeMap<String, u32> {
    let mut by_shape: BTreeMap<String, Vec<&TopicFilter>> = BTreeMap::new();
    for filter in filters {
        by_shape.entry(filter.shape()).or_default().push(filter);
    }
    let mut taken: BTreeSet<u32> = BTreeSet::new();
    let mut ids = BTreeMap::new();
    for (shape, filters) in by_shape {
        let digest = sha2::Sha256::digest(shape.as_bytes());
        let mut id =
            u32::from_be_bytes([digest[0], digest[1], digest[2], digest[3]]) % MAX_SUBSCRIPTION_ID + 1;
        while !taken.insert(id) {
            id = id % MAX_SUBSCRIPTION_ID + 1;
        }
        for filter in filters {
            ids.insert(filter.as_str().to_owned(), id);
        }
    }
    ids
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
        assert_eq!(set.matching("s/x", &mut Vec::new()).count(), 2);
        assert_eq!(set.subscriptions().into_keys().collect::<Vec<_>>(), vec!["s/#", "s/+"]);
        assert_eq!(set.filter_count(), 2);
    }

    #[test]
    fn a_copy_goes_to_the_flows_of_the_subscriptions_it_names() {
        let set = FlowSet::from_rows(vec![
            FlowRow { id: 1, ..row("STORE_DB", "a/#", None, "{}") },
            FlowRow { id: 2, ..row("STORE_DB", "a/+/c", None, "{}") },
            FlowRow { id: 3, ..row("STORE_DB", "a/#", None, "{}") },
        ]);
        let ids = set.subscriptions();
        assert_eq!(ids.len(), 2);
        assert_ne!(ids["a/#"], ids["a/+/c"]);
        let routed =
            |named: &[u32]| set.routed("a/b/c", named, &mut Vec::new()).map(|f| f.id).collect::<Vec<_>>();
        assert_eq!(routed(&[ids["a/#"]]), vec![1, 3]);
        assert_eq!(routed(&[ids["a/+/c"]]), vec![2]);
        assert_eq!(routed(&[ids["a/+/c"], ids["a/#"]]), vec![1, 2, 3], "one copy for both");
        assert_eq!(routed(&[]), vec![1, 2, 3], "3.1.1: every matching flow");
        assert_eq!(routed(&[12345]), vec![1, 2, 3], "an identifier of no current filter drops nothing");
    }

    #[test]
    fn subscription_ids_stay_the_same_whatever_else_is_in_the_set() {
        let filter = |f: &str| TopicFilter::parse(f).unwrap();
        let x = filter("x/y/#");
        let alone = subscription_ids([&x].into_iter());
        let fleet: Vec<TopicFilter> = (0..10_000).map(|i| filter(&format!("d/{i}/#"))).collect();
        let alarm = filter("d/+/alarm");
        let crowd = subscription_ids(fleet.iter().chain([&x, &alarm]));
        assert_eq!(alone["x/y/#"], crowd["x/y/#"]);
        assert_eq!(crowd["d/7/#"], crowd["x/y/#"], "one shape, one identifier");
        assert_ne!(crowd["d/7/#"], crowd["d/+/alarm"], "overlapping filters differ");
        assert!(crowd.values().all(|&id| (1..=MAX_SUBSCRIPTION_ID).contains(&id)));
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
