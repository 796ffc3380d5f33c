-- The broker's session is the truth (our addition, replacing gateway_subscriptions).
--
-- gateway_session_filters: every form of a filter (plain, or $share/<group>/...) that a client
-- id may hold at the broker. A row is written when its SUBSCRIBE is sent and deleted after its
-- UNSUBACK, so the table is never smaller than what the broker holds. It is read only to
-- unsubscribe what no flow needs (a removed flow, another shared group); every filter the
-- flows need is subscribed on every connection, whatever this table or the broker's session say.
--
-- gateway_retained: per flow and topic, the hashes of the last message the flow stored and of
-- the last retained one, so that the broker's resend of a retained message (3.1.1 resends on
-- every SUBSCRIBE, version 5 for a subscription it lost) is not stored again.
--
-- Re-runnable: CREATE TABLE IF NOT EXISTS, a copy that ignores rows already there, and
-- DROP TABLE IF EXISTS. The copy runs only while gateway_subscriptions still exists: the forms
-- it names are forms the broker may hold, to be unsubscribed if no flow needs them.
CREATE TABLE IF NOT EXISTS gateway_session_filters (
    client_id VARCHAR(191) NOT NULL,
    broker_filter VARCHAR(512) NOT NULL,
    added_at DATETIME(3) NOT NULL,
    PRIMARY KEY (client_id, broker_filter)
) DEFAULT CHARSET = utf8mb4;

CREATE TABLE IF NOT EXISTS gateway_retained (
    flow_id INT NOT NULL,
    topic_hash BINARY(32) NOT NULL,
    last_hash BINARY(32) NOT NULL,
    retained_hash BINARY(32) NULL,
    topic TEXT NOT NULL,
    stored_at DATETIME(3) NOT NULL,
    PRIMARY KEY (flow_id, topic_hash)
) DEFAULT CHARSET = utf8mb4;

SET @copy_subscriptions = IF(
    EXISTS (SELECT 1 FROM information_schema.TABLES
            WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = 'gateway_subscriptions'),
    'INSERT IGNORE INTO gateway_session_filters (client_id, broker_filter, added_at)
     SELECT client_id, broker_filter, subscribed_at FROM gateway_subscriptions',
    'DO 0'
);
EXECUTE IMMEDIATE @copy_subscriptions;

DROP TABLE IF EXISTS gateway_subscriptions;

-- gateway_flows_version: one row, moved on by whoever makes or applies a change to the flows
-- (the CLI, a gateway's reload that found one); every gateway reads it every few seconds and
-- reloads when it moved, so that several instances apply a change within seconds of each other.
CREATE TABLE IF NOT EXISTS gateway_flows_version (
    id TINYINT NOT NULL,
    version BIGINT NOT NULL,
    changed_at DATETIME(3) NOT NULL,
    PRIMARY KEY (id)
) DEFAULT CHARSET = utf8mb4;
