//! A stub DNS server for lab tests: answers A queries for a few names from a table, AAAA with no
//! records, anything else with NXDOMAIN. One UDP socket in a lab namespace, served from a thread
//! until dropped. And `ResolvConf`, which points a namespace's `/etc/resolv.conf` at it the way
//! `ip netns exec` allows (`/etc/netns/<ns>/resolv.conf`), removed again on drop.

#![allow(dead_code)]

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use tern_lab::Netns;

const TYPE_A: u16 = 1;
const TYPE_AAAA: u16 = 28;

/// The stub server; stops on drop.
pub struct DnsStub {
    pub addr: SocketAddr,
    /// Queries answered so far.
    pub queries: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl DnsStub {
    /// Serves `names` (lower-case, no trailing dot) on `addr` (port 53) inside `ns`.
    pub fn start(ns: &Netns, addr: SocketAddr, names: &[(&str, Ipv4Addr)]) -> DnsStub {
        let socket = ns.bind_udp(addr).expect("bind the DNS stub");
        socket
            .set_read_timeout(Some(Duration::from_millis(100)))
            .expect("read timeout");
        let table: HashMap<String, Ipv4Addr> =
            names.iter().map(|(n, ip)| (n.to_string(), *ip)).collect();
        let stop = Arc::new(AtomicBool::new(false));
        let queries = Arc::new(AtomicU64::new(0));
        let (stop2, queries2) = (stop.clone(), queries.clone());
        let thread = std::thread::spawn(move || serve(&socket, &table, &stop2, &queries2));
        DnsStub {
            addr,
            queries,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for DnsStub {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve(
    socket: &UdpSocket,
    table: &HashMap<String, Ipv4Addr>,
    stop: &AtomicBool,
    queries: &AtomicU64,
) {
    let mut buf = [0u8; 1500];
    while !stop.load(Ordering::Relaxed) {
        let Ok((n, from)) = socket.recv_from(&mut buf) else {
            continue;
        };
        if let Some(reply) = answer(&buf[..n], table) {
            queries.fetch_add(1, Ordering::Relaxed);
            let _ = socket.send_to(&reply, from);
        }
    }
}

/// The reply to one query, or `None` for bytes that are not a query.
pub fn answer(query: &[u8], table: &HashMap<String, Ipv4Addr>) -> Option<Vec<u8>> {
    let (name, qtype, question_end) = parse_question(query)?;
    let found = table.get(&name);
    let a_record = found.filter(|_| qtype == TYPE_A);
    let rcode = if found.is_some() { 0 } else { 3 };
    let mut reply = Vec::with_capacity(question_end + 16);
    reply.extend_from_slice(&query[..2]); // ID
    reply.extend_from_slice(&[0x84 | (query[2] & 0x01), 0x80 | rcode]); // QR AA RD, RA
    reply.extend_from_slice(&[0, 1, 0, u8::from(a_record.is_some()), 0, 0, 0, 0]);
    reply.extend_from_slice(&query[12..question_end]);
    if let Some(ip) = a_record {
        reply.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4]);
        reply.extend_from_slice(&ip.octets());
    }
    let _ = TYPE_AAAA; // AAAA for a known name: NOERROR with no records (no IPv6 in the lab).
    Some(reply)
}

/// The first question: lower-case name, type, and where the question ends.
fn parse_question(query: &[u8]) -> Option<(String, u16, usize)> {
    let header = query.get(..12)?;
    if header[2] & 0x80 != 0 || u16::from_be_bytes([header[4], header[5]]) == 0 {
        return None;
    }
    let mut labels = Vec::new();
    let mut at = 12;
    loop {
        let len = usize::from(*query.get(at)?);
        at += 1;
        if len == 0 {
            break;
        }
        if len > 63 {
            return None;
        }
        labels.push(String::from_utf8_lossy(query.get(at..at + len)?).to_ascii_lowercase());
        at += len;
    }
    let qtype = u16::from_be_bytes([*query.get(at)?, *query.get(at + 1)?]);
    Some((labels.join("."), qtype, at + 4))
}

/// `/etc/netns/<ns>/resolv.conf` naming `server`: processes started with `ip netns exec <ns>`
/// see it as their `/etc/resolv.conf`. Removed (with the directory) on drop.
pub struct ResolvConf {
    dir: PathBuf,
}

impl ResolvConf {
    pub fn point(ns: &Netns, server: Ipv4Addr) -> ResolvConf {
        let dir = PathBuf::from("/etc/netns").join(ns.name());
        std::fs::create_dir_all(&dir).expect("create /etc/netns/<ns>");
        std::fs::write(
            dir.join("resolv.conf"),
            format!("nameserver {server}\noptions timeout:1 attempts:2\n"),
        )
        .expect("write resolv.conf");
        ResolvConf { dir }
    }
}

impl Drop for ResolvConf {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
