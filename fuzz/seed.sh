#!/bin/sh
# Builds seed corpora for the fuzz targets from the repository's vectors (tests/vectors) (corpus/ is not committed).
# Usage: fuzz/seed.sh   (run from anywhere; needs python3 and the zstd CLI)
set -eu
here=$(cd "$(dirname "$0")" && pwd)
vectors="$here/../tests/vectors"
python3 - "$here" "$vectors" <<'PY'
import json, os, struct, subprocess, sys
here, vectors = sys.argv[1], sys.argv[2]
md = os.path.join(here, "corpus", "map_decode")
nr = os.path.join(here, "corpus", "noise_records")
os.makedirs(md, exist_ok=True)
os.makedirs(nr, exist_ok=True)

def put(d, name, data):
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)

def zstd(data):
    return subprocess.run(["zstd", "-q", "-c", "-3"], input=data, stdout=subprocess.PIPE, check=True).stdout

cj = os.path.join(vectors, "control_json")
full = open(os.path.join(cj, "map_response.json"), "rb").read()
node = json.load(open(os.path.join(cj, "node.json")))
small = [
    b'{"KeepAlive":true}',
    json.dumps({"PeersChanged": [node]}).encode(),
    b'{"PeersRemoved":[1679275757477108]}',
    b'{"PeersChangedPatch":[{"NodeID":1679275757477108,"DERPRegion":900,"Endpoints":["1.2.3.4:5"],"Online":false}]}',
    b'{"OnlineChange":{"1679275757477108":true},"PeerSeenChange":{"1679275757477108":false}}',
    b'{"PacketFilters":{"*":null,"base":[{"SrcIPs":["*"]}]},"DERPMap":{"Regions":{}},"Health":[]}',
    b'{"DisplayMessages":{"*":null,"a":{"Title":"t"}},"CollectServices":true,"Domain":"x"}',
]
put(md, "full_json", b"\x02" + full)
for i, m in enumerate(small):
    put(md, "small_json_%d" % i, b"\x02" + m)
put(md, "sequence", b"\x03" + b"\xff".join([full] + small))
stream = b"".join(struct.pack("<I", len(z)) + z for z in map(zstd, [full] + small))
put(md, "zstd_stream", b"\x00" + stream)
raw = b"".join(struct.pack("<I", len(m)) + m for m in [full] + small)
put(md, "raw_stream", b"\x01" + raw)

noise = json.load(open(os.path.join(vectors, "noise.json")))
for i, t in enumerate(noise["controlbase_transcripts"]):
    put(nr, "init_%d" % i, b"\x00\x40" + bytes.fromhex(t["initiation_message_hex"]))
    put(nr, "resp_%d" % i, b"\x00\x40" + bytes.fromhex(t["response_message_hex"]))
    put(nr, "records_%d" % i, b"\x00\x07" + b"".join(bytes.fromhex(r["record_hex"]) for r in t["records"]))
for f in noise["other_frames"]:
    put(nr, f["name"].replace(" ", "_")[:20], b"\x00\x03" + bytes.fromhex(f.get("frame_hex") or f["plaintext_hex"]))
put(nr, "seal_small", b"\x01\x05\x03hello, world")
put(nr, "seal_big", b"\x01\xff\xf0" + bytes(range(256)) * 20)
put(nr, "tamper", b"\x02\x10\x33\x04abcdefgh\x02xy")
PY
echo "seeded $here/corpus"
