//! The broker's codes in words: CONNACK refusals (with the MQTT 3.1.1 number the original
//! logged), SUBACK refusals and DISCONNECT reasons of version 5, and the names of packets the
//! session ignores.

use super::protocol::Refusal;
use rumqttc::mqttbytes::v4;
use rumqttc::v5::mqttbytes::v5;
use rumqttc::QoS;

/// The MQTT 3.1.1 CONNACK return code, the number operators know from the original's log line.
pub(super) fn return_code(code: v4::ConnectReturnCode) -> u8 {
    match code {
        v4::ConnectReturnCode::Success => 0,
        v4::ConnectReturnCode::RefusedProtocolVersion => 1,
        v4::ConnectReturnCode::BadClientId => 2,
        v4::ConnectReturnCode::ServiceUnavailable => 3,
        v4::ConnectReturnCode::BadUserNamePassword => 4,
        v4::ConnectReturnCode::NotAuthorized => 5,
    }
}

pub(super) fn v311_refusal(code: u8) -> Refusal {
    let reason = match code {
        1 => "unacceptable protocol version",
        2 => "client identifier rejected",
        3 => "server unavailable",
        4 => "bad user name or password",
        5 => "not authorized",
        _ => "unknown return code",
    };
    Refusal { code, reason, v311_code: code }
}

/// A version 5 CONNACK refusal, with the 3.1.1 number that means the same where there is one
/// (the original logged those numbers and operators grep for them); otherwise its own code.
pub(super) fn v5_connect_refusal(code: v5::ConnectReturnCode) -> Refusal {
    use v5::ConnectReturnCode as C;
    let (code, reason, v311) = match code {
        C::Success => (0, "success", 0),
        C::RefusedProtocolVersion => (1, "unacceptable protocol version", 1),
        C::BadClientId => (2, "client identifier rejected", 2),
        C::ServiceUnavailable => (3, "server unavailable", 3),
        C::UnspecifiedError => (0x80, "unspecified error", 0x80),
        C::MalformedPacket => (0x81, "malformed packet", 0x81),
        C::ProtocolError => (0x82, "protocol error", 0x82),
        C::ImplementationSpecificError => (0x83, "implementation specific error", 0x83),
        C::UnsupportedProtocolVersion => (0x84, "unsupported protocol version", 1),
        C::ClientIdentifierNotValid => (0x85, "client identifier not valid", 2),
        C::BadUserNamePassword => (0x86, "bad user name or password", 4),
        C::NotAuthorized => (0x87, "not authorized", 5),
        C::ServerUnavailable => (0x88, "server unavailable", 3),
        C::ServerBusy => (0x89, "server busy", 3),
        C::Banned => (0x8A, "banned", 5),
        C::BadAuthenticationMethod => (0x8C, "bad authentication method", 4),
        C::TopicNameInvalid => (0x90, "topic name invalid", 0x90),
        C::PacketTooLarge => (0x95, "packet too large", 0x95),
        C::QuotaExceeded => (0x97, "quota exceeded", 0x97),
        C::PayloadFormatInvalid => (0x99, "payload format invalid", 0x99),
        C::RetainNotSupported => (0x9A, "retain not supported", 0x9A),
        C::QoSNotSupported => (0x9B, "QoS not supported", 0x9B),
        C::UseAnotherServer => (0x9C, "use another server", 0x9C),
        C::ServerMoved => (0x9D, "server moved", 0x9D),
        C::ConnectionRateExceeded => (0x9F, "connection rate exceeded", 0x9F),
    };
    Refusal { code, reason, v311_code: v311 }
}

pub(super) fn suback_grant(code: v5::SubscribeReasonCode) -> Result<QoS, Refusal> {
    use v5::SubscribeReasonCode as S;
    let (code, reason) = match code {
        S::Success(qos) => return Ok(super::protocol::from_v5(qos)),
        S::Failure | S::Unspecified => (0x80, "unspecified error"),
        S::ImplementationSpecific => (0x83, "implementation specific error"),
        S::NotAuthorized => (0x87, "not authorized"),
        S::TopicFilterInvalid => (0x8F, "topic filter invalid"),
        S::PkidInUse => (0x91, "packet identifier in use"),
        S::QuotaExceeded => (0x97, "quota exceeded"),
        S::SharedSubscriptionsNotSupported => (0x9E, "shared subscriptions not supported"),
        S::SubscriptionIdNotSupported => (0xA1, "subscription identifiers not supported"),
        S::WildcardSubscriptionsNotSupported => (0xA2, "wildcard subscriptions not supported"),
    };
    Err(Refusal { code, reason, v311_code: code })
}

