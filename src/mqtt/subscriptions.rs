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
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};

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

    /// The filter a broker form stands for under these settings; `None` for a form of another
    /// shared group (or of one, without a group now).
    fn filter_of<'a>(&self, form: &'a str) -> Option<&'a str> {
        match &self.shared_group {
            Some(group) => form.strip_prefix("$share/")?.strip_prefix(group.as_str())?.strip_prefix('/'),
            None => (!form.starts_with("$share/")).then_some(form),
        }
    }
}

/// How the broker answered one filter on the current connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Grant {
    /// With the Subscription Identifier it was asked with, if any.
    Granted {
        qos: QoS,
        id: Option<u32>,
    },
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

/// A packet decided on and not sent yet: at most [`IN_FLIGHT`] are unanswered at a time, so
/// that tens of thousands of filters never run out of packet ids.
#[derive(Debug)]
enum Planned {
    Subscribe { filters: Vec<String>, id: Option<u32> },
    Unsubscribe(Vec<Leaving>),
}

/// SUBSCRIBEs and UNSUBSCRIBEs unanswered at once, at most.
const IN_FLIGHT: usize = 1_000;

/// What the broker said on the current connection.
#[derive(Debug, Default)]
struct Link {
    /// SUBSCRIBE carries a Subscription Identifier, the same for every filter of a packet
    /// (MQTT 5).
    with_ids: bool,
    granted: BTreeMap<String, Grant>,
    planned: VecDeque<Planned>,
    /// SUBSCRIBEs sent and not yet answered, by packet id: topic filters, and the identifier
    /// they went with (what the broker will hold, whatever is wanted by the time it answers).
    subscribing: HashMap<u16, (Vec<String>, Option<u32>)>,
    unsubscribing: HashMap<u16, Vec<Leaving>>,
    /// Whether the forms held from earlier connections were looked at (always, with a clean
    /// session: it holds none).
    held_checked: bool,
    next_pkid: u16,
}

impl Link {
    fn pkid(&mut self) -> u16 {
        loop {
            self.next_pkid = self.next_pkid.checked_add(1).unwrap_or(1);
            let id = self.next_pkid;
            if !self.subscribing.contains_key(&id) && !self.unsubscribing.contains_key(&id) {
                return id;
            }
        }
    }

    /// Filters on their way to the broker: planned or sent, not answered.
    fn subscribing(&self) -> BTreeSet<&String> {
        let planned = self.planned.iter().flat_map(|p| match p {
            Planned::Subscribe { filters, .. } => filters.iter().collect::<Vec<_>>(),
            Planned::Unsubscribe(_) => Vec::new(),
        });
        self.subscribing.values().flat_map(|(filters, _)| filters).chain(planned).collect()
    }

    /// Everything being unsubscribed, planned or sent.
    fn leaving(&self) -> impl Iterator<Item = &Leaving> {
        let planned = self.planned.iter().flat_map(|p| match p {
            Planned::Unsubscribe(leaving) => leaving.iter().collect::<Vec<_>>(),
            Planned::Subscribe { .. } => Vec::new(),
        });
        self.unsubscribing.values().flatten().chain(planned)
    }
}

pub struct SubscriptionSync {
    forms: Subscriptions,
    /// Each wanted filter with its Subscription Identifier.
    wanted: BTreeMap<String, u32>,
    link: Link,
}

impl SubscriptionSync {
    pub fn new(forms: Subscriptions, wanted: BTreeMap<String, u32>) -> SubscriptionSync {
        SubscriptionSync { forms, wanted, link: Link::default() }
    }

    pub fn forms(&self) -> &Subscriptions {
        &self.forms
    }

    /// The broker forms of every wanted filter.
    pub fn wanted_forms(&self) -> Vec<String> {
        self.wanted.keys().map(|f| self.forms.broker_filter(f)).collect()
    }

