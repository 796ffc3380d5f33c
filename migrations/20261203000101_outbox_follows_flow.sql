-- The outbox follows its flow (our addition). Re-runnable: IF NOT EXISTS everywhere, and the one
-- data change fills only rows not yet filled.

-- Each request's body length, written with the request, so that deliverers bound what they read
-- by bytes without reading bodies. NULL for rows an older version wrote while this one ran:
-- deliverers read those alone.
ALTER TABLE gateway_outbox ADD COLUMN IF NOT EXISTS body_bytes INT NULL;
-- The rows already there, a few hundred per transaction: an upgrade comes after an endpoint
-- outage as often as not, and one transaction over a large backlog of bodies would be one
-- write set beyond Galera's wsrep_max_ws_size (or a long lock on a single server).
BEGIN NOT ATOMIC
    REPEAT
        UPDATE gateway_outbox SET body_bytes = LENGTH(body) WHERE body_bytes IS NULL LIMIT 500;
    UNTIL ROW_COUNT() = 0 END REPEAT;
END;

-- The schedule, per flow, by index: when each flow is next due (the smallest and largest
-- next_attempt_at of its live requests, two index dives per flow, since flow_id leads), and each
-- flow's due requests, without reading the requests that are not.
CREATE INDEX IF NOT EXISTS schedule_by_flow ON gateway_outbox (flow_id, dead, next_attempt_at);

-- Flows whose requests are held (the flow is disabled, or its row names no usable endpoint):
-- since when, and when the last hold ended, from which its requests age again.
CREATE TABLE IF NOT EXISTS gateway_outbox_holds (
    flow_id INT NOT NULL,
    held_since DATETIME(3) NULL,
    aging_from DATETIME(3) NULL,
    PRIMARY KEY (flow_id)
) DEFAULT CHARSET = utf8mb4;