pub(super) fn disconnect_text(code: v5::DisconnectReasonCode, reason_string: Option<&str>) -> String {
    use v5::DisconnectReasonCode as D;
    let (number, words) = match code {
        D::NormalDisconnection => (0x00, "normal disconnection"),
        D::DisconnectWithWillMessage => (0x04, "disconnect with will message"),
        D::UnspecifiedError => (0x80, "unspecified error"),
        D::MalformedPacket => (0x81, "malformed packet"),
        D::ProtocolError => (0x82, "protocol error"),
        D::ImplementationSpecificError => (0x83, "implementation specific error"),
        D::NotAuthorized => (0x87, "not authorized"),
        D::ServerBusy => (0x89, "server busy"),
        D::ServerShuttingDown => (0x8B, "server shutting down"),
        D::KeepAliveTimeout => (0x8D, "keepalive timeout"),
        D::SessionTakenOver => (0x8E, "session taken over by another client with the same id"),
        D::TopicFilterInvalid => (0x8F, "topic filter invalid"),
        D::TopicNameInvalid => (0x90, "topic name invalid"),
        D::ReceiveMaximumExceeded => (0x93, "receive maximum exceeded"),
        D::TopicAliasInvalid => (0x94, "topic alias invalid"),
        D::PacketTooLarge => (0x95, "packet too large"),
        D::MessageRateTooHigh => (0x96, "message rate too high"),
        D::QuotaExceeded => (0x97, "quota exceeded"),
        D::AdministrativeAction => (0x98, "administrative action"),
        D::PayloadFormatInvalid => (0x99, "payload format invalid"),
        D::RetainNotSupported => (0x9A, "retain not supported"),
        D::QoSNotSupported => (0x9B, "QoS not supported"),
        D::UseAnotherServer => (0x9C, "use another server"),
        D::ServerMoved => (0x9D, "server moved"),
        D::SharedSubscriptionNotSupported => (0x9E, "shared subscriptions not supported"),
        D::ConnectionRateExceeded => (0x9F, "connection rate exceeded"),
        D::MaximumConnectTime => (0xA0, "maximum connect time"),
        D::SubscriptionIdentifiersNotSupported => (0xA1, "subscription identifiers not supported"),
        D::WildcardSubscriptionsNotSupported => (0xA2, "wildcard subscriptions not supported"),
    };
    match reason_string {
        Some(text) if !text.is_empty() => format!("{words} (0x{number:02X}): {text}"),
        _ => format!("{words} (0x{number:02X})"),
    }
}

pub(super) fn v4_name(packet: &v4::Packet) -> &'static str {
    match packet {
        v4::Packet::PubAck(_) => "PUBACK",
        v4::Packet::PubRec(_) => "PUBREC",
        v4::Packet::PubRel(_) => "PUBREL",
        v4::Packet::PubComp(_) => "PUBCOMP",
        v4::Packet::ConnAck(_) => "CONNACK",
        v4::Packet::PingReq => "PINGREQ",
        _ => "an unexpected packet",
    }
}

pub(super) fn v5_name(packet: &v5::Packet) -> &'static str {
    match packet {
        v5::Packet::PubAck(_) => "PUBACK",
        v5::Packet::PubRec(_) => "PUBREC",
        v5::Packet::PubRel(_) => "PUBREL",
        v5::Packet::PubComp(_) => "PUBCOMP",
        v5::Packet::ConnAck(_) => "CONNACK",
        v5::Packet::Auth(_) => "AUTH",
        v5::Packet::PingReq(_) => "PINGREQ",
        _ => "an unexpected packet",
    }
}
