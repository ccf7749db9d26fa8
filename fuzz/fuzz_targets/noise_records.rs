//! Fuzzes the ts2021 record layer and the handshake/early-payload parsers.
//!
//! Mode 0 feeds raw bytes to a `RecordOpener` (and the handshake parsers). Mode 1 seals the input
//! as plaintext, then delivers the records in fuzzer-chosen chunks and checks the plaintext comes
//! back. Mode 2 seals, flips one fuzzer-chosen byte and checks the opener rejects it (or, if the
//! flip hit nothing, returns the original).
#![no_main]

use libfuzzer_sys::fuzz_target;
use tern::control::noise::{
    handshake_answer_len, parse_early_payload, parse_error_frame, Initiator, RecordOpener,
    RecordSealer, Responder,
};
use tern::keys::MachinePrivate;

const KEY: [u8; 32] = [7; 32];

fn drain(opener: &mut RecordOpener, out: &mut Vec<u8>) -> bool {
    loop {
        match opener.next_plaintext() {
            Ok(Some(p)) => {
                assert!(!p.is_empty(), "zero-length records must be skipped");
                out.extend_from_slice(&p);
            }
            Ok(None) => return true,
            Err(_) => return false,
        }
    }
}

fn raw_bytes(data: &[u8], chunk: usize) {
    let mut opener = RecordOpener::new(&KEY);
    let mut out = Vec::new();
    for c in data.chunks(chunk) {
        opener.push(c);
        if !drain(&mut opener, &mut out) {
            assert!(opener.next_plaintext().is_err(), "errors must poison");
            break;
        }
    }
    let _ = parse_early_payload(data);
    let _ = parse_error_frame(data);
    if let [a, b, c, ..] = *data {
        let _ = handshake_answer_len([a, b, c]);
    }
    let server = MachinePrivate::from_bytes([9; 32]);
    let _ = Responder::accept(&server, data);
    if let Ok((initiator, _)) = Initiator::start_with_ephemeral(
        &MachinePrivate::from_bytes([3; 32]),
        &server.public(),
        130,
        [4; 32],
    ) {
        let _ = initiator.finish(data);
    }
}

fn sealed(data: &[u8]) -> Vec<u8> {
    let mut sealer = RecordSealer::new(&KEY);
    let mut wire = Vec::new();
    // Vary record sizes: the first byte of each piece says how much plaintext goes in a record.
    let mut rest = data;
    while let Some((&n, tail)) = rest.split_first() {
        let take = (n as usize * 17).min(tail.len());
        sealer
            .seal_into(&tail[..take], &mut wire)
            .expect("seal within limits");
        if take == 0 {
            sealer
                .seal_record_into(&[], &mut wire)
                .expect("empty record");
        }
        rest = &tail[take..];
    }
    wire
}

fn plaintext_of(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut rest = data;
    while let Some((&n, tail)) = rest.split_first() {
        let take = (n as usize * 17).min(tail.len());
        out.extend_from_slice(&tail[..take]);
        rest = &tail[take..];
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, data)) = data.split_first() else {
        return;
    };
    let Some((&chunk, data)) = data.split_first() else {
        return;
    };
    let chunk = chunk as usize + 1;
    match mode % 3 {
        0 => raw_bytes(data, chunk),
        1 => {
            let wire = sealed(data);
            let mut opener = RecordOpener::new(&KEY);
            let mut out = Vec::new();
            for c in wire.chunks(chunk) {
                opener.push(c);
                assert!(drain(&mut opener, &mut out), "valid records must open");
            }
            assert_eq!(out, plaintext_of(data));
            assert_eq!(opener.buffered(), 0);
        }
        _ => {
            let Some((&pos, data)) = data.split_first() else {
                return;
            };
            let mut wire = sealed(data);
            if wire.is_empty() {
                return;
            }
            let idx = (pos as usize * 31 + chunk) % wire.len();
            wire[idx] ^= 1 << (pos % 8);
            let mut opener = RecordOpener::new(&KEY);
            let mut out = Vec::new();
            let mut ok = true;
            for c in wire.chunks(chunk) {
                opener.push(c);
                if !drain(&mut opener, &mut out) {
                    ok = false;
                    break;
                }
            }
            // A flipped length byte may leave a record incomplete; otherwise the change is caught.
            if ok {
                assert!(opener.buffered() > 0, "tampered record accepted");
            }
        }
    }
});
