# services.mqtt-gateway: the gateway as a hardened systemd service.
#
# Five lines give a working gateway with a local MariaDB reached over its Unix socket (no
# password anywhere):
#
#   services.mqtt-gateway = {
#     enable = true;
#     mqtt.defaultHost = "broker.lan";
#   };
#
# Secrets never enter the Nix store: the database password and the client keys are files
# read by systemd (LoadCredential) and handed to the service in its credentials directory; their
# options take strings (`types.externalPath`), so a Nix path literal cannot copy one into the
# store. Public files (CA, client certificate) may be path literals: those are copied to the
# store and stay in the system closure.
{
  config,
  lib,
  pkgs,
  ...
}:
let
  cfg = config.services.mqtt-gateway;
  inherit (lib)
    mkDefault
    mkEnableOption
    mkIf
    mkOption
    mkPackageOption
    optional
    optionalAttrs
    types
    ;

  # A file that must stay out of the store: an absolute path given as a string. nixpkgs' lib
  # has `types.externalPath` since November 2025; the fallback keeps older pins evaluating.
  secretPath =
    types.externalPath
      or (types.addCheck types.str (s: lib.hasPrefix "/" s && !lib.hasPrefix builtins.storeDir s));

  # What the binary parses as a socket address: an IPv4 address or a bracketed IPv6 one, and a
  # port (`127.0.0.1:9464`, `[::]:9464`); a host name is not one.
  socketAddress =
    let
      octet = "(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])";
      port = "([0-9]|[1-9][0-9]{1,3}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5])";
    in
    types.strMatching "(${octet}(\\.${octet}){3}|\\[[0-9a-fA-F:.]+]):${port}";

  # A secret file for systemd to read into the credentials directory (`%d/<name>`).
  credential = name: file: optional (file != null) "${name}:${file}";

  # The one system user: with a local database it is also the database user, which MariaDB
  # authenticates by the connecting process's user (unix_socket), so no password exists.
  user = "mqtt-gateway";

  # The alerting and recording rules the package ships (README, "Alerts"), and the site's quiet
  # thresholds as the override rules those read (JSON is YAML to Prometheus).
  rulesFile = "${cfg.package}/share/mqtt-gateway/prometheus/mqtt-gateway.rules.yml";
  quietAfter = cfg.prometheus.quietAfter;
  override = "mqtt_gateway:flow_quiet_after_seconds:override";
  quietAfterRules = pkgs.writeText "mqtt-gateway-quiet-after.rules.yml" (
    builtins.toJSON {
      groups = [
        {
          name = "mqtt-gateway-quiet-after";
          rules =
            optional (quietAfter.default != null) {
              record = override;
              expr = "vector(${toString quietAfter.default})";
            }
            ++ lib.mapAttrsToList (flow: seconds: {
              record = override;
              expr = "vector(${toString seconds})";
              labels.flow = flow;
            }) quietAfter.flows;
        }
      ];
    }
  );

  # Where this host's Prometheus reaches `metrics.address`: a wildcard address listens on the
  # loopback interface too.
  scrapeTarget =
    let
      address = cfg.metrics.address;
    in
    if lib.hasPrefix "0.0.0.0:" address then
      "127.0.0.1:" + lib.removePrefix "0.0.0.0:" address
    else if lib.hasPrefix "[::]:" address then
      "[::1]:" + lib.removePrefix "[::]:" address
    else
      address;

  environment = lib.filterAttrs (_: value: value != null) (
    {
      DB_NAME = cfg.database.name;
      DB_USER = cfg.database.user;
      DB_HOST = if cfg.database.createLocally then null else cfg.database.host;
      DB_PORT = if cfg.database.createLocally then null else toString cfg.database.port;
      DB_SOCKET = if cfg.database.createLocally then "/run/mysqld/mysqld.sock" else cfg.database.socket;
      DB_SSL_MODE = cfg.database.tls.mode;
      DB_SSL_CA = if cfg.database.tls.caFile == null then null else "${cfg.database.tls.caFile}";
      DB_SSL_CERT =
        if cfg.database.tls.clientCertFile == null then null else "${cfg.database.tls.clientCertFile}";
      DB_SSL_KEY = if cfg.database.tls.clientKeyFile == null then null else "%d/db-client-key";
      MQTT_DEFAULT_HOST = cfg.mqtt.defaultHost;
      MQTT_DEFAULT_PORT = toString cfg.mqtt.defaultPort;
      MQTT_CLIENT_ID = cfg.mqtt.clientId;
      MQTT_KEEPALIVE = toString cfg.mqtt.keepalive;
      MQTT_QOS = toString cfg.mqtt.qos;
      MQTT_CLEAN_SESSION = lib.boolToString cfg.mqtt.cleanSession;
      MQTT_SHARED_GROUP = cfg.mqtt.sharedGroup;
      MQTT_PROTOCOL = cfg.mqtt.protocol;
      MQTT_SESSION_EXPIRY_SECONDS =
        if cfg.mqtt.sessionExpiry == null then null else toString cfg.mqtt.sessionExpiry;
      MQTT_TLS = lib.boolToString cfg.mqtt.tls.enable;
      # Interpolation copies a path literal into the store (a public file; it then stays in the
      # system closure) and leaves a string as it is.
      MQTT_CA_FILE = if cfg.mqtt.tls.caFile == null then null else "${cfg.mqtt.tls.caFile}";
      MQTT_CLIENT_CERT =
        if cfg.mqtt.tls.clientCertFile == null then null else "${cfg.mqtt.tls.clientCertFile}";
      # %d: systemd expands it to the service's credentials directory.
      MQTT_CLIENT_KEY = if cfg.mqtt.tls.clientKeyFile == null then null else "%d/mqtt-client-key";
      FLOWS_RELOAD_INTERVAL_SECONDS = toString cfg.flowsReloadInterval;
      HTTP_TIMEOUT_SECONDS = toString cfg.http.timeout;
      HTTP_MAX_ATTEMPTS = toString cfg.http.maxAttempts;
      HTTP_MAX_AGE_SECONDS = toString cfg.http.maxAge;
      HTTP_RETRY_MAX_DELAY_SECONDS = toString cfg.http.retryMaxDelay;
      HTTP_CONCURRENCY = toString cfg.http.concurrency;
      HTTP_MAX_IN_FLIGHT_BYTES = toString cfg.http.maxInFlightBytes;
      HTTP_ORDERED = lib.boolToString cfg.http.ordered;
      HTTP_CA_FILE = if cfg.http.caFile == null then null else "${cfg.http.caFile}";
      OUTBOX_LEASE_SECONDS = toString cfg.outbox.lease;
      MAX_IN_FLIGHT = toString cfg.maxInFlight;
      MAX_IN_FLIGHT_BYTES = toString cfg.maxInFlightBytes;
      BATCH_MAX_MESSAGES = toString cfg.batch.maxMessages;
      BATCH_MAX_DELAY_MS = toString cfg.batch.maxDelayMs;
      METRICS_ADDR = cfg.metrics.address;
      LOG_DIR = if cfg.logDir then "/var/log/mqtt-gateway" else null;
      LOG_FORMAT = "journald";
      RUST_LOG = cfg.logLevel;
    }
    // cfg.extraEnvironment
  );
