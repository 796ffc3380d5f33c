-- When each flow last took a message (our addition), for `mqtt-gateway status`: written once per
-- flow per batch, in the batch's transaction, so the `data` table never needs scanning for it.
CREATE TABLE IF NOT EXISTS gateway_flow_stats (
    flow_id INT NOT NULL,
    last_message_at DATETIME(3) NOT NULL,
    PRIMARY KEY (flow_id)
) DEFAULT CHARSET = utf8mb4;
