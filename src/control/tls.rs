//! TLS towards control, with Go's two rules: `GET /key` over HTTPS verifies the certificate against
//! the system's roots (plus Let's Encrypt's roots, as Go bakes them in), while `/ts2021` over TLS
//! only logs a verification failure, because the Noise handshake inside authenticates the server
//! by its Noise key. The roots are [`crate::trust`]'s.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};

pub use crate::trust::{certificate_hint, root_store};

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The client configuration for `GET /key` over HTTPS: certificates verified, no exceptions.
pub fn verifying_config(roots: Arc<RootCertStore>) -> Result<Arc<ClientConfig>, rustls::Error> {
    let config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// The client configuration for `/ts2021` over TLS: a certificate that does not verify is
/// logged and accepted (Go does the same: the Noise handshake is what authenticates control).
/// No ALPN, so the server speaks HTTP/1.1 for the upgrade.
pub fn noise_config(roots: Arc<RootCertStore>) -> Result<Arc<ClientConfig>, rustls::Error> {
    let inner = WebPkiServerVerifier::builder_with_provider(roots, provider())
        .build()
        .map_err(|e| rustls::Error::General(e.to_string()))?;
    let config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(LogOnlyVerifier { inner }))
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// Verifies like WebPKI, but only logs a failed chain check.
#[derive(Debug)]
struct LogOnlyVerifier {
    inner: Arc<WebPkiServerVerifier>,
}

impl ServerCertVerifier for LogOnlyVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if let Err(e) =
            self.inner
                .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            tracing::info!(
                server = ?server_name,
                error = %e,
                "control's TLS certificate does not verify; going on (Noise authenticates control)"
            );
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}