    /// A new connection: every wanted filter is to be subscribed. `persistent`: the broker may
    /// hold forms of earlier connections, to be looked at with [`SubscriptionSync::held`].
    /// `with_ids`: SUBSCRIBE carries Subscription Identifiers (MQTT 5, if the broker has them).
    pub fn connected(&mut self, persistent: bool, with_ids: bool) {
        self.link = Link { held_checked: !persistent, with_ids, ..Link::default() };
        self.sync();
    }

    /// Asks for exactly `filters`. Filters the broker refused on this connection are asked for
    /// again: an operator who fixed the broker's ACL reloads the flows to retry.
    pub fn want(&mut self, filters: BTreeMap<String, u32>) {
        self.wanted = filters;
        self.link.granted.retain(|_, grant| matches!(grant, Grant::Granted { .. }));
        self.sync();
    }

    /// The forms this client id may hold from earlier connections (`None` when they could not
    /// be read): those no flow needs are unsubscribed.
    pub fn held(&mut self, held: Option<BTreeSet<String>>) {
        self.link.held_checked = true;
        let Some(held) = held else { return };
        let wanted: BTreeSet<String> = self.wanted_forms().into_iter().collect();
        let leaving: BTreeSet<&String> = self.link.leaving().map(|l| &l.form).collect();
        let stale: Vec<Leaving> = held
            .into_iter()
            .filter(|form| !wanted.contains(form) && !leaving.contains(form))
            .map(|form| Leaving { form, filter: None })
            .collect();
        self.plan_unsubscribe(stale);
    }

    /// Records a SUBACK. `None` when it answers nothing we sent on this connection.
    pub fn suback(&mut self, pkid: u16, grants: Grants) -> Option<SubAckReport> {
        let (filters, sent_id) = self.link.subscribing.remove(&pkid)?;
        let mut report = SubAckReport::default();
        let missing = Err(Refusal { code: 0x80, reason: "no answer in the SUBACK", v311_code: 0x80 });
        for (filter, grant) in filters.into_iter().zip(grants.into_iter().chain(std::iter::repeat(missing))) {
            let grant = match grant {
                Ok(qos) => {
                    if (qos as u8) < (self.forms.qos as u8) {
                        report.downgraded.push((filter.clone(), qos));
                    }
                    report.accepted.push(filter.clone());
                    Grant::Granted { qos, id: sent_id }
                }
                Err(refusal) => {
                    report.refused.push((filter.clone(), refusal.clone()));
                    Grant::Refused(refusal)
                }
            };
            self.link.granted.insert(filter, grant);
        }
        // A filter whose identifier changed while its SUBSCRIBE was out goes again. Only the
        // filters answered are looked at: a full sync per SUBACK would cost the square of the
        // number of flows on a connection.
        let changed: Vec<String> = report
            .accepted
            .iter()
            .filter(|f| match (self.link.granted.get(*f), self.wanted.get(*f)) {
                (Some(Grant::Granted { id, .. }), Some(_)) => *id != self.id_of(f),
                _ => false,
            })
            .cloned()
            .collect();
        self.plan_subscribe(changed);
        // A filter dropped from the flows while its SUBSCRIBE was out goes away again.
        let unwanted: Vec<Leaving> = report
            .accepted
            .iter()
            .filter(|f| !self.wanted.contains_key(*f))
            .map(|f| Leaving { form: self.forms.broker_filter(f), filter: Some(f.clone()) })
            .collect();
        self.plan_unsubscribe(unwanted);
        Some(report)
    }

    /// Records an UNSUBACK: the forms now gone (a filter wanted again meanwhile is subscribed
    /// again now). `None` when it answers nothing we sent.
    pub fn unsuback(&mut self, pkid: u16) -> Option<Vec<String>> {
        let gone = self.link.unsubscribing.remove(&pkid)?;
        let mut wanted_again = Vec::new();
        for leaving in &gone {
            if let Some(filter) = &leaving.filter {
                self.link.granted.remove(filter);
            }
            // A form left over from an earlier connection may stand for a filter a reload
            // made wanted while it was being unsubscribed: that one waited for this answer.
            let filter = leaving.filter.as_deref().or_else(|| self.forms.filter_of(&leaving.form));
            if let Some(filter) = filter.filter(|f| self.wanted.contains_key(*f)) {
                wanted_again.push(filter.to_owned());
            }
        }
        self.plan_subscribe(wanted_again);
        Some(gone.into_iter().map(|l| l.form).collect())
    }

