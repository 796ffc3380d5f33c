# The module with a database on another machine, its password in a file passed as a systemd
# credential: it connects, and the password appears nowhere in the journal or the store.
let
  password = "s3cret@with/odd:chars";
in
{
  name = "mqtt-gateway-remote-database";

  nodes = {
    db =
      { pkgs, ... }:
      {
        services.mysql = {
          enable = true;
          package = pkgs.mariadb;
          settings.mysqld.bind-address = "0.0.0.0";
          ensureDatabases = [ "gateway" ];
          initialScript = pkgs.writeText "grant.sql" ''
            CREATE USER 'gateway'@'%' IDENTIFIED BY '${password}';
            GRANT ALL ON gateway.* TO 'gateway'@'%';
          '';
        };
        networking.firewall.allowedTCPPorts = [ 3306 ];
      };

    gateway =
      { pkgs, ... }:
      {
        services.mqtt-gateway = {
          enable = true;
          mqtt.createLocally = true;
          database = {
            createLocally = false;
            host = "db";
            name = "gateway";
            user = "gateway";
            passwordFile = "/etc/gateway-db-password";
          };
        };
        # Written at boot so it never enters the store, as a secret manager would.
        systemd.services.gateway-secret = {
          wantedBy = [ "multi-user.target" ];
          before = [ "mqtt-gateway.service" ];
          requiredBy = [ "mqtt-gateway.service" ];
          serviceConfig.Type = "oneshot";
          script = "umask 077; printf '%s' \"$(echo czNjcmV0QHdpdGgvb2RkOmNoYXJz | ${pkgs.coreutils}/bin/base64 -d)\" > /etc/gateway-db-password";
        };
      };
  };

  testScript = ''
    start_all()
    db.wait_for_open_port(3306)
    gateway.wait_for_unit("mqtt-gateway.service")
    gateway.succeed("journalctl -u mqtt-gateway | grep 'Gateway ready'")
    db.succeed("mysql -N -B gateway -e 'SELECT COUNT(*) FROM mqtt_servers' | grep -x 1")
    gateway.fail("journalctl --no-pager | grep -F 's3cret@with/odd:chars'")
    gateway.fail("systemctl show mqtt-gateway -p Environment | grep -F 's3cret'")
  '';
}
