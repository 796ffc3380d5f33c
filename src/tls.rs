//! TLS: one crypto provider (ring) for the whole process, shared by the HTTP client and the
//! broker connection, chosen here so no C toolchain beyond a C compiler is needed to build.

/// Installs ring as the process-wide rustls provider. Safe to call more than once.
pub fn install_crypto_provider() {
    // Err only means a provider is already installed, which is what we want.
    let _ = rustls::crypto::ring::default_provider().install_default();
}