    /// The packets to send now: what is planned, within [`IN_FLIGHT`] unanswered packets.
    pub fn packets(&mut self) -> Vec<Outgoing> {
        let mut packets = Vec::new();
        while self.link.subscribing.len() + self.link.unsubscribing.len() < IN_FLIGHT {
            let Some(planned) = self.link.planned.pop_front() else { break };
            let pkid = self.link.pkid();
            match planned {
                Planned::Subscribe { filters, id } => {
                    let forms = filters.iter().map(|f| self.forms.broker_filter(f)).collect();
                    packets.push(Outgoing::Subscribe { pkid, filters: forms, qos: self.forms.qos, id });
                    self.link.subscribing.insert(pkid, (filters, id));
                }
                Planned::Unsubscribe(leaving) => {
                    let filters = leaving.iter().map(|l| l.form.clone()).collect();
                    packets.push(Outgoing::Unsubscribe { pkid, filters });
                    self.link.unsubscribing.insert(pkid, leaving);
                }
            }
        }
        packets
    }

    /// The identifier `filter` is subscribed with on this connection.
    fn id_of(&self, filter: &str) -> Option<u32> {
        self.link.with_ids.then(|| self.wanted.get(filter).copied()).flatten()
    }

    /// Plans the SUBSCRIBEs and UNSUBSCRIBEs that bring the connection to the wanted set.
    fn sync(&mut self) {
        let subscribing = self.link.subscribing();
        // A filter still being unsubscribed (in its own name, or as a form left over from an
        // earlier connection) waits for its UNSUBACK, which subscribes it again: sent at once,
        // the SUBSCRIBE's record would be undone by that answer.
        let leaving: BTreeSet<&str> = self
            .link
            .leaving()
            .filter_map(|l| l.filter.as_deref().or_else(|| self.forms.filter_of(&l.form)))
            .collect();
        let new: Vec<String> = self
            .wanted
            .keys()
            .filter(|f| !subscribing.contains(f) && !leaving.contains(f.as_str()))
            .filter(|f| match self.link.granted.get(*f) {
                None => true,
                Some(Grant::Granted { id, .. }) => *id != self.id_of(f),
                Some(Grant::Refused(_)) => false,
            })
            .cloned()
            .collect();
        let old: Vec<Leaving> = self
            .link
            .granted
            .iter()
            .filter(|(f, grant)| {
                !self.wanted.contains_key(*f)
                    && !leaving.contains(f.as_str())
                    && matches!(grant, Grant::Granted { .. })
            })
            .map(|(f, _)| Leaving { form: self.forms.broker_filter(f), filter: Some(f.clone()) })
            .collect();
        self.plan_subscribe(new);
        self.plan_unsubscribe(old);
    }

    fn plan_subscribe(&mut self, filters: Vec<String>) {
        // An identifier is per packet: filters go in packets of one identifier each.
        let mut by_id: BTreeMap<Option<u32>, Vec<String>> = BTreeMap::new();
        for filter in filters {
            by_id.entry(self.id_of(&filter)).or_default().push(filter);
        }
        for (id, filters) in by_id {
            for filters in chunks(filters, |f| protocol::subscribe_bytes(&self.forms.broker_filter(f))) {
                self.link.planned.push_back(Planned::Subscribe { filters, id });
            }
        }
    }

    fn plan_unsubscribe(&mut self, leaving: Vec<Leaving>) {
        for chunk in chunks(leaving, |l| protocol::subscribe_bytes(&l.form)) {
            self.link.planned.push_back(Planned::Unsubscribe(chunk));
        }
    }