in
{
  options.services.mqtt-gateway = {
    enable = mkEnableOption "mqtt-gateway, which stores MQTT messages in MariaDB or POSTs them, per flow";

    package = mkPackageOption pkgs "mqtt-gateway" { };

    database = {
      createLocally = mkOption {
        type = types.bool;
        default = true;
        description = ''
          Run MariaDB on this machine with a database and a user for the gateway, reached over
          the Unix socket and authenticated by the service's system user: no password exists.
        '';
      };
      host = mkOption {
        type = types.str;
        default = "localhost";
        description = "Host of a remote database (`DB_HOST`); unused with `createLocally`.";
      };
      port = mkOption {
        type = types.ints.between 1 65535;
        default = 3306;
        description = "Port of a remote database (`DB_PORT`).";
      };
      socket = mkOption {
        type = types.nullOr types.path;
        default = null;
        description = "Unix socket of a database on this machine not managed here (`DB_SOCKET`).";
      };
      name = mkOption {
        type = types.str;
        default = "mqtt_gateway";
        description = "Database name (`DB_NAME`).";
      };
      user = mkOption {
        type = types.str;
        default = user;
        description = "Database user (`DB_USER`); with `createLocally` it must be `${user}`.";
      };
      passwordFile = mkOption {
        type = types.nullOr secretPath;
        default = null;
        example = "/run/secrets/mqtt-gateway-db-password";
        description = ''
          File holding the database password, read by systemd and passed as a credential; it
          never enters the Nix store (a string path outside the store; a Nix path literal is
          refused).
        '';
      };
      tls = {
        mode = mkOption {
          type = types.nullOr (
            types.enum [
              "disabled"
              "preferred"
              "required"
              "verify_ca"
              "verify_identity"
            ]
          );
          default = null;
          example = "verify_identity";
          description = ''
            TLS to the database (`DB_SSL_MODE`), with the MySQL client's `--ssl-mode` meanings;
            when null, `preferred` over TCP and `disabled` over a Unix socket (and so with
            `createLocally`).
          '';
        };
        caFile = mkOption {
          type = types.nullOr types.path;
          default = null;
          example = lib.literalExpression "./db-ca.pem";
          description = "PEM CA certificates that sign the database server's certificate (`DB_SSL_CA`), trusted besides the system's roots; only with mode `verify_ca` or `verify_identity`. A Nix path literal is copied to the store.";
        };
        clientCertFile = mkOption {
          type = types.nullOr types.path;
          default = null;
          description = "PEM client certificate chain for a database user that must present one, `REQUIRE X509` (`DB_SSL_CERT`). A Nix path literal is copied to the store.";
        };
        clientKeyFile = mkOption {
          type = types.nullOr secretPath;
          default = null;
          example = "/run/secrets/mqtt-gateway-db-client.key";
          description = "PEM key of that certificate (`DB_SSL_KEY`), passed as a systemd credential; a string path outside the store.";
        };
      };
    };

    mqtt = {
      createLocally = mkOption {
        type = types.bool;
        default = false;
        description = ''
          Run Mosquitto on this machine with a loopback listener for the gateway, queue limits
          raised for its persistent session, and seed it as the broker.
        '';
      };
      defaultHost = mkOption {
        type = types.str;
        default = "localhost";
        description = "Broker host seeded into an empty `mqtt_servers` table (`MQTT_DEFAULT_HOST`).";
      };
      defaultPort = mkOption {
        type = types.ints.between 1 65535;
        default = 1883;
        description = "Broker port seeded into an empty `mqtt_servers` table (`MQTT_DEFAULT_PORT`).";
      };
      clientId = mkOption {
        type = types.nullOr (types.strMatching ".{1,191}");
        default = null;
        description = "MQTT client id (`MQTT_CLIENT_ID`); by default `mqtt-gateway`, or `mqtt-gateway-<hostname>` with a shared group.";
      };
      keepalive = mkOption {
        type = types.ints.u16;
        default = 60;
        description = "MQTT keepalive in seconds (`MQTT_KEEPALIVE`).";
      };
      qos = mkOption {
        type = types.enum [
          0
          1
        ];
        default = 1;
        description = "Subscription QoS (`MQTT_QOS`); with 1 nothing is lost.";
      };
      cleanSession = mkOption {
        type = types.bool;
        default = false;
        description = "Ask the broker not to keep the session (`MQTT_CLEAN_SESSION`); messages sent while the gateway is away are then lost.";
      };
      sharedGroup = mkOption {
        type = types.nullOr (types.strMatching "[^/+#]{1,200}");
        default = null;
        description = "Shared subscription group, to spread the load over several gateways (`MQTT_SHARED_GROUP`); no `/`, `+` or `#`, at most 200 characters. Changing it is safe: each gateway unsubscribes the old group's filters when it starts.";
      };
      protocol = mkOption {
        type = types.enum [
          "5"
          "3.1.1"
        ];
        default = "5";
        description = "MQTT version asked for first (`MQTT_PROTOCOL`); a broker that refuses 5 gets 3.1.1, with one warning.";
      };
      sessionExpiry = mkOption {
        type = types.nullOr types.ints.u32;
        default = null;
        example = 604800;
        description = "MQTT 5: seconds the broker keeps the gateway's session, and queues its messages, after it disconnects (`MQTT_SESSION_EXPIRY_SECONDS`); null: never ends. Lets the queue of a decommissioned gateway end; not with `cleanSession`.";
      };
      tls = {
        enable = mkEnableOption "TLS to the broker (server certificate and name always verified)";
        caFile = mkOption {
          type = types.nullOr types.path;
          default = null;
          example = lib.literalExpression "./broker-ca.pem";
          description = "PEM CA certificates to trust (`MQTT_CA_FILE`); the system's roots when null. A Nix path literal is copied to the store.";
        };
        clientCertFile = mkOption {
          type = types.nullOr types.path;
          default = null;
          description = "PEM client certificate chain for mutual TLS (`MQTT_CLIENT_CERT`). A Nix path literal is copied to the store.";
        };
        clientKeyFile = mkOption {
          type = types.nullOr secretPath;
          default = null;
          example = "/run/secrets/mqtt-gateway-client.key";
          description = "PEM client key, passed as a systemd credential; a string path outside the store.";
        };
      };
    };

    flowsReloadInterval = mkOption {
      type = types.ints.between 1 3153600000;
      default = 600;
      description = "Seconds between flow reloads (`FLOWS_RELOAD_INTERVAL_SECONDS`); `systemctl reload mqtt-gateway` reloads at once.";
    };

    http = {
      timeout = mkOption {
        type = types.ints.between 1 86400;
        default = 10;
        description = "Seconds per POST (`HTTP_TIMEOUT_SECONDS`).";
      };
      maxAttempts = mkOption {
        type = types.ints.between 1 1000000000;
        default = 100;
        description = "Attempts before a POST is kept as dead (`HTTP_MAX_ATTEMPTS`).";
      };
      maxAge = mkOption {
        type = types.ints.between 1 3153600000;
        default = 86400;
        description = "Seconds after which a failing POST is kept as dead (`HTTP_MAX_AGE_SECONDS`).";
      };
      retryMaxDelay = mkOption {
        type = types.ints.between 1 86400;
        default = 300;
        description = "Cap in seconds of the backoff between attempts (`HTTP_RETRY_MAX_DELAY_SECONDS`).";
      };
      concurrency = mkOption {
        type = types.ints.between 1 10000;
        default = 8;
        description = "POSTs in flight per endpoint (`HTTP_CONCURRENCY`).";
      };
      maxInFlightBytes = mkOption {
        type = types.ints.between 1 1099511627776;
        default = 33554432;
        description = "Bytes of request bodies read from the outbox and not yet answered, over all flows (`HTTP_MAX_IN_FLIGHT_BYTES`); a larger body is still sent, alone.";
      };
      ordered = mkOption {
        type = types.bool;
        default = true;
        description = "Deliver each flow's POSTs in arrival order, one at a time (`HTTP_ORDERED`).";
      };
      caFile = mkOption {
        type = types.nullOr types.path;
        default = null;
        example = lib.literalExpression "./endpoints-ca.pem";
        description = "PEM CA certificates trusted for HTTPS endpoints besides the system's roots (`HTTP_CA_FILE`); a file without a certificate stops the start. A Nix path literal is copied to the store.";
      };
    };

    outbox.lease = mkOption {
      type = types.ints.between 1 86400;
      default = 30;
      description = "Seconds an instance's hold on a flow's outbox lasts without renewal (`OUTBOX_LEASE_SECONDS`); it is renewed every third of that while delivering, and another instance takes over a dead one's flows after it.";
    };

    maxInFlight = mkOption {
      type = types.ints.between 1 1000000;
      default = 1000;
      description = "Messages taken from the broker and not yet acknowledged (`MAX_IN_FLIGHT`); reading from the broker pauses at this many.";
    };

    maxInFlightBytes = mkOption {
      type = types.ints.between 1 1099511627776;
      default = 67108864;
      description = "Payload bytes taken from the broker and not yet acknowledged (`MAX_IN_FLIGHT_BYTES`); reading pauses at this many, so memory follows it.";
    };

    batch = {
      maxMessages = mkOption {
        type = types.ints.between 1 100000;
        default = 500;
        description = "Most messages per transaction (`BATCH_MAX_MESSAGES`).";
      };
      maxDelayMs = mkOption {
        type = types.ints.between 0 60000;
        default = 2;
        description = "Milliseconds a batch waits for more messages (`BATCH_MAX_DELAY_MS`).";
      };
    };

    logDir = mkOption {
      type = types.bool;
      default = false;
      description = "Also write the original's daily ERROR files under /var/log/mqtt-gateway (`LOG_DIR`); the journal always gets every line.";
    };

    logLevel = mkOption {
      type = types.str;
      default = "info";
      description = "Log level or tracing filter (`RUST_LOG`).";
    };

    watchdogSec = mkOption {
      type = types.ints.positive;
      default = 30;
      description = "systemd restarts the gateway when a task of its pipeline is stuck: it has not come back to its loop for half this many seconds while waiting on nothing that ends by itself. Waiting for the database (a lock, an outage) is not stuck: it is held and reported.";
    };

    metrics.address = mkOption {
      type = types.nullOr socketAddress;
      default = null;
      example = "127.0.0.1:9464";
      description = ''
        Serve `/metrics` (Prometheus), `/healthz` and `/readyz` on this address and port
        (`METRICS_ADDR`); null: off. With Prometheus on this host, the module also adds the
        gateway's rules and a scrape job for this address (see `prometheus.*`).
      '';
    };

    prometheus = {
      addRules = mkOption {
        type = types.bool;
        default = cfg.metrics.address != null;
        defaultText = lib.literalExpression "config.services.mqtt-gateway.metrics.address != null";
        description = ''
          When Prometheus runs on this host (`services.prometheus.enable`), add the gateway's
          alerting and recording rules (the package's
          `share/mqtt-gateway/prometheus/mqtt-gateway.rules.yml`; the README's "Alerts" says what
          each alert means and what to do) to `services.prometheus.ruleFiles`. They expect the
          gateway's metrics scraped as job `mqtt-gateway` (`prometheus.scrape` adds that job):
          `MqttGatewayTargetMissing` fires until they are. On by default once `metrics.address`
          is set, since the alerts can only work then.
        '';
      };
      scrape = mkOption {
        type = types.bool;
        default = true;
        description = ''
          When Prometheus runs on this host and `metrics.address` is set, add the scrape job
          `mqtt-gateway` for it to `services.prometheus.scrapeConfigs` (an address on every
          interface, `0.0.0.0` or `[::]`, is scraped on the loopback one). Turn it off to write
          the job yourself: the rules expect that job name.
        '';
      };
      quietAfter = {
        default = mkOption {
          type = types.nullOr types.ints.positive;
          default = null;
          example = 1800;
          description = "Seconds any flow may take no message before `MqttGatewayFlowQuiet` fires; null keeps the rules' one hour. Needs `prometheus.addRules`.";
        };
        flows = mkOption {
          type = types.attrsOf types.ints.positive;
          default = { };
          example = {
            WEEKLY_METER = 691200;
          };
          description = "The same for single flows, by flow code; each wins over `default`. Needs `prometheus.addRules`.";
        };
      };
    };

    environmentFile = mkOption {
      type = types.nullOr secretPath;
      default = null;
      description = "Extra `KEY=value` environment read by systemd at start (for example secrets of `extraEnvironment` variables).";
    };

    extraEnvironment = mkOption {
      type = types.attrsOf types.str;
      default = { };
      example = {
        RUST_LOG = "mqtt_gateway=debug";
      };
      description = "More environment variables for the gateway; they win over the options above.";
    };
  };

  config = mkIf cfg.enable {
    assertions = [
      {
        # Over a socket MariaDB may log the service's user in by unix_socket, without a password.
        assertion =
          cfg.database.createLocally
          || cfg.database.socket != null
          || cfg.database.passwordFile != null
          || cfg.environmentFile != null;
        message = "services.mqtt-gateway: a database reached over TCP needs a password: set database.passwordFile (or DB_PASSWORD in environmentFile), or database.socket for unix_socket login.";
      }
      {
        assertion = !cfg.database.createLocally || cfg.database.user == user;
        message = "services.mqtt-gateway: with database.createLocally the database user is the service's system user, so database.user must be \"${user}\".";
      }
      {
        assertion = !cfg.database.createLocally || cfg.database.passwordFile == null;
        message = "services.mqtt-gateway: database.createLocally authenticates over the Unix socket without a password; remove database.passwordFile.";
      }
      {
        assertion = !(cfg.mqtt.cleanSession && cfg.mqtt.sessionExpiry != null);
        message = "services.mqtt-gateway: mqtt.sessionExpiry has no meaning with mqtt.cleanSession, whose session ends with the connection; set one of them.";
      }
      {
        assertion = (cfg.mqtt.tls.clientCertFile == null) == (cfg.mqtt.tls.clientKeyFile == null);
        message = "services.mqtt-gateway: mqtt.tls.clientCertFile and mqtt.tls.clientKeyFile go together.";
      }
      {
        assertion = (cfg.database.tls.clientCertFile == null) == (cfg.database.tls.clientKeyFile == null);
        message = "services.mqtt-gateway: database.tls.clientCertFile and database.tls.clientKeyFile go together.";
      }
      {
        assertion =
          cfg.database.tls.caFile == null
          || cfg.database.tls.mode == "verify_ca"
          || cfg.database.tls.mode == "verify_identity";
        message = "services.mqtt-gateway: database.tls.caFile is only used to verify the server; set database.tls.mode to \"verify_ca\" or \"verify_identity\", or remove it.";
      }
      {
        # Over a Unix socket (so with createLocally) TLS is off unless a mode is given.
        assertion =
          cfg.database.tls.clientCertFile == null
          || (
            cfg.database.tls.mode != "disabled"
            && (cfg.database.tls.mode != null || (!cfg.database.createLocally && cfg.database.socket == null))
          );
        message = "services.mqtt-gateway: database.tls.clientCertFile needs TLS to the database, which is off with mode \"disabled\" or, when no mode is set, over a Unix socket; set database.tls.mode.";
      }
      {
        assertion =
          !cfg.mqtt.createLocally
          || cfg.mqtt.defaultHost == "localhost"
          || cfg.mqtt.defaultHost == "127.0.0.1";
        message = "services.mqtt-gateway: mqtt.createLocally runs the broker on this machine; leave mqtt.defaultHost at \"localhost\".";
      }
      {
        assertion = !(cfg.mqtt.createLocally && cfg.mqtt.tls.enable);
        message = "services.mqtt-gateway: mqtt.createLocally runs a loopback broker without TLS; disable mqtt.tls.enable, or run the broker yourself with a TLS listener.";
      }
      {
        assertion = cfg.prometheus.addRules || (quietAfter.default == null && quietAfter.flows == { });
        message = "services.mqtt-gateway: prometheus.quietAfter sets thresholds for the shipped rules, which are left out (prometheus.addRules is false; it is on by default once metrics.address is set); set metrics.address, or remove quietAfter.";
      }
      {
        assertion =
          cfg.mqtt.tls.enable
          || (
            cfg.mqtt.tls.caFile == null
            && cfg.mqtt.tls.clientCertFile == null
            && cfg.mqtt.tls.clientKeyFile == null
          );
        message = "services.mqtt-gateway: mqtt.tls files are set but mqtt.tls.enable is false, so they would be ignored; enable TLS or remove them.";
      }
    ];

    services.mysql = mkIf cfg.database.createLocally {
      enable = true;
      package = mkDefault pkgs.mariadb;
      ensureDatabases = [ cfg.database.name ];
      ensureUsers = [
        {
          name = user;
          ensurePermissions."${cfg.database.name}.*" = "ALL PRIVILEGES";
        }
      ];
    };

    # Only where Prometheus runs: a Prometheus elsewhere loads the same file from the package,
    # and scrapes the address it can reach.
    services.prometheus.scrapeConfigs =
      mkIf (cfg.prometheus.scrape && cfg.metrics.address != null && config.services.prometheus.enable)
        [
          {
            job_name = "mqtt-gateway";
            static_configs = [ { targets = [ scrapeTarget ]; } ];
          }
        ];

    services.prometheus.ruleFiles =
      mkIf (cfg.prometheus.addRules && config.services.prometheus.enable)
        ([ rulesFile ] ++ optional (quietAfter.default != null || quietAfter.flows != { }) quietAfterRules);

    services.mosquitto = mkIf cfg.mqtt.createLocally {
      enable = true;
      # Mosquitto's default of 1,000 queued messages per offline client would drop messages
      # during a long gateway restart; a wide in-flight window lets batches fill.
      settings = {
        max_queued_messages = mkDefault 1000000;
        max_inflight_messages = mkDefault 1000;
      };
      listeners = [
        {
          address = "127.0.0.1";
          port = cfg.mqtt.defaultPort;
          omitPasswordAuth = true;
          settings.allow_anonymous = true;
          acl = [ "topic readwrite #" ];
        }
      ];
    };

    systemd.services.mqtt-gateway = {
      description = "MQTT gateway: MQTT messages into MariaDB or HTTP, per flow";
      wantedBy = [ "multi-user.target" ];
      after = [
        "network-online.target"
      ]
      ++ optional cfg.database.createLocally "mysql.service"
      ++ optional cfg.mqtt.createLocally "mosquitto.service";
      # Wanted, not required: stopping MariaDB must not stop the gateway, which waits out a
      # database outage by itself without losing a message.
      wants = [ "network-online.target" ] ++ optional cfg.database.createLocally "mysql.service";
      inherit environment;

      # An appliance comes back by itself: a broker or database that is unreachable at start is
      # fatal to one start (exit 1, as the original), never to the unit. No start limit; the
      # delay grows from 1 s to 60 s over 10 restarts and stays there.
      startLimitIntervalSec = 0;

      serviceConfig = {
        # notify-reload: `systemctl reload` sends SIGHUP and returns only after the gateway's
        # RELOADING=1 ... READY=1, by design rather than by winning a race with a kill helper.
        Type = "notify-reload";
        ReloadSignal = "SIGHUP";
        NotifyAccess = "main";
        ExecStart = lib.getExe cfg.package;
        WatchdogSec = cfg.watchdogSec;
        Restart = "on-failure";
        RestartSec = 1;
        RestartSteps = 10;
        RestartMaxDelaySec = 60;
        TimeoutStopSec = cfg.http.timeout + 20;

        DynamicUser = true;
        User = user;
        LoadCredential =
          credential "db-password" cfg.database.passwordFile
          ++ credential "db-client-key" cfg.database.tls.clientKeyFile
          ++ credential "mqtt-client-key" cfg.mqtt.tls.clientKeyFile;
        EnvironmentFile = optional (cfg.environmentFile != null) cfg.environmentFile;

        # Hardening: the gateway talks TCP (or a Unix socket) and writes nothing but logs.
        # DynamicUser already implies ProtectSystem=strict, PrivateTmp, RemoveIPC,
        # NoNewPrivileges and RestrictSUIDSGID; ProtectHome=true is stricter than its read-only.
        CapabilityBoundingSet = "";
        AmbientCapabilities = "";
        PrivateDevices = true;
        PrivateUsers = true;
        DevicePolicy = "closed";
        ProtectHome = true;
        ProtectClock = true;
        ProtectControlGroups = true;
        ProtectHostname = true;
        ProtectKernelLogs = true;
        ProtectKernelModules = true;
        ProtectKernelTunables = true;
        ProtectProc = "invisible";
        ProcSubset = "pid";
        RestrictAddressFamilies = [
          "AF_UNIX"
          "AF_INET"
          "AF_INET6"
        ];
        RestrictNamespaces = true;
        RestrictRealtime = true;
        LockPersonality = true;
        MemoryDenyWriteExecute = true;
        SystemCallArchitectures = "native";
        SystemCallFilter = [
          "@system-service"
          "~@privileged"
          "~@resources"
        ];
        SystemCallErrorNumber = "EPERM";
        UMask = "0077";
      }
      // optionalAttrs cfg.logDir {
        LogsDirectory = "mqtt-gateway";
      };
    };
  };
}
