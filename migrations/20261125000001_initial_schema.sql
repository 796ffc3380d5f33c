-- The tables of the Python service, with its names, types and (ORM) defaults.
-- IF NOT EXISTS: a database that service created is adopted exactly as it is. Its tables have no
-- server-side defaults, so the gateway always writes every column explicitly.

CREATE TABLE IF NOT EXISTS mqtt_servers (
    id INT NOT NULL AUTO_INCREMENT,
    host VARCHAR(255) NOT NULL,
    port INT NOT NULL DEFAULT 1883,
    username VARCHAR(255) NULL,
    password VARCHAR(255) NULL,
    enabled BOOLEAN NOT NULL DEFAULT TRUE,
    is_default BOOLEAN NOT NULL DEFAULT TRUE,
    PRIMARY KEY (id)
) DEFAULT CHARSET = utf8mb4;

CREATE TABLE IF NOT EXISTS flows (
    id INT NOT NULL AUTO_INCREMENT,
    code VARCHAR(100) NOT NULL,
    description VARCHAR(255) NOT NULL,
    topic VARCHAR(255) NOT NULL,
    action VARCHAR(30) NOT NULL,
    payload_schema JSON NOT NULL,
    endpoint_url VARCHAR(500) NULL,
    last_msg_id INT NOT NULL DEFAULT 0,
    enabled BOOLEAN NOT NULL DEFAULT TRUE,
    PRIMARY KEY (id),
    UNIQUE KEY code (code)
) DEFAULT CHARSET = utf8mb4;

CREATE TABLE IF NOT EXISTS data (
    id INT NOT NULL AUTO_INCREMENT,
    received_at DATETIME NOT NULL,
    flow_code VARCHAR(100) NOT NULL,
    attribute_name VARCHAR(255) NOT NULL,
    attribute_value TEXT NOT NULL,
    last_msg_id INT NOT NULL,
    PRIMARY KEY (id)
) DEFAULT CHARSET = utf8mb4;