    /// Nothing planned and nothing unanswered.
    pub fn idle(&self) -> bool {
        self.link.planned.is_empty() && self.link.subscribing.is_empty() && self.link.unsubscribing.is_empty()
    }

    /// Every wanted filter answered, nothing in progress, no form left that no flow needs.
    pub fn is_ready(&self) -> bool {
        self.link.held_checked && self.idle() && self.wanted.keys().all(|f| self.link.granted.contains_key(f))
    }

    /// Each refused filter with the broker's reason, for `/readyz`.
    pub fn refused(&self) -> Vec<String> {
        self.link
            .granted
            .iter()
            .filter_map(|(filter, grant)| match grant {
                Grant::Refused(refusal) => Some(format!("{filter} ({})", refusal.reason)),
                Grant::Granted { .. } => None,
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

    fn set(filters: &[&str]) -> BTreeMap<String, u32> {
        filters.iter().enumerate().map(|(i, f)| (f.to_string(), i as u32 + 1)).collect()
    }

    fn forms(filters: &[&str]) -> BTreeSet<String> {
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

    /// Answers every packet the sync sends, as a broker would, until nothing is left to send.
    fn answer_all(sync: &mut SubscriptionSync) {
        loop {
            let packets = sync.packets();
            if packets.is_empty() {
                return;
            }
            for packet in packets {
                match packet {
                    Outgoing::Subscribe { pkid, filters, .. } => {
                        sync.suback(pkid, filters.iter().map(|_| Ok(QoS::AtLeastOnce)).collect()).unwrap();
                    }
                    Outgoing::Unsubscribe { pkid, .. } => {
                        sync.unsuback(pkid).unwrap();
                    }
                    _ => {}
                }
            }
        }
    }

    #[test]
    fn every_connection_subscribes_every_wanted_filter() {
        let mut sync = SubscriptionSync::new(shared("g"), set(&["a/#", "b"]));
        for _ in 0..2 {
            sync.connected(false, false);
            let packets = sync.packets();
            assert_eq!(packets.len(), 1, "one packet without identifiers");
            assert_eq!(sent(&packets).0, vec!["$share/g/a/#", "$share/g/b"]);
            assert!(!sync.is_ready());
            let Outgoing::Subscribe { pkid, .. } = packets[0] else { panic!() };
            sync.suback(pkid, vec![Ok(QoS::AtLeastOnce); 2]).unwrap();
            assert!(sync.is_ready());
        }
    }

    #[test]
    fn with_identifiers_each_identifier_has_packets_of_its_own() {
        let mut sync = SubscriptionSync::new(shared("g"), set(&["a/#", "a/+/c"]));
        sync.connected(false, true);
        let packets = sync.packets();
        let ids: Vec<(Vec<String>, Option<u32>)> = packets
            .iter()
            .map(|p| match p {
                Outgoing::Subscribe { filters, id, .. } => (filters.clone(), *id),
                _ => panic!(),
            })
            .collect();
        assert_eq!(
            ids,
            vec![(vec!["$share/g/a/#".to_owned()], Some(1)), (vec!["$share/g/a/+/c".to_owned()], Some(2))]
        );
        for packet in packets {
            let Outgoing::Subscribe { pkid, .. } = packet else { panic!() };
            sync.suback(pkid, vec![Ok(QoS::AtLeastOnce)]).unwrap();
        }
        assert!(sync.is_ready());
        // An identifier that changes (another filter took its value) is sent again.
        let mut changed = set(&["a/#", "a/+/c"]);
        changed.insert("a/#".into(), 9);
        sync.want(changed);
        assert_eq!(sent(&sync.packets()).0, vec!["$share/g/a/#"]);
    }

    #[test]
    fn forms_held_that_no_flow_needs_are_unsubscribed_before_ready() {
        let mut sync = SubscriptionSync::new(shared("g2"), set(&["a"]));
        sync.connected(true, false);
        answer_all(&mut sync);
        assert!(!sync.is_ready(), "not ready before the held forms were looked at");
        sync.held(Some(forms(&["$share/g1/a", "$share/g2/a", "old/#"])));
        let packets = sync.packets();
        assert_eq!(sent(&packets).1, vec!["$share/g1/a", "old/#"]);
        assert!(!sync.is_ready());
        let Outgoing::Unsubscribe { pkid, .. } = packets[0] else { panic!() };
        assert_eq!(sync.unsuback(pkid).unwrap(), vec!["$share/g1/a", "old/#"]);
        assert!(sync.packets().is_empty());
        assert!(sync.is_ready());
    }

    #[test]
    fn a_filter_wanted_again_while_it_is_unsubscribed_is_subscribed_after_the_unsuback() {
        let mut sync = SubscriptionSync::new(shared("g"), set(&["a"]));
        sync.connected(false, false);
        answer_all(&mut sync);
        sync.want(set(&[]));
        let leaving = sync.packets();
        assert_eq!(sent(&leaving).1, vec!["$share/g/a"]);
        sync.want(set(&["a"]));
        assert!(sync.packets().is_empty(), "waits for the UNSUBACK");
        let Outgoing::Unsubscribe { pkid, .. } = leaving[0] else { panic!() };
        sync.unsuback(pkid).unwrap();
        let next = sync.packets();
        assert_eq!(sent(&next).0, vec!["$share/g/a"], "the UNSUBACK syncs again");
        let Outgoing::Subscribe { pkid, .. } = next[0] else { panic!() };
        sync.suback(pkid, vec![Ok(QoS::AtLeastOnce)]).unwrap();
        assert!(sync.is_ready());
    }

    #[test]
    fn a_leftover_form_wanted_again_while_it_is_unsubscribed_is_subscribed_after_the_unsuback() {
        let mut sync = SubscriptionSync::new(shared("g"), set(&["a"]));
        sync.connected(true, false);
        answer_all(&mut sync);
        sync.held(Some(forms(&["$share/g/a", "$share/g/old"])));
        let leaving = sync.packets();
        assert_eq!(sent(&leaving).1, vec!["$share/g/old"]);
        // A reload adds a flow on "old" before the broker answered the UNSUBSCRIBE.
        sync.want(set(&["a", "old"]));
        assert!(sync.packets().is_empty(), "waits for the UNSUBACK, which would undo its record");
        let Outgoing::Unsubscribe { pkid, .. } = leaving[0] else { panic!() };
        assert_eq!(sync.unsuback(pkid).unwrap(), vec!["$share/g/old"]);
        let next = sync.packets();
        assert_eq!(sent(&next).0, vec!["$share/g/old"], "subscribed once the form is gone");
        let Outgoing::Subscribe { pkid, .. } = next[0] else { panic!() };
        sync.suback(pkid, vec![Ok(QoS::AtLeastOnce)]).unwrap();
        assert!(sync.is_ready());
    }

    #[test]
    fn an_identifier_changed_while_its_subscribe_is_out_is_sent_again_once_answered() {
        let mut sync = SubscriptionSync::new(shared("g"), set(&["a/#"]));
        sync.connected(false, true);
        let packets = sync.packets();
        let mut changed = set(&["a/#"]);
        changed.insert("a/#".into(), 9);
        sync.want(changed);
        assert!(sync.packets().is_empty(), "waits for the SUBACK");
        let Outgoing::Subscribe { pkid, id, .. } = &packets[0] else { panic!() };
        assert_ne!(*id, Some(9));
        sync.suback(*pkid, vec![Ok(QoS::AtLeastOnce)]).unwrap();
        let again = sync.packets();
        assert!(
            matches!(&again[..], [Outgoing::Subscribe { id: Some(9), filters, .. }] if filters == &["$share/g/a/#"]),
            "{again:?}"
        );
    }

    #[test]
    fn forms_stand_for_filters_of_their_own_group_only() {
        let group = shared("g");
        assert_eq!(group.filter_of("$share/g/a/#"), Some("a/#"));
        assert_eq!(group.filter_of("$share/g2/a"), None);
        assert_eq!(group.filter_of("$share/g"), None);
        assert_eq!(group.filter_of("a"), None);
        let plain = Subscriptions { qos: QoS::AtLeastOnce, shared_group: None };
        assert_eq!(plain.filter_of("a/+"), Some("a/+"));
        assert_eq!(plain.filter_of("$share/g/a"), None);
    }

    #[test]
    fn a_filter_dropped_while_its_subscribe_is_out_is_unsubscribed_once_granted() {
        let mut sync = SubscriptionSync::new(shared("g"), set(&["a"]));
        sync.connected(false, true);
        let packets = sync.packets();
        sync.want(set(&[]));
        assert!(sync.packets().is_empty());
        let Outgoing::Subscribe { pkid, .. } = packets[0] else { panic!() };
        sync.suback(pkid, vec![Ok(QoS::AtLeastOnce)]).unwrap();
        assert_eq!(sent(&sync.packets()).1, vec!["$share/g/a"]);
    }

    #[test]
    fn refusals_are_kept_with_their_reason_and_retried_on_the_next_want() {
        let plain = Subscriptions { qos: QoS::AtLeastOnce, shared_group: None };
        let mut sync = SubscriptionSync::new(plain, set(&["x", "y"]));
        sync.connected(false, false);
        let packets = sync.packets();
        let Outgoing::Subscribe { pkid, .. } = packets[0] else { panic!() };
        let denied = Refusal { code: 0x87, reason: "not authorized", v311_code: 0x87 };
        let report = sync.suback(pkid, vec![Err(denied.clone()), Ok(QoS::AtMostOnce)]).unwrap();
        assert_eq!(report.refused, vec![("x".to_owned(), denied)]);
        assert_eq!(report.downgraded, vec![("y".to_owned(), QoS::AtMostOnce)]);
        assert!(sync.is_ready(), "a refusal is an answer");
        assert_eq!(sync.refused(), vec!["x (not authorized)"]);
        sync.want(set(&["x", "y"]));
        assert_eq!(sent(&sync.packets()).0, vec!["x"]);
    }

    #[test]
    fn thousands_of_filters_go_out_in_bounded_packets_and_bounded_flight() {
        let wanted: BTreeMap<String, u32> =
            (0..2_500).map(|i| (format!("devices/{i:05}/#"), i + 1)).collect();
        let mut sync = SubscriptionSync::new(shared("g"), wanted.clone());
        sync.connected(false, false);
        let packets = sync.packets();
        assert_eq!(packets.len(), 25);
        assert_eq!(sent(&packets).0.len(), 2_500);
        let long = "x".repeat(250);
        let many: Vec<String> = (0..100).map(|i| format!("{long}{i}")).collect();
        assert!(chunks(many, |f| protocol::subscribe_bytes(f)).len() > 1, "bytes bound a packet too");
        // With an identifier each (the worst case), a packet each, at most IN_FLIGHT unanswered.
        let mut sync = SubscriptionSync::new(shared("g"), wanted);
        sync.connected(false, true);
        let first = sync.packets();
        assert_eq!(first.len(), IN_FLIGHT);
        assert!(sync.packets().is_empty(), "the rest waits for answers");
        for packet in first {
            let Outgoing::Subscribe { pkid, .. } = packet else { panic!() };
            sync.suback(pkid, vec![Ok(QoS::AtLeastOnce)]).unwrap();
        }
        answer_all(&mut sync);
        assert!(sync.is_ready());
        // Filters sharing an identifier share packets.
        let fleet: BTreeMap<String, u32> = (0..2_500).map(|i| (format!("devices/{i:05}/#"), 7)).collect();
        let mut sync = SubscriptionSync::new(shared("g"), fleet);
        sync.connected(false, true);
        assert_eq!(sync.packets().len(), 25);
    }
}
