//! TLS: one crypto provider (ring) for the whole process, shared by the HTTP client and the
//! broker connection, and the broker connection's client configuration.

use crate::config::TlsSettings;
use anyhow::{bail, Context};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore};
use std::sync::Arc;

/// Installs ring as the process-wide rustls provider. Safe to call more than once.
pub fn install_crypto_provider() {
    // Err only means a provider is already installed, which is what we want.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// The broker connection's TLS: trusted roots from `MQTT_CA_FILE` (else the system's), a
/// client certificate for mutual TLS when given, and the server's name always verified.
pub fn broker_config(settings: &TlsSettings) -> anyhow::Result<ClientConfig> {
    let mut roots = RootCertStore::empty();
    match &settings.ca_file {
        Some(path) => {
            let certs = CertificateDer::pem_file_iter(path)
                .with_context(|| format!("cannot read MQTT_CA_FILE {}", path.display()))?;
            for cert in certs {
                let cert = cert.with_context(|| format!("invalid certificate in {}", path.display()))?;
                roots.add(cert).with_context(|| format!("unusable CA certificate in {}", path.display()))?;
            }
            if roots.is_empty() {
                bail!("MQTT_CA_FILE {} holds no certificate", path.display());
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            for cert in found.certs {
                let _ = roots.add(cert);
            }
            if roots.is_empty() {
                bail!("no system CA certificates found; set MQTT_CA_FILE");
            }
        }
    }
    let builder = ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_root_certificates(roots);
    let config = match &settings.client_auth {
        None => builder.with_no_client_auth(),
        Some((cert_path, key_path)) => {
            let chain = CertificateDer::pem_file_iter(cert_path)
                .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
                .with_context(|| format!("cannot read MQTT_CLIENT_CERT {}", cert_path.display()))?;
            let key = PrivateKeyDer::from_pem_file(key_path)
                .with_context(|| format!("cannot read MQTT_CLIENT_KEY {}", key_path.display()))?;
            builder
                .with_client_auth_cert(chain, key)
                .context("MQTT_CLIENT_CERT and MQTT_CLIENT_KEY do not make a usable pair")?
        }
    };
    Ok(config)
}

/// What an operator should check, for the handshake failures that have a usual cause.
pub fn explain(error_text: &str) -> Option<&'static str> {
    let hints = [
        (
            "UnknownIssuer",
            "the broker's certificate is not signed by a CA in MQTT_CA_FILE (or the system's roots)",
        ),
        ("NotValidForName", "the broker's certificate is not valid for the host name in mqtt_servers.host"),
        (
            "not valid for name",
            "the broker's certificate is not valid for the host name in mqtt_servers.host",
        ),
        ("Expired", "the broker's certificate has expired (or this machine's clock is wrong)"),
        ("certificate expired", "the broker's certificate has expired (or this machine's clock is wrong)"),
        ("NotValidYet", "the broker's certificate is not valid yet (or this machine's clock is wrong)"),
        (
            "CertificateRequired",
            "the broker requires a client certificate: set MQTT_CLIENT_CERT and MQTT_CLIENT_KEY",
        ),
        ("UnknownCA", "the broker does not trust the client certificate (MQTT_CLIENT_CERT)"),
        ("corrupt message", "the broker did not answer with TLS: is this port a TLS listener?"),
        ("InvalidContentType", "the broker did not answer with TLS: is this port a TLS listener?"),
    ];
    hints.iter().find(|(needle, _)| error_text.contains(needle)).map(|(_, hint)| *hint)
}
