//! Which topic filters the broker holds for us, kept in step with what the flows need. No I/O
//! here: the session feeds in what happens (a connection, a new set of filters, a SUBACK) and
//! sends the packets this returns.
//!
//! The broker's session is the truth, and we cannot ask it what it holds. So:
//! - **Every connection subscribes every filter the flows need**, whatever the CONNACK's
//!   "session present" says: a broker that crashed before saving its state may come back with
//!   the session and without a subscription made since. With MQTT 5 the SUBSCRIBE asks for
//!   Retain Handling 1, so subscribing again costs no resend; with 3.1.1 the broker resends its
//!   retained messages, and `crate::retained` keeps each from being stored twice.
//! - **What no flow needs is unsubscribed in any form**: a filter dropped from the flows, or one
//!   under another shared group (the gateway restarted with a new `MQTT_SHARED_GROUP`). The
//!   forms this client id may hold come from [`super::held`], a record that is never smaller
//!   than what the broker holds; unsubscribing a form the broker does not hold is harmless.
//! - **Ready means answered**: every wanted filter has its SUBACK on this connection, and the
//!   forms no flow needs are gone, so a message published once ready is stored exactly once.

use super::protocol::{self, Grants, Outgoing, Refusal};
use crate::config::MqttSettings;
use rumqttc::QoS;
use std::collections::{BTreeMap, BTreeSet, HashMap};

/// A SUBSCRIBE or UNSUBSCRIBE carries at most this many filters, and about this many bytes:
/// thousands of flows go out in packets every broker takes.
const FILTERS_PER_PACKET: usize = 100;
const BYTES_PER_PACKET: usize = 16 * 1024;

/// How flows' topic filters are subscribed: the QoS, and the shared group, if any.
#[derive(Debug, Clone)]
pub struct Subscriptions {
    pub qos: QoS,
    pub shared_group: Option<String>,
}

impl Subscriptions {
    pub fn new(settings: &MqttSettings) -> Subscriptions {
        let qos = if settings.qos == 0 { QoS::AtMostOnce } else { QoS::AtLeastOnce };
        Subscriptions { qos, shared_group: settings.shared_group.clone() }
    }

    /// The filter as sent to the broker. Messages still arrive with their real topic, so flows
    /// match them with the plain filter.
    pub fn broker_filter(&self, filter: &str) -> String {
        match &self.shared_group {
            Some(group) => format!("$share/{group}/{filter}"),
            None => filter.to_owned(),
        }
    }
}

/// How the broker answered one filter on the current connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Grant {
    Granted(QoS),
    Refused(Refusal),
}

/// What one SUBACK meant.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct SubAckReport {
    pub accepted: Vec<String>,
    /// Granted below the QoS asked: the filter and the QoS granted.
    pub downgraded: Vec<(String, QoS)>,
    pub refused: Vec<(String, Refusal)>,
}

/// A form being unsubscribed, and the wanted filter it was, if it was one.
#[derive(Debug, Clone)]
struct Leaving {
    form: String,
    filter: Option<String>,
}

/// What the broker said on the current connection.
#[derive(Debug, Default)]
struct Link {
    granted: BTreeMap<String, Grant>,
    /// SUBSCRIBEs sent and not yet answered, by packet id: topic filters.
    subscribing: HashMap<u16, Vec<String>>,
    unsubscribing: HashMap<u16, Vec<Leaving>>,
    /// Whether the forms held from earlier connections were looked at (always, with a clean
    /// session: it holds none).
    held_checked: bool,
    next_pkid: u16,
}

impl Link {
    fn pkid(&mut self) -> u16 {
        self.next_pkid = self.next_pkid.checked_add(1).unwrap_or(1);
        self.next_pkid
    }
}

pub struct SubscriptionSync {
    forms: Subscriptions,
    wanted: BTreeSet<String>,
    link: Link,
}

impl SubscriptionSync {
    pub fn new(forms: Subscriptions, wanted: BTreeSet<String>) -> SubscriptionSync {
        SubscriptionSync { forms, wanted, link: Link::default() }
    }

