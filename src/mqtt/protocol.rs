//! The two versions of MQTT the session speaks, 5 and 3.1.1, and the few packets it needs of
//! each. rumqttc's two codecs do the encoding; this file turns their packets into ours and back,
//! so the rest of the session never asks which version it is talking.
//!
//! What differs between the versions, and where it matters to us:
//! - **CONNECT.** Version 5 carries the session expiry and Receive Maximum (the broker itself
//!   stops sending at `MAX_IN_FLIGHT` unacknowledged messages). A broker that speaks only 3.1.1
//!   answers a version 5 CONNECT with the 3.1.1 CONNACK code 1 (or version 5's 0x84); the
//!   session then tries 3.1.1 ([`Refusal::wrong_version`]).
//! - **SUBSCRIBE.** Version 5 asks for Retain Handling 1: retained messages are sent only for a
//!   subscription that did not exist, so subscribing again on every connection costs nothing.
//!   Retain As Published stays off, so a live message always arrives with RETAIN=0 in both
//!   versions and RETAIN=1 means "sent because of a subscription" (see `crate::retained`).
//! - **Refusals say why** in version 5: a CONNACK, SUBACK or DISCONNECT reason code, which we
//!   put in words. Version 3.1.1 has only CONNACK's five codes and SUBACK's 0x80.

use super::reasons::{
    disconnect_text, return_code, suback_grant, v311_refusal, v4_name, v5_connect_refusal, v5_name,
};
use bytes::{Bytes, BytesMut};
use rumqttc::mqttbytes::v4;
use rumqttc::v5::mqttbytes::v5;
use rumqttc::QoS;

/// MQTT's largest packet: the broker decides what size is acceptable, not us.
pub const MAX_PACKET: usize = 268_435_455;

pub use crate::config::MqttVersion as Version;

/// What the CONNECT packet asks for, beyond the client id and credentials.
#[derive(Debug, Clone)]
pub struct SessionRequest {
    pub keepalive_secs: u16,
    /// MQTT 3.1.1's clean session, version 5's clean start.
    pub clean_start: bool,
    /// Version 5 only: how long the broker keeps the session after a disconnect (`u32::MAX`:
    /// never ends). 3.1.1 has no such field: the broker's own setting decides.
    pub session_expiry: u32,
    /// Version 5 only: the most unacknowledged QoS 1 messages the broker may send.
    pub receive_maximum: u16,
}

/// A message as it came off the wire.
#[derive(Debug, Clone)]
pub struct Received {
    pub topic: String,
    pub payload: Bytes,
    pub qos: QoS,
    pub pkid: u16,
    /// Set by the broker only on a message sent because of a subscription (a retained one).
    pub retain: bool,
    /// Version 5: the Subscription Identifiers of the subscriptions this copy is for.
    pub subscription_ids: Vec<u32>,
}

/// Why the broker refused something, in its own code and in words.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The code as the broker sent it (a version 5 reason code, or a 3.1.1 return code).
    pub code: u8,
    pub reason: &'static str,
    /// The MQTT 3.1.1 CONNACK number operators know from the original's log line.
    pub v311_code: u8,
}

impl Refusal {
    /// The broker does not speak the version asked for: 3.1.1's code 1, or version 5's 0x84.
    pub fn wrong_version(&self) -> bool {
        self.v311_code == 1
    }
}

/// The answers to one SUBSCRIBE, a filter each: the QoS granted, or why it was refused.
pub type Grants = Vec<Result<QoS, Refusal>>;

