-- The subscriptions the broker confirmed for each client id (our addition). With a persistent
-- session the broker keeps them across the gateway's restarts; subscribing again would make it
-- resend every retained message, stored again as a new row. So when the broker says the session
-- is present, only filters missing here are subscribed. A row is written after the SUBACK and
-- deleted before the UNSUBSCRIBE, so this table never claims more than the broker holds.
-- Re-runnable: CREATE TABLE IF NOT EXISTS only.
CREATE TABLE IF NOT EXISTS gateway_subscriptions (
    client_id VARCHAR(191) NOT NULL,
    topic_filter VARCHAR(255) NOT NULL,
    broker_filter VARCHAR(512) NOT NULL,
    qos TINYINT NOT NULL,
    subscribed_at DATETIME(3) NOT NULL,
    PRIMARY KEY (client_id, topic_filter)
) DEFAULT CHARSET = utf8mb4;