    pub fn forms(&self) -> &Subscriptions {
        &self.forms
    }

    /// The broker forms of every wanted filter.
    pub fn wanted_forms(&self) -> Vec<String> {
        self.wanted.iter().map(|f| self.forms.broker_filter(f)).collect()
    }

    /// A new connection: every wanted filter is subscribed. `persistent`: the broker may hold
    /// forms of earlier connections, to be looked at with [`SubscriptionSync::held`].
    pub fn connected(&mut self, persistent: bool) -> Vec<Outgoing> {
        self.link = Link { held_checked: !persistent, ..Link::default() };
        self.sync()
    }

    /// Asks for exactly `filters`. Filters the broker refused on this connection are asked for
    /// again: an operator who fixed the broker's ACL reloads the flows to retry.
    pub fn want(&mut self, filters: BTreeSet<String>) -> Vec<Outgoing> {
        self.wanted = filters;
        self.link.granted.retain(|_, grant| matches!(grant, Grant::Granted(_)));
        self.sync()
    }

    /// The forms this client id may hold from earlier connections (`None` when they could not
    /// be read): those no flow needs are unsubscribed.
    pub fn held(&mut self, held: Option<BTreeSet<String>>) -> Vec<Outgoing> {
        self.link.held_checked = true;
        let Some(held) = held else { return Vec::new() };
        let wanted: BTreeSet<String> = self.wanted_forms().into_iter().collect();
        let leaving: BTreeSet<&String> =
            self.link.unsubscribing.values().flatten().map(|l| &l.form).collect();
        let stale: Vec<Leaving> = held
            .into_iter()
            .filter(|form| !wanted.contains(form) && !leaving.contains(form))
            .map(|form| Leaving { form, filter: None })
            .collect();
        self.unsubscribe(stale)
    }

    /// Records a SUBACK. `None` when it answers nothing we sent on this connection.
    pub fn suback(&mut self, pkid: u16, grants: Grants) -> Option<SubAckReport> {
        let filters = self.link.subscribing.remove(&pkid)?;
        let mut report = SubAckReport::default();
        let missing = Err(Refusal { code: 0x80, reason: "no answer in the SUBACK", v311_code: 0x80 });
        for (filter, grant) in filters.into_iter().zip(grants.into_iter().chain(std::iter::repeat(missing))) {
            let grant = match grant {
                Ok(qos) => {
                    if (qos as u8) < (self.forms.qos as u8) {
                        report.downgraded.push((filter.clone(), qos));
                    }
                    report.accepted.push(filter.clone());
                    Grant::Granted(qos)
                }
                Err(refusal) => {
                    report.refused.push((filter.clone(), refusal.clone()));
                    Grant::Refused(refusal)
                }
            };
            self.link.granted.insert(filter, grant);
        }
        Some(report)
    }

    /// Records an UNSUBACK: the forms now gone, and the packets to send next (a filter wanted
    /// again meanwhile is subscribed again now). `None` when it answers nothing we sent.
    pub fn unsuback(&mut self, pkid: u16) -> Option<(Vec<String>, Vec<Outgoing>)> {
        let gone = self.link.unsubscribing.remove(&pkid)?;
        for leaving in &gone {
            if let Some(filter) = &leaving.filter {
                self.link.granted.remove(filter);
            }
        }
        let forms = gone.into_iter().map(|l| l.form).collect();
        Some((forms, self.sync()))
    }

