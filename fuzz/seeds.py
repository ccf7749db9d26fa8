"""Builds fuzz/seeds/<target>/ from tests/vectors (called by fuzz/seed.sh).

Every seed is named after the vector it came from. The structured targets' op sequences are
encoded here by hand; the byte layouts are documented in fuzz/bodies/{disco_ops,relay_packet,relay_client,
localapi_request,proxy_request}.rs;
tun_offload's frames are built here from hand-made headers.
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

# --- structured op sequences (layouts in bodies/relay_packet.rs and bodies/disco_ops.rs) -----
def u16(n):
    return struct.pack(">H", n)


def u32(n):
    return struct.pack(">I", n)


def lv(b):
    return u16(len(b)) + b


# relay_packet ops: 0 allocate(sel, gen) 1 bind(c, slot, vni, gen, flags)
# 2 answer(c, slot, which, pos, flip) 3 plaintext(c, slot, vni, lv) 4 raw(slot, shape, vni, lv)
# 5 data(slot, vni, len) 6 advance(u16 x 10 ms) 7 expire
ALLOC_01 = b"\x00\x04" + u32(1)         # clients 0 and 1


def bind(c, slot, gen, flags=0):
    return bytes([1, c, slot, 0]) + u32(gen) + bytes([flags])


def answer(c, slot, which, pos=0, flip=0):
    return bytes([2, c, slot, which, pos, flip])


def data(slot, n):
    return bytes([5, slot, 0, n])


def advance(ms):
    return b"\x06" + u16(ms // 10)


handshake = (ALLOC_01 + bind(0, 0, 7) + answer(0, 0, 0) + bind(1, 1, 9) + answer(1, 1, 1)
             + data(0, 100) + data(1, 60) + data(2, 10))
d.put("ops_handshake_and_forward", handshake + advance(20_000) + b"\x07" + data(0, 1)
      + advance(301_000) + b"\x07")
d.put("ops_wrong_cookie", ALLOC_01 + bind(0, 0, 7) + answer(0, 0, 0, 5, 0x01) + data(0, 8))
d.put("ops_answer_from_elsewhere", ALLOC_01 + bind(0, 0, 7) + answer(0, 2, 0) + data(2, 8))
d.put("ops_half_bound", ALLOC_01 + bind(0, 0, 7) + answer(0, 0, 0) + data(0, 8) + data(1, 8))
d.put("ops_bind_trailing_bytes", ALLOC_01 + bind(0, 0, 7, 0x30) + bind(1, 1, 0) + bind(0, 0, 3, 1))
d.put("ops_mac_rotation", ALLOC_01 + bind(0, 0, 7) + advance(130_000) + answer(0, 0, 0)
      + bind(1, 1, 9) + advance(250_000) + answer(1, 1, 1) + b"\x07")
d.put("ops_replayed_answer", ALLOC_01 + bind(0, 0, 7) + answer(0, 0, 0) + answer(0, 0, 0)
      + answer(0, 3, 0))
d.put("ops_allocations", b"\x00\x04" + u32(1) + b"\x00\x01" + u32(2) + b"\x00\x08" + u32(3)
      + b"\x00\x0c" + u32(4) + b"\x00\x00" + u32(5) + b"\x00\x09" + u32(6) + advance(31_000)
      + b"\x07" + b"\x00\x04" + u32(7))
d.put("ops_stun", bytes([4, 2, 0, 0]) + lv(bytes.fromhex(stun["request_vectors"][0]["packet_hex"])))
for name, b in plaintexts:
    d.put("ops_plain_" + name, ALLOC_01 + bytes([3, 0, 0, 0]) + lv(b))
for name, b in packets:
    d.put("ops_raw_" + name, ALLOC_01 + bind(0, 0, 7) + answer(0, 0, 0)
          + bytes([4, 0, 1, 0]) + lv(b) + bytes([4, 2, 2, 0]) + lv(b))

# disco_parse ops mode (odd first byte). ops: [op, peer, …]
# 0 plaintext over UDP (lv, via, slot) 1 plaintext over DERP (lv, region, impostor)
# 2 built message (kind + fields, via, …) 3 raw (via, lv, slot|region,node) 4 pong echo (bool)
# 5 time (u16 x 4 ms) 6 outgoing (0)/cli ping (1)/send via DERP (2 + message) 7 local (flags)
d = Dir("disco_parse_ops")
shutil.rmtree(d.path)
d.path = os.path.join(SEEDS, "disco_parse")
for name, b in plaintexts:
    d.put("ops_udp_" + name, b"\x01" + b"\x00\x00" + lv(b) + b"\x00\x00")
    d.put("ops_derp_" + name, b"\x01" + b"\x01\x01" + lv(b) + b"\x01\x00")
for name, b in packets:
    d.put("ops_raw_" + name, b"\x01" + b"\x03\x00\x00" + lv(b) + b"\x00")
discovery = (b"\x06\x00\x00" + b"\x04\x00\x00" + b"\x06\x01\x00" + b"\x04\x01\x00"
             + b"\x05\x00" + u16(1250) + b"\x04\x00\x00" + b"\x06\x00\x01" + b"\x04\x00\x00"
             + b"\x05\x00" + u16(16000) + b"\x07\x00\x05" + b"\x06\x01\x00")
d.put("ops_discovery", b"\x01" + discovery)
# Built messages (kinds 0-8 with zero fields), over UDP from the peer's address and over DERP.
for kind in range(9):
    body = bytes([kind]) + bytes(24)
    d.put("ops_built_%d_udp" % kind, b"\x01" + b"\x02\x00" + body + b"\x00\x00")
    d.put("ops_built_%d_derp" % kind, b"\x01" + b"\x02\x01" + body + b"\x01\x02\x00")
d.put("ops_send_via_derp", b"\x01" + b"\x06\x00\x02\x06" + bytes(30))

# relay_client ops (layout in bodies/relay_client.rs): 0 discover(who) 1 alloc response(from,
# gen mode, endpoint, current) 2 CallMeMaybeVia(endpoint, current) 3 sealed Geneve(addr, flags,
# vni, sealer, kind, fields) 4 raw(addr, lv) 5 time(u16 x 10 ms). Keys: 0 S, 1 S2, 2 P, 3 O.
d = Dir("relay_client")


def ep(server=0, pair=0, lamport=1, vni=0, life=0, addrs=(b"\x00",)):
    return (bytes([server, pair]) + u16(lamport) + bytes([vni, life]) + u16(300)
            + bytes([len(addrs)]) + b"".join(addrs))


ANY_V4 = b"\x03" + bytes([192, 0, 2, 77]) + u16(5555)
DISCOVER = b"\x00\x00"


def response(frm=0, gen_mode=0, endpoint=ep(), current=0):
    return bytes([1, frm, gen_mode]) + endpoint + bytes([current])


def cmmv(endpoint=ep(), current=0):
    return b"\x02" + endpoint + bytes([current])


def sealed(kind_fields, addr=b"\x00", control=False, vni=0, sealer=2):
    return b"\x03" + addr + bytes([1 if control else 0, vni, sealer]) + kind_fields


def challenge(addr=b"\x00", vni=0, sealer=0, remote=0, delta=0):
    return sealed(bytes([2, delta]) + u32(1) + bytes([remote]) + bytes(range(32)), addr, True,
                  vni, sealer)


def peer_ping(addr=b"\x00", vni=0, sealer=2):
    return sealed(b"\x03" + b"\x5a" * 12 + b"\x01\x00", addr, False, vni, sealer)


def pong(addr=b"\x00", which=0, flip=0, sealer=2):
    return sealed(bytes([1, which, flip, 0]), addr, False, 0, sealer)


def time(ms):
    return b"\x05" + u16(ms // 10)


d.put("ops_allocate_bind_ready", DISCOVER + response() + challenge() + peer_ping() + pong())
d.put("ops_call_me_maybe_via_ready", cmmv() + challenge() + pong())
d.put("ops_two_addresses", cmmv(ep(addrs=(b"\x00", b"\x01"))) + challenge(b"\x01") + pong(b"\x01"))
d.put("ops_challenge_from_elsewhere", cmmv() + challenge(ANY_V4) + pong(ANY_V4) + pong())
d.put("ops_wrong_node_generation_pair", DISCOVER + response(frm=1) + response(frm=2)
      + response(gen_mode=1) + b"\x01\x00\x02" + u32(77) + ep() + b"\x00"
      + response(endpoint=ep(pair=2)) + response(endpoint=ep(addrs=())) + response()
      + response())
d.put("ops_alloc_retry_and_give_up", DISCOVER + time(1000) + DISCOVER + time(2000) + time(7000)
      + response())
d.put("ops_discover_the_relay_itself", b"\x00\x01" + time(10000))
d.put("ops_bind_timeout", cmmv(ep(life=5)) + time(4990) + time(20) + challenge())
d.put("ops_alloc_gives_up_while_binding", DISCOVER + cmmv(ep(server=1, life=20)) + time(10000)
      + time(10000))
d.put("ops_dedup_lamport", cmmv() + cmmv() + cmmv(ep(lamport=2)) + cmmv(ep(lamport=3, vni=1))
      + challenge(vni=1) + cmmv(ep(lamport=4, addrs=())) + cmmv(ep(lamport=5)) + cmmv(ep(server=1), current=3) + cmmv(ep(server=1), current=2))
d.put("ops_relay_in_use", DISCOVER + response(current=1) + cmmv(ep(lamport=9), current=1))
d.put("ops_two_servers_same_vni", cmmv() + cmmv(ep(server=1)) + challenge(sealer=1)
      + challenge(sealer=0) + peer_ping() + pong(which=1) + pong())
d.put("ops_wrong_sealers", cmmv() + challenge(sealer=2) + challenge(sealer=3) + challenge(sealer=1)
      + challenge(remote=2) + challenge(delta=1) + challenge(vni=1) + peer_ping(sealer=0)
      + pong(sealer=0) + challenge() + challenge() + pong(flip=1) + pong(addr=b"\x02") + pong())
d.put("ops_ping_limit", cmmv() + challenge() + peer_ping() * 12 + pong(which=9))
d.put("ops_bad_vni", cmmv(ep(vni=0xff)[:4] + b"\xff" + u32(0) + b"\x00" + u16(1) + b"\x01\x00")
      + cmmv(ep(vni=0xff)[:4] + b"\xff" + u32(1 << 24) + b"\x00" + u16(1) + b"\x01\x00"))
for name, b in plaintexts:
    d.put("ops_plain_" + name, cmmv() + sealed(b"\x00" + lv(b), control=True, sealer=0)
          + sealed(b"\x00" + lv(b)))
for name, b in packets:
    d.put("ops_raw_" + name, cmmv() + b"\x04\x00" + lv(b) + b"\x04\x02" + lv(b))

# --- localapi_request: method byte, target byte (mode << 4 | path), [text], padding byte, body --
d = Dir("localapi_request")
GET, POST, PATCH, PUT, RAW = 0, 1, 2, 3, 0x0f
STATUS, IP, UP, DOWN, LOGOUT, PREFS, PING, NETCHECK, WHOIS, WATCH, CHECK, LOGS, NEAR = range(13)


def req(method, path, mode=0, text=b"", pad=0, body=b"", raw_method=b""):
    head = bytes([method]) + (lv(raw_method) if method == RAW else b"")
    head += bytes([mode << 4 | path]) + (lv(text) if mode else b"")
    return head + bytes([pad]) + body


KEY = ("nodekey:" + "11" * 32).encode()
d.put("status", req(GET, STATUS))
d.put("ip", req(GET, IP))
d.put("up", req(POST, UP, body=b'{"login_server":"https://controlplane.tailscale.com",'
                                 b'"auth_key":"tskey-auth-k1","hostname":"n1"}'))
d.put("up_empty", req(POST, UP, body=b"{}"))
d.put("up_nulls", req(POST, UP, body=b'{"login_server":null,"auth_key":null,"hostname":"a\\u00e9\\n"}'))
d.put("down", req(POST, DOWN))
d.put("logout", req(POST, LOGOUT, body=b"ignored"))
d.put("prefs", req(PATCH, PREFS, body=b'{"relay_server_port":40000,"relay_server_port_set":true,'
                                      b'"relay_server_static_endpoints":["1.2.3.4:5","[::1]:7"],'
                                      b'"relay_server_static_endpoints_set":true}'))
d.put("prefs_off", req(PATCH, PREFS, body=b'{"relay_server_port":null,"relay_server_port_set":true}'))
d.put("ping", req(POST, PING, body=b'{"peer":"n2.tailnet.example.","timeout_ms":5000}'))
d.put("ping_default_timeout", req(POST, PING, body=b'{"peer":"100.64.0.2"}'))
d.put("netcheck", req(POST, NETCHECK))
d.put("whois", req(GET, WHOIS, mode=1, text=b"nodekey=" + KEY))
d.put("whois_percent", req(GET, WHOIS, mode=1, text=b"a=b&nodekey=" + KEY.replace(b":", b"%3A")))
d.put("watch", req(GET, WATCH))
d.put("logs", req(GET, LOGS))
d.put("absolute_form_status", req(GET, STATUS, mode=2))
d.put("status_fragment", req(GET, STATUS, mode=3, text=b"frag"))
d.put("raw_target_ping", req(POST, 0, mode=5, text=b"/localapi/v0/ping?x=1",
                             body=b'{"peer":"n2","timeout_ms":60000}'))
d.put("up_padded_to_limit", req(POST, UP, pad=1, body=b'{"hostname":"n1"}'))
# Refused: 405, 404, bad JSON, ping timeout out of range, bad/missing nodekey, over the limit,
# a method that is not a token, a target hyper would refuse.
d.put("bad_put_status", req(PUT, STATUS))
d.put("bad_lowercase_get", req(7, STATUS))
d.put("bad_post_watch", req(POST, WATCH))
d.put("bad_unknown_path", req(GET, NEAR + 2))  # /localapi/v1/status
d.put("bad_path_suffix", req(GET, STATUS, mode=4, text=b"/x"))
d.put("bad_json", req(POST, UP, body=b"{oops"))
d.put("bad_duplicate_key", req(POST, PING, body=b'{"peer":"a","peer":"b"}'))
d.put("bad_ping_timeout_0", req(POST, PING, body=b'{"peer":"n2","timeout_ms":0}'))
d.put("bad_ping_timeout_max", req(POST, PING, body=b'{"peer":"n2","timeout_ms":60001}'))
d.put("bad_prefs_port", req(PATCH, PREFS, body=b'{"relay_server_port":65536}'))
d.put("bad_whois_key", req(GET, WHOIS, mode=1, text=b"nodekey=nodekey:zz"))
d.put("bad_whois_missing", req(GET, WHOIS))
d.put("bad_over_limit", req(PATCH, PREFS, pad=2, body=b"{}"))
d.put("bad_method_token", req(RAW, STATUS, raw_method=b"GE T"))
d.put("bad_target", req(GET, 0, mode=5, text=b"/localapi/v0/status\x7f"))

# --- proxy_request: mode byte (even SOCKS5, odd HTTP), then the client's bytes ---------------
d = Dir("proxy_request")
GREETING = b"\x05\x01\x00"
d.put("socks_v4", b"\x00" + GREETING + b"\x05\x01\x00\x01\x64\x40\x00\x02\x00\x50")
d.put("socks_v6", b"\x00" + GREETING + b"\x05\x01\x00\x04" + bytes.fromhex("fd7a115ca1e000000000000000000002") + b"\x00\x50")
d.put("socks_name", b"\x00" + GREETING + b"\x05\x01\x00\x03\x03tsd\x00\x50")
d.put("socks_two_methods", b"\x00\x05\x02\x02\x00\x05\x01\x00\x03\x0bexample.lab\x01\xbb")
d.put("bad_socks_bind", b"\x00" + GREETING + b"\x05\x02\x00\x01\x01\x02\x03\x04\x00\x50")
d.put("bad_socks_atyp", b"\x00" + GREETING + b"\x05\x01\x00\x09")
d.put("bad_socks_auth_only", b"\x00\x05\x01\x02")
d.put("bad_socks4", b"\x00\x04\x01\x00\x50\x01\x02\x03\x04\x00")
d.put("http_get", b"\x01GET http://tsd/x?y=1 HTTP/1.1\r\nHost: tsd\r\nProxy-Connection: keep-alive\r\nAccept: */*\r\n\r\n")
d.put("http_get_no_host", b"\x01GET http://100.64.0.2:8080 HTTP/1.0\r\n\r\n")
d.put("http_post_body", b"\x01POST http://tsd/form HTTP/1.1\r\nHost: tsd\r\nContent-Length: 3\r\n\r\nabc")
d.put("http_connect", b"\x01CONNECT tsd.lab.tern.test:443 HTTP/1.1\r\nHost: tsd.lab.tern.test:443\r\n\r\n")
d.put("http_connect_v6", b"\x01CONNECT [fd7a:115c:a1e0::2]:22 HTTP/1.1\r\n\r\n")
d.put("bad_http_relative", b"\x01GET /x HTTP/1.1\r\n\r\n")
d.put("bad_http_https", b"\x01GET https://tsd/ HTTP/1.1\r\n\r\n")
d.put("bad_http_userinfo", b"\x01CONNECT user@tsd:80 HTTP/1.1\r\n\r\n")
d.put("bad_http_junk", b"\x01\x00\x01 junk\r\n\r\n")

# --- tun_offload: a virtio-net header (host order, little-endian here) and a packet ----------


def csum(data):
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack("!%dH" % (len(data) // 2), data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s


def ip_header(v6, proto, l4):
    """The IP header (IPv4 with its checksum) and the addresses, for l4 bytes of proto."""
    if v6:
        src, dst = bytes.fromhex("fd7a115ca1e000000000000000000001"), bytes.fromhex("fd7a115ca1e000000000000000000002")
        return b"\x60\0\0\0" + struct.pack("!HBB", l4, proto, 64) + src + dst, src, dst
    src, dst = bytes([100, 64, 0, 1]), bytes([100, 64, 0, 2])
    ip = struct.pack("!BBHHHBBH", 0x45, 0, 20 + l4, 7, 0x4000, 64, proto, 0) + src + dst
    return ip[:10] + struct.pack("!H", 0xFFFF - csum(ip)) + ip[12:], src, dst


def tcp_frame(v6, payload_len, segment, flags=0x10, options=b"", gso=True):
    tcp_len = 20 + len(options)
    l4 = tcp_len + payload_len
    ip, src, dst = ip_header(v6, 6, l4)
    partial = csum(src + dst + struct.pack("!HH", 6, l4))
    tcp = struct.pack("!HHIIBBHHH", 40000, 443, 1000, 99, (tcp_len // 4) << 4, flags, 0xFFFF, partial, 0) + options
    gso_type = (4 if v6 else 1) if gso else 0
    header = struct.pack("<BBHHHH", 1, gso_type, len(ip) + tcp_len, segment if gso else 0, len(ip), 16)
    return header + ip + tcp + bytes((i * 31) & 0xFF for i in range(payload_len))


def udp_frame(v6, payload_len, segment):
    """A UDP super-packet (USO): GSO_UDP_L4, the UDP checksum field holding the pseudo-header sum."""
    l4 = 8 + payload_len
    ip, src, dst = ip_header(v6, 17, l4)
    partial = csum(src + dst + struct.pack("!HH", 17, l4))
    udp = struct.pack("!HHHH", 12345, 443, l4, partial)
    header = struct.pack("<BBHHHH", 1, 5, len(ip) + 8, segment, len(ip), 6)
    return header + ip + udp + bytes((i * 7) & 0xFF for i in range(payload_len))


d = Dir("tun_offload")
TS = b"\x01\x01\x08\x0a" + struct.pack("!II", 5, 7)
d.put("tso_v4", tcp_frame(False, 3000, 1000))
d.put("tso_v4_psh_fin", tcp_frame(False, 2500, 1000, flags=0x19))
d.put("tso_v6_timestamps", tcp_frame(True, 2500, 1208, options=TS))
d.put("csum_only_v4", tcp_frame(False, 100, 0, gso=False))
d.put("plain_udp", struct.pack("<BBHHHH", 0, 0, 0, 0, 0, 0) + bytes.fromhex("4500001c000000004011000001010101020202020001000200080000"))
d.put("bad_gso_udp_l4", b"\x01\x05" + tcp_frame(False, 3000, 1000)[2:])
d.put("uso_v4", udp_frame(False, 3000, 1200))
d.put("uso_v6", udp_frame(True, 2400, 1200))



# --- peerapi_doh: mode byte (0 GET query string, 1 Content-Type, 2 DNS query), then the rest ----
def dns_query(name, qtype=1, ident=0x1234):
    out = struct.pack("!HHHHHH", ident, 0x0100, 1, 0, 0, 0)
    for label in name.split("."):
        out += bytes([len(label)]) + label.encode()
    return out + b"\x00" + struct.pack("!HH", qtype, 1)


import base64


def b64url(data, pad=False):
    text = base64.urlsafe_b64encode(data).decode()
    return text if pad else text.rstrip("=")


d = Dir("peerapi_doh")
d.put("get_example", b"\x00dns=" + b64url(dns_query("example.com")).encode())
d.put("get_padded", b"\x00ct=1&dns=" + b64url(dns_query("example.org", 28), pad=True).encode())
d.put("get_escaped_padding", b"\x00dns=" + b64url(dns_query("a.b"), pad=True).replace("=", "%3D").encode())
d.put("get_missing", b"\x00q=example.com&t=aaaa")
d.put("get_empty_dns", b"\x00dns=&dns=")
d.put("get_bad_base64", b"\x00dns=%%%")
d.put("content_type", b"\x01application/dns-message")
d.put("content_type_params", b"\x01Application/DNS-Message ; charset=utf-8")
d.put("content_type_json", b"\x01application/json")
d.put("query_filtered_suffix", b"\x02" + dns_query("host.tail1234.ts.net"))
d.put("query_filtered_exact", b"\x02" + dns_query("BLOCKED.example"))
d.put("query_under_exact", b"\x02" + dns_query("www.blocked.example"))
d.put("query_no_question", b"\x02" + struct.pack("!HHHHHH", 7, 0x0100, 0, 0, 0, 0))
d.put("query_header_only", b"\x03\x00\x07\x01")
