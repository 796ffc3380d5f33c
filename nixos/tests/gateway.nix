# The whole stack as an operator runs it: the module with a local MariaDB, a broker machine,
# an HTTP endpoint machine. Flows are added with the mysql client, messages published with
# mosquitto_pub, and everything is checked where an operator would look.
{
  name = "mqtt-gateway";

  nodes = {
    broker =
      { pkgs, ... }:
      {
        # The mosquitto module installs no client; the script publishes with mosquitto_pub.
        environment.systemPackages = [ pkgs.mosquitto ];
        services.mosquitto = {
          enable = true;
          settings.max_queued_messages = 100000;
          listeners = [
            {
              port = 1883;
              omitPasswordAuth = true;
              settings.allow_anonymous = true;
              acl = [ "topic readwrite #" ];
            }
          ];
        };
        networking.firewall.allowedTCPPorts = [ 1883 ];
      };

    echo =
      { pkgs, ... }:
      {
        systemd.services.echo = {
          wantedBy = [ "multi-user.target" ];
          serviceConfig = {
            ExecStart = "${pkgs.python3}/bin/python3 ${./echo-server.py} 8080 /var/lib/echo/requests.jsonl";
            StateDirectory = "echo";
          };
        };
        networking.firewall.allowedTCPPorts = [ 8080 ];
      };

    gateway =
      { pkgs, ... }:
      {
        environment.systemPackages = [ pkgs.mosquitto ];
        services.mqtt-gateway = {
          enable = true;
          mqtt.defaultHost = "broker";
          flowsReloadInterval = 2;
        };
      };
  };

  testScript = ''
    import json
    import time

    def sql(query):
        # A here-document: no shell quoting to get wrong around SQL quotes.
        return gateway.succeed(f"mysql --batch --skip-column-names mqtt_gateway <<'SQL'\n{query}\nSQL").strip()

    def eventually(what, check, timeout=120):
        deadline = time.monotonic() + timeout
        while not check():
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(0.5)

    def journal_has(text, extra=""):
        # grep reads to the end (no -q): an early match must not kill journalctl with SIGPIPE,
        # which `set -o pipefail` would turn into "not found".
        return gateway.execute(f"journalctl -u mqtt-gateway {extra} | grep -F '{text}' >/dev/null")[0] == 0

    def publish(topic, payload):
        broker.succeed(f"mosquitto_pub -h localhost -q 1 -t {topic} -m '{payload}'")

    def requests():
        lines = echo.succeed("cat /var/lib/echo/requests.jsonl 2>/dev/null || true").strip().splitlines()
        return [json.loads(line) for line in lines]

    start_all()
    broker.wait_for_open_port(1883)
    echo.wait_for_open_port(8080)

    with subtest("the unit is active only once ready"):
        gateway.wait_for_unit("mqtt-gateway.service")
        assert journal_has("Gateway ready")
        assert sql("SELECT host FROM mqtt_servers") == "broker"

    with subtest("a flow added with SQL is picked up by the interval reload"):
        sql("INSERT INTO flows (code, description, topic, action, payload_schema, endpoint_url, last_msg_id, enabled) "
            "VALUES ('AHT10_SENSOR', 'store', 'sensors/aht10', 'STORE_DB', '{\"temperature\": \"float\"}', NULL, 0, TRUE)")
        eventually("the subscription", lambda: journal_has("Subscribed to sensors/aht10"))
        publish("sensors/aht10", '{"temperature": 21.5, "humidity": 40}')
        eventually("the counter", lambda: sql("SELECT last_msg_id FROM flows WHERE code = 'AHT10_SENSOR'") == "1")
        rows = sql("SELECT attribute_name, attribute_value FROM data ORDER BY id")
        assert rows == "temperature\t21.5\nhumidity\t40", rows

    with subtest("systemctl reload applies a POST_ENDPOINT flow at once"):
        # Slow the interval reload down, so that only `systemctl reload` can apply the flow.
        gateway.succeed(
            "mkdir -p /run/systemd/system/mqtt-gateway.service.d && "
            "printf '[Service]\\nEnvironment=FLOWS_RELOAD_INTERVAL_SECONDS=3600\\n' "
            "> /run/systemd/system/mqtt-gateway.service.d/slow.conf && "
            "systemctl daemon-reload && systemctl restart mqtt-gateway"
        )
        gateway.wait_for_unit("mqtt-gateway.service")
        sql("INSERT INTO flows (code, description, topic, action, payload_schema, endpoint_url, last_msg_id, enabled) "
            "VALUES ('AHT10_ENDPOINT', 'post', 'sensors/post', 'POST_ENDPOINT', '{}', 'http://echo:8080/ingest', 0, TRUE)")
        gateway.succeed("systemctl reload mqtt-gateway")
        eventually("the subscription", lambda: journal_has("Subscribed to sensors/post"))
        publish("sensors/post", '{"t": 21.0, "name": "\u00e9t\u00e9"}')
        eventually("the POST", lambda: len(requests()) == 1)
        request = requests()[0]
        headers = {name.lower(): value for name, value in request["headers"].items()}
        assert request["path"] == "/ingest", request
        assert request["body"] == '{"t": 21.0, "name": "\\u00e9t\\u00e9"}', request
        assert headers["content-type"] == "application/json", request
        assert sql("SELECT last_msg_id FROM flows WHERE code = 'AHT10_ENDPOINT'") == "1"

    with subtest("disabling a flow unsubscribes it"):
        sql("UPDATE flows SET enabled = FALSE WHERE code = 'AHT10_SENSOR'")
        gateway.succeed("systemctl reload mqtt-gateway")
        eventually("the unsubscription", lambda: journal_has("Unsubscribed from sensors/aht10"))
        sql("UPDATE flows SET enabled = TRUE WHERE code = 'AHT10_SENSOR'")
        gateway.succeed("systemctl reload mqtt-gateway")
        eventually(
            "the new subscription",
            lambda: int(gateway.succeed("journalctl -u mqtt-gateway | grep -c 'Subscribed to sensors/aht10'")) >= 3,
        )

    with subtest("nothing is lost across MariaDB and broker restarts"):
        gateway.succeed("systemctl stop mysql")
        for i in range(1, 51):
            publish("sensors/aht10", f'{{"temperature": {i}}}')
        eventually("the outage to be noticed", lambda: journal_has("Database unavailable"))
        gateway.succeed("systemctl is-active mqtt-gateway")
        gateway.succeed("systemctl start mysql")
        broker.succeed("systemctl restart mosquitto")
        broker.wait_for_open_port(1883)
        for i in range(51, 101):
            publish("sensors/aht10", f'{{"temperature": {i}}}')
        eventually(
            "all 101 readings",
            lambda: int(sql("SELECT COUNT(DISTINCT attribute_value) FROM data WHERE attribute_name = 'temperature'")) == 101,
        )
        gateway.succeed("systemctl is-active mqtt-gateway")

    with subtest("a broker down at start: the unit keeps restarting and comes back by itself"):
        broker.succeed("systemctl stop mosquitto")
        gateway.succeed("systemctl restart --no-block mqtt-gateway")
        # More starts than the old limit of 5, which left the unit failed for good.
        eventually(
            "six failed starts",
            lambda: int(gateway.get_unit_property("mqtt-gateway.service", "NRestarts")) >= 6,
        )
        assert gateway.get_unit_property("mqtt-gateway.service", "ActiveState") != "failed"
        broker.succeed("systemctl start mosquitto")
        broker.wait_for_open_port(1883)
        gateway.wait_for_unit("mqtt-gateway.service", timeout=180)
        publish("sensors/aht10", '{"temperature": 500}')
        eventually(
            "the reading after the outage",
            lambda: sql("SELECT COUNT(*) FROM data WHERE attribute_value = '500'") == "1",
        )

    with subtest("the journal has the original's lines and the structured fields"):
        publish("sensors/aht10", "not json")
        eventually("the invalid payload line", lambda: journal_has("Invalid payload in topic sensors/aht10"))
        publish("sensors/aht10", '{"temperature": "hot"}')
        eventually(
            "the per-flow error, found by its field",
            lambda: journal_has("Error processing topic sensors/aht10", "FLOW_CODE=AHT10_SENSOR"),
        )

    with subtest("the unit is hardened"):
        output = gateway.succeed("systemd-analyze security mqtt-gateway.service | tail -n 1")
        score = float(output.split("level for mqtt-gateway.service:")[1].split()[0])
        assert score <= 2.0, f"exposure {score}: {output}"
  '';
}
