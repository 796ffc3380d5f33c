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
# Secrets never enter the Nix store: the database password and the MQTT client key are files
# read by systemd (LoadCredential) and handed to the service in its credentials directory.
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

  # The one system user: with a local database it is also the database user, which MariaDB
  # authenticates by the connecting process's user (unix_socket), so no password exists.
  user = "mqtt-gateway";
  credentials = "/run/credentials/mqtt-gateway.service";

  environment = lib.filterAttrs (_: value: value != null) (
    {
      DB_NAME = cfg.database.name;
      DB_USER = cfg.database.user;
      DB_HOST = if cfg.database.createLocally then null else cfg.database.host;
      DB_PORT = if cfg.database.createLocally then null else toString cfg.database.port;
      DB_SOCKET = if cfg.database.createLocally then "/run/mysqld/mysqld.sock" else cfg.database.socket;
      MQTT_DEFAULT_HOST = cfg.mqtt.defaultHost;
      MQTT_DEFAULT_PORT = toString cfg.mqtt.defaultPort;
      MQTT_CLIENT_ID = cfg.mqtt.clientId;
      MQTT_KEEPALIVE = toString cfg.mqtt.keepalive;
      MQTT_QOS = toString cfg.mqtt.qos;
      MQTT_CLEAN_SESSION = lib.boolToString cfg.mqtt.cleanSession;
      MQTT_SHARED_GROUP = cfg.mqtt.sharedGroup;
      MQTT_TLS = lib.boolToString cfg.mqtt.tls.enable;
      MQTT_CA_FILE = if cfg.mqtt.tls.caFile == null then null else toString cfg.mqtt.tls.caFile;
      MQTT_CLIENT_CERT =
        if cfg.mqtt.tls.clientCertFile == null then null else toString cfg.mqtt.tls.clientCertFile;
      MQTT_CLIENT_KEY =
        if cfg.mqtt.tls.clientKeyFile == null then null else "${credentials}/mqtt-client-key";
      FLOWS_RELOAD_INTERVAL_SECONDS = toString cfg.flowsReloadInterval;
      HTTP_TIMEOUT_SECONDS = toString cfg.http.timeout;
      HTTP_MAX_ATTEMPTS = toString cfg.http.maxAttempts;
      HTTP_MAX_AGE_SECONDS = toString cfg.http.maxAge;
      HTTP_RETRY_MAX_DELAY_SECONDS = toString cfg.http.retryMaxDelay;
      HTTP_CONCURRENCY = toString cfg.http.concurrency;
      HTTP_ORDERED = lib.boolToString cfg.http.ordered;
      MAX_IN_FLIGHT = toString cfg.maxInFlight;
      BATCH_MAX_MESSAGES = toString cfg.batch.maxMessages;
      BATCH_MAX_DELAY_MS = toString cfg.batch.maxDelayMs;
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
        type = types.port;
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
        type = types.nullOr types.path;
        default = null;
        example = "/run/secrets/mqtt-gateway-db-password";
        description = ''
          File holding the database password, read by systemd and passed as a credential; it
          never enters the Nix store. Give it as a string path, not a Nix path literal.
        '';
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
        type = types.port;
        default = 1883;
        description = "Broker port seeded into an empty `mqtt_servers` table (`MQTT_DEFAULT_PORT`).";
      };
      clientId = mkOption {
        type = types.nullOr types.str;
        default = null;
        description = "MQTT client id (`MQTT_CLIENT_ID`); by default `mqtt-gateway`, or `mqtt-gateway-<hostname>` with a shared group.";
      };
      keepalive = mkOption {
        type = types.ints.unsigned;
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
        type = types.nullOr types.str;
        default = null;
        description = "Shared subscription group, to spread the load over several gateways (`MQTT_SHARED_GROUP`).";
      };
      tls = {
        enable = mkEnableOption "TLS to the broker (server certificate and name always verified)";
        caFile = mkOption {
          type = types.nullOr types.path;
          default = null;
          description = "PEM CA certificates to trust (`MQTT_CA_FILE`); the system's roots when null.";
        };
        clientCertFile = mkOption {
          type = types.nullOr types.path;
          default = null;
          description = "PEM client certificate chain for mutual TLS (`MQTT_CLIENT_CERT`).";
        };
        clientKeyFile = mkOption {
          type = types.nullOr types.path;
          default = null;
          description = "PEM client key, passed as a systemd credential; give it as a string path so it stays out of the store.";
        };
      };
    };

    flowsReloadInterval = mkOption {
      type = types.ints.positive;
      default = 600;
      description = "Seconds between flow reloads (`FLOWS_RELOAD_INTERVAL_SECONDS`); `systemctl reload mqtt-gateway` reloads at once.";
    };

    http = {
      timeout = mkOption {
        type = types.ints.positive;
        default = 10;
        description = "Seconds per POST (`HTTP_TIMEOUT_SECONDS`).";
      };
      maxAttempts = mkOption {
        type = types.ints.positive;
        default = 100;
        description = "Attempts before a POST is kept as dead (`HTTP_MAX_ATTEMPTS`).";
      };
      maxAge = mkOption {
        type = types.ints.positive;
        default = 86400;
        description = "Seconds after which a failing POST is kept as dead (`HTTP_MAX_AGE_SECONDS`).";
      };
      retryMaxDelay = mkOption {
        type = types.ints.positive;
        default = 300;
        description = "Cap in seconds of the backoff between attempts (`HTTP_RETRY_MAX_DELAY_SECONDS`).";
      };
      concurrency = mkOption {
        type = types.ints.positive;
        default = 8;
        description = "POSTs in flight per endpoint (`HTTP_CONCURRENCY`).";
      };
      ordered = mkOption {
        type = types.bool;
        default = true;
        description = "Deliver each flow's POSTs in arrival order, one at a time (`HTTP_ORDERED`).";
      };
    };

    maxInFlight = mkOption {
      type = types.ints.positive;
      default = 1000;
      description = "Messages taken from the broker and not yet acknowledged (`MAX_IN_FLIGHT`).";
    };

    batch = {
      maxMessages = mkOption {
        type = types.ints.positive;
        default = 500;
        description = "Most messages per transaction (`BATCH_MAX_MESSAGES`).";
      };
      maxDelayMs = mkOption {
        type = types.ints.unsigned;
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
      description = "systemd restarts the gateway when its pipeline makes no progress for this many seconds.";
    };

    environmentFile = mkOption {
      type = types.nullOr types.path;
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
        assertion =
          cfg.database.createLocally || cfg.database.passwordFile != null || cfg.environmentFile != null;
        message = "services.mqtt-gateway: a remote database needs a password: set database.passwordFile (or DB_PASSWORD in environmentFile).";
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
        assertion = (cfg.mqtt.tls.clientCertFile == null) == (cfg.mqtt.tls.clientKeyFile == null);
        message = "services.mqtt-gateway: mqtt.tls.clientCertFile and mqtt.tls.clientKeyFile go together.";
      }
      {
        assertion =
          !cfg.mqtt.createLocally
          || cfg.mqtt.defaultHost == "localhost"
          || cfg.mqtt.defaultHost == "127.0.0.1";
        message = "services.mqtt-gateway: mqtt.createLocally runs the broker on this machine; leave mqtt.defaultHost at \"localhost\".";
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

    services.mosquitto = mkIf cfg.mqtt.createLocally {
      enable = true;
      # Mosquitto's default of 1,000 queued messages per offline client would drop messages
      # during a long gateway restart; a wide in-flight window lets batches fill.
      settings = {
        max_queued_messages = 1000000;
        max_inflight_messages = 1000;
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

      startLimitIntervalSec = 300;
      startLimitBurst = 5;

      serviceConfig = {
        Type = "notify";
        NotifyAccess = "main";
        ExecStart = lib.getExe cfg.package;
        ExecReload = "${pkgs.coreutils}/bin/kill -HUP $MAINPID";
        WatchdogSec = cfg.watchdogSec;
        Restart = "on-failure";
        RestartSec = 5;
        TimeoutStopSec = cfg.http.timeout + 20;

        DynamicUser = true;
        User = user;
        LoadCredential =
          optional (cfg.database.passwordFile != null) "db-password:${toString cfg.database.passwordFile}"
          ++ optional (
            cfg.mqtt.tls.clientKeyFile != null
          ) "mqtt-client-key:${toString cfg.mqtt.tls.clientKeyFile}";
        EnvironmentFile = optional (cfg.environmentFile != null) (toString cfg.environmentFile);

        # Hardening: the gateway talks TCP (or a Unix socket) and writes nothing but logs.
        CapabilityBoundingSet = "";
        AmbientCapabilities = "";
        NoNewPrivileges = true;
        PrivateTmp = true;
        PrivateDevices = true;
        PrivateUsers = true;
        DevicePolicy = "closed";
        ProtectSystem = "strict";
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
        RestrictSUIDSGID = true;
        RemoveIPC = true;
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
