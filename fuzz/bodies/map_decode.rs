//! Fuzzes the map stream: framing (u32le + zstd/raw), JSON decoding of `MapResponse`, and
//! `NetworkMap::apply`. Decoded messages must re-encode to JSON that decodes to the same value.

use tern::control::framing::{encode_frame, Compression, MapFrameDecoder};
use tern::control::tailcfg::{GoTime, MapResponse};
use tern::netmap::NetworkMap;

const MAX_LEN: usize = 1 << 20;

/// At most this many `push`/`next_frame` rounds per input. Each round costs about the same
/// whatever its size, so 1-byte chunks over a 40 KB input (the full map seeds) made a run take
/// tens of thousands of rounds: most of the target's time went to `push`/`next_frame` calls
/// that found nothing new (`perf`). Small inputs still get the fuzzer's chunk size (1-64
/// bytes), so frame boundaries and length prefixes are still split at every position.
const MAX_ROUNDS: usize = 256;

fn check_and_apply(nm: &mut NetworkMap, resp: MapResponse) {
    let json = serde_json::to_vec(&resp).expect("re-encode");
    let again: MapResponse = serde_json::from_slice(&json).expect("decode own output");
    assert_eq!(again, resp, "JSON round trip changed the message");
    nm.apply_owned(resp, GoTime::from_unix(1_700_000_000));
    let _ = nm.packet_filter();
}

fn run_stream(bytes: &[u8], compression: Compression, chunk: usize) {
    let chunk = chunk.max(bytes.len().div_ceil(MAX_ROUNDS));
    let mut dec = MapFrameDecoder::with_max_len(compression, MAX_LEN);
    let mut nm = NetworkMap::new();
    for c in bytes.chunks(chunk) {
        dec.push(c);
        loop {
            match dec.next_frame() {
                Ok(Some(resp)) => check_and_apply(&mut nm, resp),
                Ok(None) => break,
                Err(_) => return,
            }
        }
    }
}

pub fn run(data: &[u8]) {
    let Some((&mode, data)) = data.split_first() else {
        return;
    };
    let chunk = (mode as usize >> 2) + 1;
    match mode % 4 {
        // Raw body bytes as the wire delivers them.
        0 => run_stream(data, Compression::Zstd, chunk),
        1 => run_stream(data, Compression::None, chunk),
        // The input is a JSON payload: frame it (zstd) so the fuzzer reaches JSON and apply.
        2 => {
            if let Ok(frame) = encode_frame(data, Compression::Zstd) {
                run_stream(&frame, Compression::Zstd, chunk);
            }
        }
        // Several JSON messages separated by 0xff, applied in sequence to one map.
        _ => {
            let mut wire = Vec::new();
            for msg in data.split(|&b| b == 0xff) {
                if let Ok(frame) = encode_frame(msg, Compression::None) {
                    wire.extend(frame);
                }
            }
            run_stream(&wire, Compression::None, chunk);
        }
    }
}
