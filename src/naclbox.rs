//! NaCl `crypto_box` (X25519 + XSalsa20-Poly1305) as Tailscale uses it.
//!
//! Sealed form: `nonce[24] || tag[16] || ciphertext`, with a fresh random nonce per message.
//! Used by the DERP handshake (ClientInfo/ServerInfo) and by disco.
//! Keys are raw 32-byte X25519 keys so that node keys and disco keys can both use it.

use crypto_box::aead::generic_array::GenericArray;
use crypto_box::aead::Aead;
use crypto_box::{PublicKey, SalsaBox, SecretKey};
use rand::RngCore;

/// Length of the random nonce prefix.
pub const NONCE_LEN: usize = 24;
/// Length of the Poly1305 tag.
pub const TAG_LEN: usize = 16;
/// Bytes a sealed message has beyond its plaintext.
pub const OVERHEAD: usize = NONCE_LEN + TAG_LEN;

/// Why a box could not be opened.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BoxError {
    /// Shorter than nonce + tag.
    #[error("sealed box too short ({0} bytes, need at least {OVERHEAD})")]
    TooShort(usize),
    /// Authentication failed: wrong keys or corrupted bytes.
    #[error("sealed box failed authentication")]
    Auth,
}

/// A precomputed box between one private and one public key (Go `box.Precompute`).
///
/// Sealing and opening use the same shared key in both directions. Cloning shares the
/// precomputed key (`SalsaBox` itself is not `Clone`) instead of redoing the X25519.
#[derive(Clone)]
pub struct SharedBox(std::sync::Arc<SalsaBox>);

impl std::fmt::Debug for SharedBox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SharedBox(<redacted>)")
    }
}

impl SharedBox {
    /// Precomputes the box key for `my_private` and `their_public`.
    pub fn new(my_private: &[u8; 32], their_public: &[u8; 32]) -> Self {
        let secret = SecretKey::from(*my_private);
        let public = PublicKey::from(*their_public);
        SharedBox(std::sync::Arc::new(SalsaBox::new(&public, &secret)))
    }

    /// Seals `plaintext` with a fresh random nonce: `nonce || tag || ciphertext`.
    pub fn seal(&self, plaintext: &[u8]) -> Vec<u8> {
        let mut nonce = [0u8; NONCE_LEN];
        rand::rngs::OsRng.fill_bytes(&mut nonce);
        self.seal_with_nonce(&nonce, plaintext)
    }

    /// Seals with a caller-chosen nonce (tests only need this; never reuse a nonce).
    pub fn seal_with_nonce(&self, nonce: &[u8; NONCE_LEN], plaintext: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(OVERHEAD + plaintext.len());
        out.extend_from_slice(nonce);
        // XSalsa20-Poly1305 in crypto_box emits tag || ciphertext (the NaCl layout);
        // encryption of an in-memory buffer cannot fail.
        let sealed = self
            .0
            .encrypt(GenericArray::from_slice(nonce), plaintext)
            .unwrap_or_default();
        out.extend_from_slice(&sealed);
        out
    }

    /// Opens `nonce || tag || ciphertext`.
    pub fn open(&self, sealed: &[u8]) -> Result<Vec<u8>, BoxError> {
        if sealed.len() < OVERHEAD {
            return Err(BoxError::TooShort(sealed.len()));
        }
        let (nonce, rest) = sealed.split_at(NONCE_LEN);
        self.0
            .decrypt(GenericArray::from_slice(nonce), rest)
            .map_err(|_| BoxError::Auth)
    }
}

/// Seals `plaintext` to `their_public` from `my_private`.
pub fn seal(my_private: &[u8; 32], their_public: &[u8; 32], plaintext: &[u8]) -> Vec<u8> {
    SharedBox::new(my_private, their_public).seal(plaintext)
}

/// Opens a box sealed to `my_private` by `their_public`.
pub fn open(
    my_private: &[u8; 32],
    their_public: &[u8; 32],
    sealed: &[u8],
) -> Result<Vec<u8>, BoxError> {
    SharedBox::new(my_private, their_public).open(sealed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::NodePrivate;

    #[test]
    fn round_trip_between_two_keys() {
        let a = NodePrivate::generate();
        let b = NodePrivate::generate();
        let sealed = seal(a.as_bytes(), b.public().as_bytes(), b"hello");
        assert_eq!(sealed.len(), 5 + OVERHEAD);
        let opened = open(b.as_bytes(), a.public().as_bytes(), &sealed).unwrap();
        assert_eq!(opened, b"hello");
    }

    #[test]
    fn tampering_and_wrong_key_fail() {
        let a = NodePrivate::generate();
        let b = NodePrivate::generate();
        let c = NodePrivate::generate();
        let mut sealed = seal(a.as_bytes(), b.public().as_bytes(), b"hello");
        assert_eq!(
            open(c.as_bytes(), a.public().as_bytes(), &sealed),
            Err(BoxError::Auth)
        );
        let last = sealed.len() - 1;
        sealed[last] ^= 1;
        assert_eq!(
            open(b.as_bytes(), a.public().as_bytes(), &sealed),
            Err(BoxError::Auth)
        );
        assert_eq!(
            open(b.as_bytes(), a.public().as_bytes(), &sealed[..39]),
            Err(BoxError::TooShort(39))
        );
    }

    /// libsodium's published crypto_box test (Bernstein's "box.c" vector): proves the layout
    /// is tag-then-ciphertext with XSalsa20 as NaCl and Go's nacl/box produce it.
    #[test]
    fn nacl_known_answer() {
        let alice_sk = hex32("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a");
        let bob_pk = hex32("de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f");
        let nonce: [u8; 24] = hex::decode("69696ee955b62b73cd62bda875fc73d68219e0036b7a0b37")
            .unwrap()
            .try_into()
            .unwrap();
        let msg = hex::decode(
            "be075fc53c81f2d5cf141316ebeb0c7b5228c52a4c62cbd44b66849b64244ffce5ecbaaf33bd751a1ac728d45e6c61296cdc3c01233561f41db66cce314adb310e3be8250c46f06dceea3a7fa1348057e2f6556ad6b1318a024a838f21af1fde048977eb48f59ffd4924ca1c60902e52f0a089bc76897040e082f937763848645e0705",
        )
        .unwrap();
        let sealed = SharedBox::new(&alice_sk, &bob_pk).seal_with_nonce(&nonce, &msg);
        let want_tag = "f3ffc7703f9400e52a7dfb4b3d3305d9";
        assert_eq!(hex::encode(&sealed[24..40]), want_tag);
        assert_eq!(hex::encode(&sealed[40..44]), "8e993b9f");
    }

    fn hex32(s: &str) -> [u8; 32] {
        hex::decode(s).unwrap().try_into().unwrap()
    }
}
