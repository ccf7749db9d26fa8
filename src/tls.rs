//! The one rustls crypto provider every TLS connection of tern uses (control and DERP, client and
//! server): ring's, with the cipher suites in Go's order. rustls's own order puts AES-256-GCM
//! first; Go (and so every Tailscale node) prefers AES-128-GCM where the CPU has AES and
//! carry-less multiply instructions, and ChaCha20-Poly1305 where it does not (a Raspberry Pi 4 has
//! neither, and AES in software is several times slower there). The DERP path spends a large share
//! of its CPU in TLS record crypto, so the suite matters; it protects WireGuard packets that are
//! already encrypted end to end, so 128-bit AES is no loss.

use std::sync::{Arc, OnceLock};

use rustls::crypto::CryptoProvider;
use rustls::{CipherSuite, SupportedCipherSuite};

/// The provider for every rustls configuration tern builds (made once per process).
pub fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| Arc::new(provider_for(aes_in_hardware())))
        .clone()
}

/// ring's provider with its suites reordered for a CPU with (or without) AES-GCM instructions.
fn provider_for(aes_hardware: bool) -> CryptoProvider {
    let mut provider = rustls::crypto::ring::default_provider();
    provider
        .cipher_suites
        .sort_by_key(|suite| preference(suite, aes_hardware));
    provider
}

/// Sort key: TLS 1.3 suites before TLS 1.2 ones, then Go's order of the AEADs.
fn preference(suite: &SupportedCipherSuite, aes_hardware: bool) -> (u8, u8) {
    let version = match suite {
        SupportedCipherSuite::Tls13(_) => 0,
        _ => 1,
    };
    let aead = match (aead_of(suite.suite()), aes_hardware) {
        (Aead::Aes128Gcm, true) | (Aead::ChaCha20Poly1305, false) => 0,
        (Aead::Aes256Gcm, true) | (Aead::Aes128Gcm, false) => 1,
        (Aead::ChaCha20Poly1305, true) | (Aead::Aes256Gcm, false) => 2,
        (Aead::Other, _) => 3,
    };
    (version, aead)
}

#[derive(Debug, PartialEq)]
enum Aead {
    Aes128Gcm,
    Aes256Gcm,
    ChaCha20Poly1305,
    Other,
}

fn aead_of(suite: CipherSuite) -> Aead {
    match suite {
        CipherSuite::TLS13_AES_128_GCM_SHA256
        | CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
        | CipherSuite::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256 => Aead::Aes128Gcm,
        CipherSuite::TLS13_AES_256_GCM_SHA384
        | CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384
        | CipherSuite::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384 => Aead::Aes256Gcm,
        CipherSuite::TLS13_CHACHA20_POLY1305_SHA256
        | CipherSuite::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256
        | CipherSuite::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256 => Aead::ChaCha20Poly1305,
        _ => Aead::Other,
    }
}

/// Whether this CPU has the instructions AES-GCM needs to be fast (Go's test, too).
fn aes_in_hardware() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("aes")
            && std::arch::is_x86_feature_detected!("pclmulqdq")
    }
    #[cfg(target_arch = "aarch64")]
    {
        std::arch::is_aarch64_feature_detected!("aes")
            && std::arch::is_aarch64_feature_detected!("pmull")
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn suites(provider: &CryptoProvider) -> Vec<CipherSuite> {
        provider.cipher_suites.iter().map(|s| s.suite()).collect()
    }

    #[test]
    fn with_aes_hardware_the_order_is_gos_aes_128_first() {
        let order = suites(&provider_for(true));
        assert_eq!(
            order[..3],
            [
                CipherSuite::TLS13_AES_128_GCM_SHA256,
                CipherSuite::TLS13_AES_256_GCM_SHA384,
                CipherSuite::TLS13_CHACHA20_POLY1305_SHA256,
            ]
        );
        // TLS 1.2 suites follow, AES-128-GCM first there too.
        assert_eq!(aead_of(order[3]), Aead::Aes128Gcm, "{order:?}");
    }

    #[test]
    fn without_aes_hardware_chacha20_comes_first() {
        let order = suites(&provider_for(false));
        assert_eq!(
            order[..3],
            [
                CipherSuite::TLS13_CHACHA20_POLY1305_SHA256,
                CipherSuite::TLS13_AES_128_GCM_SHA256,
                CipherSuite::TLS13_AES_256_GCM_SHA384,
            ]
        );
        assert_eq!(aead_of(order[3]), Aead::ChaCha20Poly1305, "{order:?}");
    }

    #[test]
    fn reordering_keeps_every_suite_of_ring() {
        let mut ours = suites(&provider_for(true));
        let mut ring = suites(&rustls::crypto::ring::default_provider());
        assert_eq!(ours.len(), ring.len());
        ours.sort_by_key(|s| u16::from(*s));
        ring.sort_by_key(|s| u16::from(*s));
        assert_eq!(ours, ring);
    }
}
