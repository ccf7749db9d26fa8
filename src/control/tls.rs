//! TLS towards control, with Go's two rules: `GET /key` over HTTPS verifies the certificate against
//! the system's roots (plus Let's Encrypt's roots, as Go bakes them in), while `/ts2021` over TLS
//! only logs a verification failure, because the Noise handshake inside authenticates the server
//! by its Noise key. The system roots come from `rustls-native-certs`, which honours
//! `SSL_CERT_FILE` and `SSL_CERT_DIR`: that is how a self-hosted CA is trusted.

use std::sync::{Arc, OnceLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};

/// The roots every HTTPS control connection trusts: the system's, then Let's Encrypt's.
pub fn root_store() -> Arc<RootCertStore> {
    static ROOTS: OnceLock<Arc<RootCertStore>> = OnceLock::new();
    ROOTS.get_or_init(load_roots).clone()
}

fn load_roots() -> Arc<RootCertStore> {
    let mut roots = RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    for err in &native.errors {
        tracing::warn!(error = %err, "reading the system's CA certificates");
    }
    let (added, ignored) = roots.add_parsable_certificates(native.certs);
    if ignored > 0 {
        tracing::debug!(ignored, "system CA certificates that did not parse");
    }
    // Go falls back to its baked-in Let's Encrypt roots when the system has none that work.
    roots.extend(
        webpki_roots::TLS_SERVER_ROOTS
            .iter()
            .filter(|anchor| is_lets_encrypt(anchor.subject.as_ref()))
            .cloned(),
    );
    tracing::debug!(system = added, total = roots.len(), "CA roots for control");
    Arc::new(roots)
}

/// Whether a DER-encoded subject names ISRG (the Let's Encrypt roots).
fn is_lets_encrypt(subject: &[u8]) -> bool {
    subject.windows(4).any(|w| w == b"ISRG")
}

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

/// What to tell a person whose control certificate was refused, from rustls's error text.
pub fn certificate_hint(error_text: &str) -> Option<&'static str> {
    if error_text.contains("UnknownIssuer") {
        Some("the certificate's issuer is not trusted here; for a private CA, point SSL_CERT_FILE at its PEM file")
    } else if error_text.contains("Expired") {
        Some("the certificate has expired (or this machine's clock is wrong)")
    } else if error_text.contains("NotValidYet") {
        Some("the certificate is not valid yet (or this machine's clock is wrong)")
    } else if error_text.contains("NotValidForName") {
        Some("the certificate is for another host name than the control URL's")
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lets_encrypt_roots_are_always_trusted() {
        let roots = load_roots();
        let isrg = webpki_roots::TLS_SERVER_ROOTS
            .iter()
            .filter(|a| is_lets_encrypt(a.subject.as_ref()))
            .count();
        assert!(isrg >= 2, "ISRG Root X1 and X2 are in webpki-roots");
        assert!(roots.len() >= isrg);
    }

    #[test]
    fn certificate_problems_get_a_hint() {
        let hint = |t| certificate_hint(t).unwrap_or_default();
        assert!(hint("invalid peer certificate: UnknownIssuer").contains("SSL_CERT_FILE"));
        assert!(hint("invalid peer certificate: Expired").contains("expired"));
        assert!(hint("NotValidForName { .. }").contains("host name"));
        assert_eq!(certificate_hint("connection reset"), None);
    }
}
