{
  description = "mqtt-gateway: MQTT messages into MariaDB rows or HTTP POSTs, one flow at a time";

  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-25.11";

  outputs =
    { self, nixpkgs }:
    let
      systems = [
        "x86_64-linux"
        "aarch64-linux"
      ];
      inherit (nixpkgs) lib;
      forAllSystems = f: lib.genAttrs systems (system: f nixpkgs.legacyPackages.${system});
    in
    {
      overlays.default = final: _prev: {
        mqtt-gateway = final.callPackage ./nixos/package.nix { };
      };

      packages = forAllSystems (pkgs: {
        mqtt-gateway = pkgs.callPackage ./nixos/package.nix { };
        default = self.packages.${pkgs.stdenv.hostPlatform.system}.mqtt-gateway;
      });

      apps = forAllSystems (pkgs: {
        default = {
          type = "app";
          program = lib.getExe self.packages.${pkgs.stdenv.hostPlatform.system}.default;
          meta.description = "Run mqtt-gateway with the environment's configuration";
        };
      });

      nixosModules = {
        # The default package is built with the system's own nixpkgs (its Rust, its libc), not
        # with this flake's pin, so the gateway shares the closure of the machine it runs on.
        mqtt-gateway =
          { lib, pkgs, ... }:
          {
            imports = [ ./nixos/module.nix ];
            services.mqtt-gateway.package = lib.mkDefault (pkgs.callPackage ./nixos/package.nix { });
          };
        default = self.nixosModules.mqtt-gateway;
      };

      checks = forAllSystems (
        pkgs:
        let
          package = self.packages.${pkgs.stdenv.hostPlatform.system}.default;
          # Every nixos/tests/<name>.nix is the check `vm-<name>`, one scenario per file: adding a
          # test is adding a file. Other files there (echo-server.py) are what the tests use.
          tests = lib.filterAttrs (file: type: type == "regular" && lib.hasSuffix ".nix" file) (
            builtins.readDir ./nixos/tests
          );
          vmTest =
            file: _:
            lib.nameValuePair "vm-${lib.removeSuffix ".nix" file}" (
              pkgs.testers.runNixOSTest {
                imports = [ ./nixos/tests/${file} ];
                defaults.imports = [ self.nixosModules.mqtt-gateway ];
              }
            );
        in
        lib.mapAttrs' vmTest tests
        // {
          inherit package;
          clippy = package.overrideAttrs (old: {
            pname = "mqtt-gateway-clippy";
            nativeBuildInputs = old.nativeBuildInputs ++ [ pkgs.clippy ];
            buildPhase = ''
              runHook preBuild
              cargo clippy --offline --workspace --all-targets -- -D warnings
              runHook postBuild
            '';
            doCheck = false;
            installPhase = "touch $out";
          });
        }
      );

      devShells = forAllSystems (pkgs: {
        default = pkgs.mkShell {
          packages = with pkgs; [
            cargo
            rustc
            clippy
            rustfmt
            rust-analyzer
            mariadb
            mosquitto
            # prometheus for the end-to-end tests, promtool (its `cli` output) for `cargo xtask rules`
            prometheus
            prometheus.cli
            nixfmt
            deadnix
          ];
        };
      });

      formatter = forAllSystems (pkgs: pkgs.nixfmt);
    };
}
