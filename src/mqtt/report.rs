//! What the session tells the operator about its subscriptions: the flows a refused or
//! downgraded filter leaves without messages, and which filters the broker took or dropped.
//!
//! With thousands of flows, one connection answers thousands of SUBSCRIBEs (MQTT 5 sends one
//! per filter, for its Subscription Identifier). So what the SUBACKs and UNSUBACKs say is
//! gathered and told once nothing is left in flight: one line for the filters taken (naming at
//! most [`NAMED`], the rest at debug level), one line per refused or downgraded filter up to
//! [`NAMED`] of each, then a count. The journal gets a line per change, not one per filter.

use super::subscriptions::SubAckReport;
use crate::flows::FlowSet;
use rumqttc::QoS;
use std::collections::HashMap;

/// Filters named, or lines of one kind, at most.
const NAMED: usize = 20;

/// What the broker answered since the last time it was told.
#[derive(Default)]
pub struct Tally {
    answers: SubAckReport,
    unsubscribed: Vec<String>,
}

impl Tally {
    pub fn suback(&mut self, report: SubAckReport) {
        self.answers.accepted.extend(report.accepted);
        self.answers.downgraded.extend(report.downgraded);
        self.answers.refused.extend(report.refused);
    }

    /// Gathers the forms an UNSUBACK dropped.
    pub fn unsuback(&mut self, forms: Vec<String>) {
        self.unsubscribed.extend(forms);
    }

    /// Tells what was gathered; called once nothing is left in flight.
    pub fn flush(&mut self, asked: QoS, flows: &FlowSet) {
        let answers = std::mem::take(&mut self.answers);
        if !answers.downgraded.is_empty() || !answers.refused.is_empty() {
            let mut codes: HashMap<&str, Vec<&str>> = HashMap::new();
            for flow in &flows.flows {
                codes.entry(flow.filter.as_str()).or_default().push(flow.code.as_str());
            }
            let flows_of = |filter: &str| codes.get(filter).map(|c| c.join(", ")).unwrap_or_default();
            for (filter, refusal) in answers.refused.iter().take(NAMED) {
                tracing::error!(
                    error_kind = "subscription_refused",
                    "MQTT broker refused the subscription to {filter} ({}, reason code 0x{:02X}): flows {} receive nothing",
                    refusal.reason,
                    refusal.code,
                    flows_of(filter)
                );
            }
            if answers.refused.len() > NAMED {
                tracing::error!(
                    "MQTT broker refused {} more subscriptions ({} in all); see mqtt-gateway status",
                    answers.refused.len() - NAMED,
                    answers.refused.len()
                );
            }
            for (filter, qos) in answers.downgraded.iter().take(NAMED) {
                tracing::warn!(
                    "MQTT broker granted QoS {} for {filter} where {} was asked: flows {} get at-most-once delivery",
                    *qos as u8,
                    asked as u8,
                    flows_of(filter)
                );
            }
            if answers.downgraded.len() > NAMED {
                tracing::warn!(
                    "MQTT broker granted a lower QoS than asked for {} more filters ({} in all)",
                    answers.downgraded.len() - NAMED,
                    answers.downgraded.len()
                );
            }
        }
        line("Subscribed to", answers.accepted);
        line("Unsubscribed from", std::mem::take(&mut self.unsubscribed));
    }
}

fn line(what: &str, filters: Vec<String>) {
    match filters.len() {
        0 => {}
        n if n <= NAMED => tracing::info!("{what} {}", filters.join(", ")),
        n => {
            tracing::info!("{what} {}, and {} more ({n} in all)", filters[..NAMED].join(", "), n - NAMED);
            tracing::debug!("{what} {}", filters.join(", "));
        }
    }
}
