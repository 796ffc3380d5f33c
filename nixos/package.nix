# The gateway as a Nix package. Only the unit tests run in the build sandbox: the end-to-end
# tests start MariaDB and Mosquitto, which the NixOS VM tests cover instead.
{
  lib,
  rustPlatform,
  rustc,
}:
let
  fs = lib.fileset;
  root = ../.;
  manifest = (lib.importTOML ../Cargo.toml).package;
in
# Cargo.toml's rust-version is the oldest compiler the dependencies accept; a nixpkgs whose
# rustc is older fails here, at evaluation, instead of deep inside a crate's build.
assert lib.assertMsg (lib.versionAtLeast rustc.version manifest.rust-version)
  "mqtt-gateway needs rustc >= ${manifest.rust-version} (Cargo.toml rust-version); this nixpkgs has ${rustc.version}";
rustPlatform.buildRustPackage {
  pname = "mqtt-gateway";
  inherit (manifest) version;

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

  # The alerting and recording rules, for a Prometheus on this host or another: the NixOS
  # module's `prometheus.addRules` adds this file to `services.prometheus.ruleFiles`.
  postInstall = ''
    install -D -m 0644 ${../monitoring/mqtt-gateway.rules.yml} $out/share/mqtt-gateway/prometheus/mqtt-gateway.rules.yml
  '';

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
