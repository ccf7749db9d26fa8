//! TLS towards control, with Go's two rules: `GET /key` over HTTPS verifies the certificate against
//! the system's roots (plus Let's Encrypt's roots, as Go bakes them in), while `/ts2021` over TLS
//! only logs a verification failure, because the Noise handshake inside authenticates the server
//! by its Noise key. The roots are [`crate::trust`]'s.

use std::sync::Arc;

use rustls::{ClientConfig, RootCertStore};

use crate::trust::WebPkiWrapper;
pub use crate::trust::{certificate_hint, root_store};

/// The client configuration for `GET /key` over HTTPS: certificates verified, no exceptions.
pub fn verifying_config(roots: Arc<RootCertStore>) -> Result<Arc<ClientConfig>, rustls::Error> {
    let config = ClientConfig::builder_with_provider(crate::tls::provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// The client configuration for `/ts2021` over TLS: a certificate that does not verify is
/// logged and accepted (Go does the same: the Noise handshake is what authenticates control).
/// No ALPN, so the server speaks HTTP/1.1 for the upgrade.
pub fn noise_config(roots: Arc<RootCertStore>) -> Result<Arc<ClientConfig>, rustls::Error> {
    let verifier = WebPkiWrapper::new(roots, None, true)?;
    let config = ClientConfig::builder_with_provider(crate::tls::provider())
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    Ok(Arc::new(config))
}
