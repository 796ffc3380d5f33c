-- Durable HTTP delivery for POST_ENDPOINT flows (our addition; the Python service's tables are
-- untouched). A request row is written in the same transaction as its flow's counter, the MQTT
-- message is acknowledged after that commit, and the row is deleted once the endpoint accepted
-- it. A request that can never be delivered is kept with dead = TRUE, never deleted silently.
CREATE TABLE IF NOT EXISTS gateway_outbox (
    id BIGINT NOT NULL AUTO_INCREMENT,
    flow_id INT NOT NULL,
    flow_code VARCHAR(100) NOT NULL,
    endpoint_url VARCHAR(500) NOT NULL,
    body LONGTEXT NOT NULL,
    msg_id INT NOT NULL,
    created_at DATETIME(3) NOT NULL,
    attempts INT NOT NULL DEFAULT 0,
    next_attempt_at DATETIME(3) NOT NULL,
    last_error TEXT NULL,
    dead BOOLEAN NOT NULL DEFAULT FALSE,
    PRIMARY KEY (id),
    KEY pending_by_flow (dead, flow_id, id)
) DEFAULT CHARSET = utf8mb4;

-- Which gateway instance delivers a flow's requests, so that several instances sharing the
-- load keep each flow's requests in order and never send one twice on purpose.
CREATE TABLE IF NOT EXISTS gateway_outbox_leases (
    flow_id INT NOT NULL,
    owner VARCHAR(255) NOT NULL,
    expires_at DATETIME(3) NOT NULL,
    PRIMARY KEY (flow_id)
) DEFAULT CHARSET = utf8mb4;