    /// The SUBSCRIBEs and UNSUBSCRIBEs that bring the connection to the wanted set.
    fn sync(&mut self) -> Vec<Outgoing> {
        let in_progress: BTreeSet<&String> = self.link.subscribing.values().flatten().collect();
        let leaving: BTreeSet<&String> =
            self.link.unsubscribing.values().flatten().filter_map(|l| l.filter.as_ref()).collect();
        // A filter still being unsubscribed waits for its UNSUBACK, which syncs again.
        let new: Vec<String> = self
            .wanted
            .iter()
            .filter(|f| {
                !self.link.granted.contains_key(*f) && !in_progress.contains(f) && !leaving.contains(f)
            })
            .cloned()
            .collect();
        let old: Vec<Leaving> = self
            .link
            .granted
            .iter()
            .filter(|(f, grant)| {
                !self.wanted.contains(*f) && !leaving.contains(f) && matches!(grant, Grant::Granted(_))
            })
            .map(|(f, _)| Leaving { form: self.forms.broker_filter(f), filter: Some(f.clone()) })
            .collect();
        let mut packets = Vec::new();
        for chunk in chunks(new, |f| protocol::subscribe_bytes(&self.forms.broker_filter(f))) {
            let pkid = self.link.pkid();
            let filters = chunk.iter().map(|f| self.forms.broker_filter(f)).collect();
            packets.push(Outgoing::Subscribe { pkid, filters, qos: self.forms.qos });
            self.link.subscribing.insert(pkid, chunk);
        }
        packets.extend(self.unsubscribe(old));
        packets
    }

    fn unsubscribe(&mut self, leaving: Vec<Leaving>) -> Vec<Outgoing> {
        let mut packets = Vec::new();
        for chunk in chunks(leaving, |l| protocol::subscribe_bytes(&l.form)) {
            let pkid = self.link.pkid();
            let filters = chunk.iter().map(|l| l.form.clone()).collect();
            packets.push(Outgoing::Unsubscribe { pkid, filters });
            self.link.unsubscribing.insert(pkid, chunk);
        }
        packets
    }

    /// Every wanted filter answered, nothing in progress, no form left that no flow needs.
    pub fn is_ready(&self) -> bool {
        self.link.held_checked
            && self.link.subscribing.is_empty()
            && self.link.unsubscribing.is_empty()
            && self.wanted.iter().all(|f| self.link.granted.contains_key(f))
    }

    /// Each refused filter with the broker's reason, for `/readyz`.
    pub fn refused(&self) -> Vec<String> {
        self.link
            .granted
            .iter()
            .filter_map(|(filter, grant)| match grant {
                Grant::Refused(refusal) => Some(format!("{filter} ({})", refusal.reason)),
                Grant::Granted(_) => None,
            })
            .collect()
    }
}