/// What the broker sends that the session acts on.
#[derive(Debug)]
pub enum Incoming {
    Publish(Received),
    SubAck {
        pkid: u16,
        grants: Grants,
    },
    UnsubAck {
        pkid: u16,
    },
    PingResp,
    /// Version 5: the broker ends the connection, and says why.
    Disconnect(String),
    /// Anything else; named for the debug log.
    Other(&'static str),
}

/// What the session sends after CONNECT.
#[derive(Debug, Clone)]
pub enum Outgoing {
    PubAck(u16),
    /// `id`: version 5's Subscription Identifier, for every filter of the packet.
    Subscribe {
        pkid: u16,
        filters: Vec<String>,
        qos: QoS,
        id: Option<u32>,
    },
    Unsubscribe {
        pkid: u16,
        filters: Vec<String>,
    },
    PingReq,
    Disconnect,
}

/// How the broker answered CONNECT.
#[derive(Debug)]
pub enum ConnAck {
    Accepted {
        session_present: bool,
        /// Version 5: the keepalive the broker wants instead of ours, which we must then use.
        server_keepalive: Option<u16>,
        /// Version 5: the session expiry the broker granted, when it is not the one asked.
        session_expiry: Option<u32>,
        /// Whether SUBSCRIBE may carry a Subscription Identifier (version 5, unless the broker
        /// says it does not support them).
        subscription_ids: bool,
    },
    Refused(Refusal),
}

/// A packet could not be read or written.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct CodecError(pub String);

/// Whether `buffer` starts with a whole packet. The fixed header is the same in both versions.
fn whole_packet(buffer: &BytesMut) -> Result<bool, CodecError> {
    match v5::check(buffer.iter(), None) {
        Ok(_) => Ok(true),
        Err(rumqttc::v5::mqttbytes::Error::InsufficientBytes(_)) => Ok(false),
        Err(error) => Err(CodecError(error.to_string())),
    }
}

/// The CONNECT packet.
pub fn connect(
    version: Version,
    client_id: &str,
    credentials: Option<(&str, &str)>,
    session: &SessionRequest,
    out: &mut BytesMut,
) -> Result<(), CodecError> {
    let written = match version {
        Version::V311 => {
            let mut connect = v4::Connect::new(client_id);
            connect.keep_alive = session.keepalive_secs;
            connect.clean_session = session.clean_start;
            if let Some((user, password)) = credentials {
                connect.set_login(user, password);
            }
            v4::Packet::Connect(connect).write(out, MAX_PACKET).map(drop)
        }
        Version::V5 => {
            let mut properties = v5::ConnectProperties::new();
            properties.session_expiry_interval = Some(session.session_expiry).filter(|&s| s != 0);
            properties.receive_maximum = Some(session.receive_maximum.max(1));
            let connect = v5::Connect {
                keep_alive: session.keepalive_secs,
                client_id: client_id.to_owned(),
                clean_start: session.clean_start,
                properties: Some(properties),
            };
            let login = credentials.map(|(user, password)| v5::Login::new(user, password));
            return v5::Packet::Connect(connect, None, login)
                .write(out, None)
                .map(drop)
                .map_err(|e| CodecError(e.to_string()));
        }
    };
    written.map_err(|e| CodecError(e.to_string()))
}

/// The CONNACK at the start of `buffer`, once it is all there (`None` until then).
pub fn connack(version: Version, buffer: &mut BytesMut) -> Result<Option<ConnAck>, CodecError> {
    if !whole_packet(buffer)? {
        return Ok(None);
    }
    // A broker that speaks only 3.1.1 answers our version 5 CONNECT in its own format: a
    // CONNACK of two bytes, which version 5 never sends (its CONNACK always has properties).
    if version == Version::V5 && buffer.len() >= 4 && buffer[0] == 0x20 && buffer[1] == 2 {
        let code = buffer[3];
        let _ = buffer.split_to(4);
        return Ok(Some(ConnAck::Refused(Refusal {
            code,
            reason: "the broker answered in MQTT 3.1.1",
            v311_code: 1,
        })));
    }
    let (accepted, session_present, server_keepalive, session_expiry, subscription_ids) = match version {
        Version::V311 => match v4::Packet::read(buffer, MAX_PACKET) {
            Ok(v4::Packet::ConnAck(ack)) => {
                let code = return_code(ack.code);
                if code != 0 {
                    return Ok(Some(ConnAck::Refused(v311_refusal(code))));
                }
                (true, ack.session_present, None, None, false)
            }
            Ok(other) => return Err(CodecError(format!("{other:?} instead of CONNACK"))),
            Err(error) => return Err(CodecError(error.to_string())),
        },
        Version::V5 => match v5::Packet::read(buffer, None) {
            Ok(v5::Packet::ConnAck(ack)) => {
                if ack.code != v5::ConnectReturnCode::Success {
                    return Ok(Some(ConnAck::Refused(v5_connect_refusal(ack.code))));
                }
                let properties = ack.properties.as_ref();
                (
                    true,
                    ack.session_present,
                    properties.and_then(|p| p.server_keep_alive),
                    properties.and_then(|p| p.session_expiry_interval),
                    properties.and_then(|p| p.subscription_identifiers_available) != Some(0),
                )
            }
            Ok(other) => return Err(CodecError(format!("{other:?} instead of CONNACK"))),
            Err(error) => return Err(CodecError(error.to_string())),
        },
    };
    debug_assert!(accepted);
    Ok(Some(ConnAck::Accepted { session_present, server_keepalive, session_expiry, subscription_ids }))
}

/// The next packet at the start of `buffer`, once it is all there (`None` until then).
pub fn read(version: Version, buffer: &mut BytesMut) -> Result<Option<Incoming>, CodecError> {
    if !whole_packet(buffer)? {
        return Ok(None);
    }
    match version {
        Version::V311 => read_v311(buffer).map(Some),
        Version::V5 => read_v5(buffer).map(Some),
    }
}

fn read_v311(buffer: &mut BytesMut) -> Result<Incoming, CodecError> {
    let packet = v4::Packet::read(buffer, MAX_PACKET).map_err(|e| CodecError(e.to_string()))?;
    Ok(match packet {
        v4::Packet::Publish(publish) => Incoming::Publish(Received {
            topic: publish.topic,
            payload: publish.payload,
            qos: publish.qos,
            pkid: publish.pkid,
            retain: publish.retain,
            subscription_ids: Vec::new(),
        }),
        v4::Packet::SubAck(ack) => Incoming::SubAck {
            pkid: ack.pkid,
            grants: ack
                .return_codes
                .iter()
                .map(|code| match code {
                    v4::SubscribeReasonCode::Success(qos) => Ok(*qos),
                    v4::SubscribeReasonCode::Failure => Err(Refusal {
                        code: 0x80,
                        reason: "refused; MQTT 3.1.1 gives no reason",
                        v311_code: 0x80,
                    }),
                })
                .collect(),
        },
        v4::Packet::UnsubAck(ack) => Incoming::UnsubAck { pkid: ack.pkid },
        v4::Packet::PingResp => Incoming::PingResp,
        v4::Packet::Disconnect => Incoming::Disconnect("DISCONNECT".to_owned()),
        other => Incoming::Other(v4_name(&other)),
    })
}

fn read_v5(buffer: &mut BytesMut) -> Result<Incoming, CodecError> {
    // Version 5 lets a DISCONNECT leave out its properties, or its reason code too (which is
    // then 0); the codec wants both.
    if buffer.len() >= 2 && buffer[0] == 0xE0 && buffer[1] <= 1 {
        let packet = buffer.split_to(2 + usize::from(buffer[1]));
        let code = packet.get(2).copied().unwrap_or(0);
        let reason = v5::DisconnectReasonCode::try_from(code)
            .map_err(|_| CodecError(format!("a DISCONNECT with the unknown reason code 0x{code:02X}")))?;
        return Ok(Incoming::Disconnect(disconnect_text(reason, None)));
    }
    let packet = v5::Packet::read(buffer, None).map_err(|e| CodecError(e.to_string()))?;
    Ok(match packet {
        v5::Packet::Publish(publish) => {
            // Topic aliases are never used: our CONNECT allows none, so every topic is whole.
            let topic = String::from_utf8(publish.topic.to_vec())
                .map_err(|_| CodecError("a PUBLISH whose topic is not UTF-8".to_owned()))?;
            let subscription_ids = publish
                .properties
                .map(|p| {
                    p.subscription_identifiers.into_iter().filter_map(|id| u32::try_from(id).ok()).collect()
                })
                .unwrap_or_default();
            Incoming::Publish(Received {
                topic,
                payload: publish.payload,
                qos: from_v5(publish.qos),
                pkid: publish.pkid,
                retain: publish.retain,
                subscription_ids,
            })
        }
        v5::Packet::SubAck(ack) => Incoming::SubAck {
            pkid: ack.pkid,
            grants: ack.return_codes.iter().map(|code| suback_grant(*code)).collect(),
        },
        v5::Packet::UnsubAck(ack) => Incoming::UnsubAck { pkid: ack.pkid },
        v5::Packet::PingResp(_) => Incoming::PingResp,
        v5::Packet::Disconnect(disconnect) => {
            let reason = disconnect.properties.and_then(|p| p.reason_string);
            Incoming::Disconnect(disconnect_text(disconnect.reason_code, reason.as_deref()))
        }
        other => Incoming::Other(v5_name(&other)),
    })
}

/// Encodes one packet of the session's.
pub fn write(version: Version, packet: Outgoing, out: &mut BytesMut) -> Result<(), CodecError> {
    let written = match version {
        Version::V311 => {
            let packet = match packet {
                Outgoing::PubAck(pkid) => v4::Packet::PubAck(v4::PubAck::new(pkid)),
                Outgoing::Subscribe { pkid, filters, qos, .. } => {
                    let mut subscribe = v4::Subscribe::new_many(
                        filters.into_iter().map(|f| v4::SubscribeFilter::new(f, qos)),
                    );
                    subscribe.pkid = pkid;
                    v4::Packet::Subscribe(subscribe)
                }
                Outgoing::Unsubscribe { pkid, filters } => {
                    v4::Packet::Unsubscribe(v4::Unsubscribe { pkid, topics: filters })
                }
                Outgoing::PingReq => v4::Packet::PingReq,
                Outgoing::Disconnect => v4::Packet::Disconnect,
            };
            packet.write(out, MAX_PACKET).map(drop).map_err(|e| e.to_string())
        }
        Version::V5 => {
            let packet = match packet {
                Outgoing::PubAck(pkid) => v5::Packet::PubAck(v5::PubAck::new(pkid, None)),
                Outgoing::Subscribe { pkid, filters, qos, id } => {
                    let filters = filters.into_iter().map(|path| v5::Filter {
                        path,
                        qos: to_v5(qos),
                        nolocal: false,
                        // Off: a live message then arrives with RETAIN=0, so RETAIN=1 always
                        // means the broker sent it because of a subscription.
                        preserve_retain: false,
                        retain_forward_rule: v5::RetainForwardRule::OnNewSubscribe,
                    });
                    let properties = id.map(|id| v5::SubscribeProperties {
                        id: Some(id as usize),
                        user_properties: Vec::new(),
                    });
                    let mut subscribe = v5::Subscribe::new_many(filters, properties);
                    subscribe.pkid = pkid;
                    v5::Packet::Subscribe(subscribe)
                }
                Outgoing::Unsubscribe { pkid, filters } => {
                    v5::Packet::Unsubscribe(v5::Unsubscribe { pkid, filters, properties: None })
                }
                Outgoing::PingReq => v5::Packet::PingReq(v5::PingReq),
                Outgoing::Disconnect => {
                    v5::Packet::Disconnect(v5::Disconnect::new(v5::DisconnectReasonCode::NormalDisconnection))
                }
            };
            packet.write(out, None).map(drop).map_err(|e| e.to_string())
        }
    };
    written.map_err(CodecError)
}

/// What one SUBSCRIBE costs on the wire for a filter: its length prefix, the text, the options.
pub fn subscribe_bytes(filter: &str) -> usize {
    filter.len() + 3
}

/// rumqttc's version 5 codec has a QoS type of its own.
pub(super) fn from_v5(qos: rumqttc::v5::mqttbytes::QoS) -> QoS {
    match qos {
        rumqttc::v5::mqttbytes::QoS::AtMostOnce => QoS::AtMostOnce,
        rumqttc::v5::mqttbytes::QoS::AtLeastOnce => QoS::AtLeastOnce,
        rumqttc::v5::mqttbytes::QoS::ExactlyOnce => QoS::ExactlyOnce,
    }
}

fn to_v5(qos: QoS) -> rumqttc::v5::mqttbytes::QoS {
    match qos {
        QoS::AtMostOnce => rumqttc::v5::mqttbytes::QoS::AtMostOnce,
        QoS::AtLeastOnce => rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
        QoS::ExactlyOnce => rumqttc::v5::mqttbytes::QoS::ExactlyOnce,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(b: &[u8]) -> BytesMut {
        BytesMut::from(b)
    }

    #[test]
    fn a_3_1_1_broker_answering_a_version_5_connect_means_the_wrong_version() {
        let Some(ConnAck::Refused(refusal)) = connack(Version::V5, &mut bytes(&[0x20, 2, 0, 1])).unwrap()
        else {
            panic!("a refusal")
        };
        assert!(refusal.wrong_version());
        let Some(ConnAck::Refused(refusal)) =
            connack(Version::V5, &mut bytes(&[0x20, 3, 0, 0x84, 0])).unwrap()
        else {
            panic!("a refusal")
        };
        assert!(refusal.wrong_version(), "version 5's own 0x84");
        let Some(ConnAck::Refused(refusal)) =
            connack(Version::V5, &mut bytes(&[0x20, 3, 0, 0x87, 0])).unwrap()
        else {
            panic!("a refusal")
        };
        assert_eq!((refusal.code, refusal.v311_code, refusal.reason), (0x87, 5, "not authorized"));
        assert!(connack(Version::V5, &mut bytes(&[0x20, 3, 0])).unwrap().is_none(), "not all there yet");
    }

    #[test]
    fn a_version_5_connect_asks_for_receive_maximum_and_session_expiry() {
        let session = SessionRequest {
            keepalive_secs: 60,
            clean_start: false,
            session_expiry: 3600,
            receive_maximum: 50,
        };
        let mut out = BytesMut::new();
        connect(Version::V5, "gw", Some(("u", "p")), &session, &mut out).unwrap();
        let v5::Packet::Connect(connect, _, login) = v5::Packet::read(&mut out, None).unwrap() else {
            panic!("a CONNECT")
        };
        let properties = connect.properties.unwrap();
        assert_eq!(properties.session_expiry_interval, Some(3600));
        assert_eq!(properties.receive_maximum, Some(50));
        assert!(!connect.clean_start);
        assert_eq!(login.map(|l| l.username), Some("u".to_owned()));
    }

    #[test]
    fn every_form_of_a_version_5_disconnect_says_why() {
        for (packet, why) in [
            (&[0xE0, 0][..], "normal disconnection (0x00)"),
            (&[0xE0, 1, 0x8E][..], "session taken over by another client with the same id (0x8E)"),
            (&[0xE0, 2, 0x97, 0][..], "quota exceeded (0x97)"),
            (&[0xE0, 7, 0x8B, 5, 0x1F, 0, 2, b'b', b'y'][..], "server shutting down (0x8B): by"),
        ] {
            let mut buffer = bytes(packet);
            match read(Version::V5, &mut buffer).unwrap() {
                Some(Incoming::Disconnect(text)) => assert_eq!(text, why),
                other => panic!("{other:?}"),
            }
            assert!(buffer.is_empty(), "the whole packet is consumed");
        }
    }

    #[test]
    fn subscribes_ask_for_retain_handling_1_without_retain_as_published() {
        let mut out = BytesMut::new();
        let packet =
            Outgoing::Subscribe { pkid: 3, filters: vec!["a/#".into()], qos: QoS::AtLeastOnce, id: Some(7) };
        write(Version::V5, packet, &mut out).unwrap();
        // Fixed header, packet id, no properties, the filter, then its options byte.
        assert_eq!(out[out.len() - 1], 0b0001_0001, "QoS 1, Retain Handling 1, no RAP, no No Local");
        let v5::Packet::Subscribe(subscribe) = v5::Packet::read(&mut out, None).unwrap() else { panic!() };
        assert_eq!(subscribe.properties.and_then(|p| p.id), Some(7), "the Subscription Identifier");
    }

    #[test]
    fn suback_refusals_keep_the_brokers_reason() {
        let mut buffer = bytes(&[0x90, 5, 0, 9, 0, 0x01, 0x87]);
        let Some(Incoming::SubAck { pkid, grants }) = read(Version::V5, &mut buffer).unwrap() else {
            panic!("a SUBACK")
        };
        assert_eq!(pkid, 9);
        assert_eq!(grants[0], Ok(QoS::AtLeastOnce));
        assert_eq!(grants[1].as_ref().unwrap_err().reason, "not authorized");
        let mut buffer = bytes(&[0x90, 3, 0, 9, 0x80]);
        let Some(Incoming::SubAck { grants, .. }) = read(Version::V311, &mut buffer).unwrap() else {
            panic!("a SUBACK")
        };
        assert_eq!(grants[0].as_ref().unwrap_err().code, 0x80);
    }

    #[test]
    fn a_publish_keeps_its_retain_flag_in_both_versions() {
        let mut buffer = bytes(&[0x33, 7, 0, 1, b't', 0, 5, b'{', b'}']);
        let Some(Incoming::Publish(message)) = read(Version::V311, &mut buffer).unwrap() else { panic!() };
        assert!(message.retain && message.qos == QoS::AtLeastOnce && message.pkid == 5);
        let mut buffer = bytes(&[0x32, 8, 0, 1, b't', 0, 5, 0, b'{', b'}']);
        let Some(Incoming::Publish(message)) = read(Version::V5, &mut buffer).unwrap() else { panic!() };
        assert!(!message.retain);
        assert_eq!((message.topic.as_str(), &message.payload[..]), ("t", &b"{}"[..]));
    }
}
