//! Two WireGuard peer tables, 100.64.0.1 (A) and 100.64.0.2 (B), with a session established
//! (A initiated): shared by the benches that encrypt and decrypt.

use std::time::Instant;

use tern::keys::NodePrivate;
use tern::wg::{WgOutput, WgPeers};

/// (A, B) after a handshake.
pub fn established_pair() -> (WgPeers, WgPeers) {
    let (ka, kb) = (NodePrivate::generate(), NodePrivate::generate());
    let mut a = WgPeers::new(ka.clone());
    let mut b = WgPeers::new(kb.clone());
    a.upsert(kb.public(), &["100.64.0.2/32".parse().unwrap()])
        .unwrap();
    b.upsert(ka.public(), &["100.64.0.1/32".parse().unwrap()])
        .unwrap();
    let now = Instant::now();
    let (mut out, mut out2) = (vec![0u8; 2048], vec![0u8; 2048]);
    let (_, WgOutput::ToNetwork(n)) = a.encapsulate(now, &probe(), &mut out) else {
        panic!("no initiation")
    };
    let (_, WgOutput::ToNetwork(n)) = b.decapsulate(now, &out[..n], &mut out2) else {
        panic!("no response")
    };
    let (_, WgOutput::ToNetwork(_)) = a.decapsulate(now, &out2[..n], &mut out) else {
        panic!("no keepalive")
    };
    (a, b)
}

/// A 28-byte IPv4/UDP packet A → B that starts the handshake.
fn probe() -> Vec<u8> {
    let mut p = vec![0u8; 28];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&28u16.to_be_bytes());
    p[9] = 17;
    p[12..16].copy_from_slice(&[100, 64, 0, 1]);
    p[16..20].copy_from_slice(&[100, 64, 0, 2]);
    p
}
