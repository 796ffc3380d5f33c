# The module with a database on another machine, its password in a file passed as a systemd
# credential: it connects, and the password appears nowhere in the journal, the unit or either
# machine's system closure. Both machines write their copy of the password at boot (as a secret
# manager would), so no derivation ever holds it; the script only sees it base64-encoded.
let
  # "s3cret@with/odd:chars": characters a URL-based client would have to escape.
  encoded = "czNjcmV0QHdpdGgvb2RkOmNoYXJz";
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
          # A string, not a path literal: mysql.nix reads it with `cat` at the first start, and
          # it never enters the store.
          initialScript = "/run/db-init/grant.sql";
        };
        systemd.services.db-init-secret = {
          wantedBy = [ "multi-user.target" ];
          before = [ "mysql.service" ];
          requiredBy = [ "mysql.service" ];
          serviceConfig = {
            Type = "oneshot";
            RemainAfterExit = true;
          };
          script = ''
            umask 077
            mkdir -p /run/db-init
            password=$(echo ${encoded} | ${pkgs.coreutils}/bin/base64 -d)
            printf "CREATE USER 'gateway'@'%%' IDENTIFIED BY '%s';\nGRANT ALL ON gateway.* TO 'gateway'@'%%';\n" "$password" > /run/db-init/grant.sql
            chown -R mysql /run/db-init
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
        systemd.services.gateway-secret = {
          wantedBy = [ "multi-user.target" ];
          before = [ "mqtt-gateway.service" ];
          requiredBy = [ "mqtt-gateway.service" ];
          serviceConfig.Type = "oneshot";
          script = "umask 077; printf '%s' \"$(echo ${encoded} | ${pkgs.coreutils}/bin/base64 -d)\" > /etc/gateway-db-password";
        };
      };
  };

  testScript = ''
    import base64

    password = base64.b64decode("${encoded}").decode()

    # The database first: the gateway would come up anyway (it restarts until the database
    # answers), but this test is about the credential, not about boot order.
    db.start()
    db.wait_for_open_port(3306)
    gateway.start()
    gateway.wait_for_unit("mqtt-gateway.service")
    gateway.succeed("journalctl -u mqtt-gateway | grep 'Gateway ready' >/dev/null")
    db.succeed("mysql -N -B gateway -e 'SELECT COUNT(*) FROM mqtt_servers' | grep -x 1")

    with subtest("the password is nowhere but in its two files"):
        for machine in [db, gateway]:
            machine.fail(f"journalctl --no-pager | grep -F '{password}'")
            # Every store path of the machine's system: units, scripts, configuration files.
            found = machine.succeed(f"nix-store -qR /run/current-system | xargs grep -rlsF '{password}' || true")
            assert found.strip() == "", f"the password is in the store: {found}"
        gateway.fail(f"systemctl show mqtt-gateway | grep -F '{password}'")
        gateway.fail(f"tr '\\0' '\\n' < /proc/$(systemctl show -p MainPID --value mqtt-gateway)/environ | grep -F '{password}'")
  '';
}