/// Splits `items` into packets' worth, by count and by bytes.
fn chunks<T>(items: Vec<T>, bytes: impl Fn(&T) -> usize) -> Vec<Vec<T>> {
    let mut chunks: Vec<Vec<T>> = Vec::new();
    let mut size = 0;
    for item in items {
        let item_bytes = bytes(&item);
        match chunks.last_mut() {
            Some(last) if last.len() < FILTERS_PER_PACKET && size + item_bytes <= BYTES_PER_PACKET => {
                size += item_bytes;
                last.push(item);
            }
            _ => {
                size = item_bytes;
                chunks.push(vec![item]);
            }
        }
    }
    chunks
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(filters: &[&str]) -> BTreeSet<String> {
        filters.iter().map(|f| f.to_string()).collect()
    }

    fn shared(group: &str) -> Subscriptions {
        Subscriptions { qos: QoS::AtLeastOnce, shared_group: Some(group.into()) }
    }

    /// Every SUBSCRIBE's filters and every UNSUBSCRIBE's, as sent.
    fn sent(packets: &[Outgoing]) -> (Vec<String>, Vec<String>) {
        let (mut subscribed, mut unsubscribed) = (Vec::new(), Vec::new());
        for packet in packets {
            match packet {
                Outgoing::Subscribe { filters, .. } => subscribed.extend(filters.iter().cloned()),
                Outgoing::Unsubscribe { filters, .. } => unsubscribed.extend(filters.iter().cloned()),
                _ => {}
            }
        }
        (subscribed, unsubscribed)
    }

    /// Answers every SUBSCRIBE in `packets` with QoS 1 and every UNSUBSCRIBE, as a broker would.
    fn answer(sync: &mut SubscriptionSync, packets: Vec<Outgoing>) {
        let mut queue = packets;
        while let Some(packet) = queue.pop() {
            match packet {
                Outgoing::Subscribe { pkid, filters, .. } => {
                    sync.suback(pkid, filters.iter().map(|_| Ok(QoS::AtLeastOnce)).collect()).unwrap();
                }
                Outgoing::Unsubscribe { pkid, .. } => queue.extend(sync.unsuback(pkid).unwrap().1),
                _ => {}
            }
        }
    }

    #[test]
    fn every_connection_subscribes_every_wanted_filter() {
        let mut sync = SubscriptionSync::new(shared("g"), set(&["a/#", "b"]));
        for _ in 0..2 {
            let packets = sync.connected(false);
            assert_eq!(sent(&packets).0, vec!["$share/g/a/#", "$share/g/b"]);
            assert!(!sync.is_ready());
            answer(&mut sync, packets);
            assert!(sync.is_ready());
        }
    }

    #[test]
    fn forms_held_that_no_flow_needs_are_unsubscribed_before_ready() {
        let mut sync = SubscriptionSync::new(shared("g2"), set(&["a"]));
        let packets = sync.connected(true);
        answer(&mut sync, packets);
        assert!(!sync.is_ready(), "not ready before the held forms were looked at");
        let packets = sync.held(Some(set(&["$share/g1/a", "$share/g2/a", "old/#"])));
        assert_eq!(sent(&packets).1, vec!["$share/g1/a", "old/#"]);
        assert!(!sync.is_ready());
        let Outgoing::Unsubscribe { pkid, .. } = packets[0] else { panic!() };
        let (gone, next) = sync.unsuback(pkid).unwrap();
        assert_eq!(gone, vec!["$share/g1/a", "old/#"]);
        assert!(next.is_empty());
        assert!(sync.is_ready());
    }

    #[test]
    fn a_filter_wanted_again_while_it_is_unsubscribed_is_subscribed_after_the_unsuback() {
        let mut sync = SubscriptionSync::new(shared("g"), set(&["a"]));
        let packets = sync.connected(false);
        answer(&mut sync, packets);
        let leaving = sync.want(set(&[]));
        assert_eq!(sent(&leaving).1, vec!["$share/g/a"]);
        assert!(sync.want(set(&["a"])).is_empty(), "waits for the UNSUBACK");
        let Outgoing::Unsubscribe { pkid, .. } = leaving[0] else { panic!() };
        let (_, next) = sync.unsuback(pkid).unwrap();
        assert_eq!(sent(&next).0, vec!["$share/g/a"], "the UNSUBACK syncs again");
        answer(&mut sync, next);
        assert!(sync.is_ready());
    }

    #[test]
    fn refusals_are_kept_with_their_reason_and_retried_on_the_next_want() {
        let mut sync = SubscriptionSync::new(
            Subscriptions { qos: QoS::AtLeastOnce, shared_group: None },
            set(&["x", "y"]),
        );
        let packets = sync.connected(false);
        let Outgoing::Subscribe { pkid, .. } = packets[0] else { panic!() };
        let denied = Refusal { code: 0x87, reason: "not authorized", v311_code: 0x87 };
        let report = sync.suback(pkid, vec![Err(denied.clone()), Ok(QoS::AtMostOnce)]).unwrap();
        assert_eq!(report.refused, vec![("x".to_owned(), denied)]);
        assert_eq!(report.downgraded, vec![("y".to_owned(), QoS::AtMostOnce)]);
        assert!(sync.is_ready(), "a refusal is an answer");
        assert_eq!(sync.refused(), vec!["x (not authorized)"]);
        assert_eq!(sent(&sync.want(set(&["x", "y"]))).0, vec!["x"]);
    }

    #[test]
    fn thousands_of_filters_go_out_in_bounded_packets() {
        let wanted: BTreeSet<String> = (0..2_500).map(|i| format!("devices/{i:05}/#")).collect();
        let mut sync = SubscriptionSync::new(shared("g"), wanted);
        let packets = sync.connected(false);
        assert_eq!(packets.len(), 25);
        assert_eq!(sent(&packets).0.len(), 2_500);
        let long = "x".repeat(250);
        let many: Vec<String> = (0..100).map(|i| format!("{long}{i}")).collect();
        assert!(chunks(many, |f| protocol::subscribe_bytes(f)).len() > 1, "bytes bound a packet too");
    }
}
