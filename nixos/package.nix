# The gateway as a Nix package. Only the unit tests run in the build sandbox: the end-to-end
# tests start MariaDB and Mosquitto, which the NixOS VM tests cover instead.
{ lib, rustPlatform }:
let
  fs = lib.fileset;
  root = ../.;
in
rustPlatform.buildRustPackage {
  pname = "mqtt-gateway";
  version = (lib.importTOML ../Cargo.toml).package.version;

  # What cargo needs to resolve the workspace and build; not the docs, CI or Nix files, so
  # editing those does not rebuild the package.
  src = fs.toSource {
    inherit root;
    fileset = fs.unions [
      ../Cargo.toml
      ../Cargo.lock
      ../rustfmt.toml
      ../src
      ../migrations
      ../benches
      ../tests
      ../xtask
    ];
  };

  cargoLock.lockFile = ../Cargo.lock;

  cargoBuildFlags = [
    "--package"
    "mqtt-gateway"
  ];
  cargoTestFlags = [
    "--package"
    "mqtt-gateway"
    "--lib"
    "--bins"
  ];

  meta = {
    description = "Takes MQTT messages off a broker and stores them in MariaDB or POSTs them, per flow";
    license = lib.licenses.mit;
    mainProgram = "mqtt-gateway";
    platforms = lib.platforms.linux;
  };
}
