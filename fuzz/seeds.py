"""Builds fuzz/seeds/<target>/ from tests/vectors (called by fuzz/seed.sh).

Every seed is named after the vector it came from. The structured targets' op sequences are
encoded here by hand; the byte layouts are documented in fuzz/bodies/{disco_parse,relay_packet}.rs.
"""
import json, os, shutil, struct, subprocess, sys

here, vectors = sys.argv[1], sys.argv[2]
SEEDS = os.path.join(here, "seeds")


def load(name):
    with open(os.path.join(vectors, name)) as f:
        return json.load(f)


def clean(name):
    keep = "".join(c if c.isalnum() or c in "-_" else "_" for c in name)
    return keep[:48]


class Dir:
    def __init__(self, target):
        self.path = os.path.join(SEEDS, target)
        shutil.rmtree(self.path, ignore_errors=True)
        os.makedirs(self.path)

    def put(self, name, data):
        with open(os.path.join(self.path, clean(name)), "wb") as f:
            f.write(data)


def zstd(data):
    return subprocess.run(["zstd", "-q", "-c", "-3"], input=data, stdout=subprocess.PIPE,
                          check=True).stdout


def hexes(items, key):
    return [(i.get("name") or str(n), bytes.fromhex(i[key])) for n, i in enumerate(items)
            if i.get(key) is not None]


# --- derp_frame: frames and ClientInfo/ServerInfo JSON --------------------------------------
derp = load("derp.json")
d = Dir("derp_frame")
for group in ["client_recv_vectors", "client_send_vectors", "derived_frame_vectors"]:
    for name, b in hexes(derp[group], "frame_hex"):
        d.put(group.split("_")[1] + "_" + name, b)
for group in ["client_info_unmarshal_vectors", "derived_json_vectors"]:
    for n, v in enumerate(derp[group]):
        d.put("json_" + (v.get("name") or str(n)), v["json"].encode())

# --- stun_parse ---------------------------------------------------------------------------
stun = load("stun.json")
d = Dir("stun_parse")
for group in ["parse_response_vectors", "is_vectors", "request_vectors", "response_vectors"]:
    for name, b in hexes(stun[group], "packet_hex"):
        d.put(group.split("_")[0] + "_" + name, b)

# --- map_decode (mode byte, then stream or JSON) --------------------------------------------
d = Dir("map_decode")
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
samples = load("control_json/samples.json")
health = samples.get("map_response_health", {})
if isinstance(health, dict) and "json" in health:
    small.append(health["json"].encode())
d.put("full_json", b"\x02" + full)
for i, m in enumerate(small):
    d.put("small_json_%d" % i, b"\x02" + m)
d.put("sequence", b"\x03" + b"\xff".join([full] + small))
stream = b"".join(struct.pack("<I", len(z)) + z for z in map(zstd, [full] + small))
d.put("zstd_stream", b"\x00" + stream)
raw = b"".join(struct.pack("<I", len(m)) + m for m in [full] + small)
d.put("raw_stream", b"\x01" + raw)

# --- noise_records (mode, chunk, bytes) -----------------------------------------------------
d = Dir("noise_records")
noise = load("noise.json")
for i, t in enumerate(noise["controlbase_transcripts"]):
    init = bytes.fromhex(t["initiation_message_hex"])
    resp = bytes.fromhex(t["response_message_hex"])
    c2s = b"".join(bytes.fromhex(r["record_hex"]) for r in t["records"]
                   if r["direction"] == "client->server")
    s2c = b"".join(bytes.fromhex(r["record_hex"]) for r in t["records"]
                   if r["direction"] == "server->client")
    d.put("raw_init_%d" % i, b"\x00\x40" + init)
    d.put("raw_resp_%d" % i, b"\x00\x40" + resp)
    d.put("raw_records_%d" % i, b"\x00\x07" + c2s + s2c)
    # Modes 3 and 4: the handshake with the transcript keys, then that direction's records.
    d.put("server_transcript_%d" % i, b"\x03\x05" + init + c2s)
    d.put("client_transcript_%d" % i,
          b"\x04\x05" + struct.pack(">H", t["protocol_version"]) + resp + s2c)
for f in noise["other_frames"]:
    d.put("raw_" + f["name"], b"\x00\x03" + bytes.fromhex(f.get("frame_hex") or f["plaintext_hex"]))
d.put("seal_small", b"\x01\x05\x03hello, world")
d.put("seal_big", b"\x01\xff\xf0" + bytes(range(256)) * 20)
d.put("tamper", b"\x02\x10\x33\x04abcdefgh\x02xy")

# --- disco_parse and relay_packet ---------------------------------------------------------
disco = load("disco.json")
geneve = load("geneve.json")
plaintexts = hexes(disco["marshal_vectors"], "plaintext_hex")
packets = (hexes(geneve["packet_looks_like_vectors"], "packet_hex")
           + hexes(geneve["wireguard_initiation_vectors"]["cases"], "packet_hex")
           + hexes(geneve["receive_ip_vectors"], "packet_hex")
           + [("geneve_" + n, b) for n, b in hexes(geneve["header_vectors"], "encoded_hex")]
           + [("stun_" + n, b) for n, b in hexes(stun["response_vectors"], "packet_hex")])

d = Dir("disco_parse")
# Mode 0 (even first byte): the pure codec and classifier checks on the bytes as they are.
for name, b in plaintexts:
    d.put("codec_plain_" + name, b"\x00" + b)
for name, b in packets:
    d.put("codec_packet_" + name, b"\x00" + b)

d = Dir("relay_packet")
for name, b in packets:
    d.put("raw_" + name, b)
