//! The trust store for every TLS connection tern verifies (control's `/key`, DERP servers): the
//! system's CA certificates through `rustls-native-certs`, which honours `SSL_CERT_FILE` and
//! `SSL_CERT_DIR` (that is how a self-hosted CA is trusted), plus Let's Encrypt's roots, which Go
//! bakes in as its fallback.

use std::sync::{Arc, OnceLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};

/// The roots tern trusts: the system's, then Let's Encrypt's (read once per process).
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

/// WebPKI chain verification against `roots`, with the two twists tern needs: check the chain
/// for another name than the one dialed (a DERP map's `CertName`), or only log a failure (TLS
/// under ts2021, where Noise authenticates control).
#[derive(Debug)]
pub struct WebPkiWrapper {
    inner: Arc<rustls::client::WebPkiServerVerifier>,
    /// The name the certificate must carry; `None` = the name dialed.
    expected: Option<ServerName<'static>>,
    /// Accept a certificate that does not verify (after logging why).
    log_only: bool,
}

impl WebPkiWrapper {
    pub fn new(
        roots: Arc<RootCertStore>,
        expected: Option<ServerName<'static>>,
        log_only: bool,
    ) -> Result<Self, rustls::Error> {
        let provider = crate::tls::provider();
        let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(roots, provider)
            .build()
            .map_err(|e| rustls::Error::General(e.to_string()))?;
        Ok(Self {
            inner,
            expected,
            log_only,
        })
    }
}

impl ServerCertVerifier for WebPkiWrapper {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let name = self.expected.as_ref().unwrap_or(server_name);
        let verified = self
            .inner
            .verify_server_cert(end_entity, intermediates, name, ocsp, now);
        match verified {
            Err(e) if self.log_only => {
                tracing::info!(server = ?server_name, error = %e, "TLS certificate does not verify; going on (the protocol inside authenticates the server)");
                Ok(ServerCertVerified::assertion())
            }
            other => other,
        }
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

/// What to tell a person whose server certificate was refused, from rustls's error text.
pub fn certificate_hint(error_text: &str) -> Option<&'static str> {
    // rustls writes some problems as their Debug names, others as sentences.
    let has = |needles: &[&str]| needles.iter().any(|n| error_text.contains(n));
    if has(&["UnknownIssuer"]) {
        Some("the certificate's issuer is not trusted here; for a private CA, point SSL_CERT_FILE at its PEM file")
    } else if has(&["Expired", "certificate expired"]) {
        Some("the certificate has expired (or this machine's clock is wrong)")
    } else if has(&["NotValidYet", "certificate not valid yet"]) {
        Some("the certificate is not valid yet (or this machine's clock is wrong)")
    } else if has(&["NotValidForName", "not valid for name"]) {
        Some("the certificate is for another host name than the one dialed")
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
        assert!(
            hint("certificate not valid for name \"x\"; certificate is only valid for y")
                .contains("host name")
        );
        assert!(hint("certificate expired: verification time 5 (UNIX)").contains("expired"));
        assert_eq!(certificate_hint("connection reset"), None);
    }
}
