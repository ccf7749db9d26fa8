//! Answering one query to 100.100.100.100, pure: bytes in, an [`Outcome`] out.
//!
//! Follows Go's quad-100 (`net/dns/resolver/tsdns.go`): tailnet names and addresses are answered
//! here (TTL 600, AA and RA set), names under a local domain that are not hosts get NXDOMAIN, and
//! everything else is forwarded unchanged to the longest matching route's upstreams.

use std::net::{IpAddr, SocketAddr};

use hickory_proto::op::{Edns, Message, Metadata, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, PTR};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};
use hickory_proto::serialize::binary::{BinDecodable, BinDecoder};
use tracing::{debug, warn};

use super::config::{MagicDnsConfig, Upstream};
use super::name::{key_of, last_label, reverse_ip};

/// TTL of every local answer (Go's `defaultTTL`).
pub const TTL: u32 = 600;

/// The largest UDP answer quad-100 sends (Go's `maxResponseBytes`); the query's EDNS may lower it.
pub const MAX_UDP_RESPONSE: usize = 4095;

/// Largest answer over TCP (the 2-byte length prefix).
pub const MAX_TCP_RESPONSE: usize = 65535;

/// Size of the DNS header.
pub const HEADER_LEN: usize = 12;

/// RFC 1035's UDP size, the floor of any EDNS payload size.
const MIN_PAYLOAD: usize = 512;

const QR: u8 = 0x80;
const AA: u8 = 0x04;
const TC: u8 = 0x02;
const RD: u8 = 0x01;
const RA: u8 = 0x80;
const OPCODE_QUERY: u8 = 0;

/// What to do with a query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Send this reply.
    Answer(Vec<u8>),
    /// Relay `query` (the client's bytes, unchanged) to these upstreams.
    Forward {
        upstreams: Vec<SocketAddr>,
        query: Vec<u8>,
    },
    /// Relay `query` to the exit node's DNS over HTTP at `server`.
    ForwardDoh { server: SocketAddr, query: Vec<u8> },
    /// Send nothing (not a query, or not even a header to reply to).
    Drop,
}

/// The counter an outcome belongs in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bucket {
    /// A local NOERROR answer (with or without records).
    Answered,
    NxDomain,
    FormErr,
    /// SERVFAIL, NOTIMP, or another error reply.
    OtherError,
    Forwarded,
    Dropped,
}

impl Outcome {
    /// Which counter this outcome counts in (an answer's by its response code).
    pub fn bucket(&self) -> Bucket {
        match self {
            Outcome::Answer(bytes) => match bytes.get(3).map(|b| b & 0x0f) {
                Some(0) => Bucket::Answered,
                Some(1) => Bucket::FormErr,
                Some(3) => Bucket::NxDomain,
                _ => Bucket::OtherError,
            },
            Outcome::Forward { .. } | Outcome::ForwardDoh { .. } => Bucket::Forwarded,
            Outcome::Drop => Bucket::Dropped,
        }
    }
}

/// Counters the caller keeps across queries.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DnsCounters {
    pub queries: u64,
    pub answered_locally: u64,
    pub nxdomain: u64,
    pub forwarded: u64,
    pub formerr: u64,
    pub dropped: u64,
    /// SERVFAIL and NOTIMP replies.
    pub other_errors: u64,
}

impl DnsCounters {
    /// Counts one query and its outcome; returns the bucket.
    pub fn count(&mut self, outcome: &Outcome) -> Bucket {
        let bucket = outcome.bucket();
        self.queries += 1;
        let slot = match bucket {
            Bucket::Answered => &mut self.answered_locally,
            Bucket::NxDomain => &mut self.nxdomain,
            Bucket::FormErr => &mut self.formerr,
            Bucket::OtherError => &mut self.other_errors,
            Bucket::Forwarded => &mut self.forwarded,
            Bucket::Dropped => &mut self.dropped,
        };
        *slot += 1;
        bucket
    }
}

/// [`respond`], counted in `counters`.
pub fn respond_counted(
    config: &MagicDnsConfig,
    query: &[u8],
    max_len: usize,
    counters: &mut DnsCounters,
) -> Outcome {
    let outcome = respond(config, query, max_len);
    counters.count(&outcome);
    outcome
}

/// Answers one raw query. `max_len` is what the transport allows ([`MAX_UDP_RESPONSE`] or
/// [`MAX_TCP_RESPONSE`]); a query's EDNS payload size lowers it (never below 512). An answer is
/// never longer than that: records are dropped and TC set first, then the question.
pub fn respond(config: &MagicDnsConfig, query: &[u8], max_len: usize) -> Outcome {
    let Some(head) = query.get(..HEADER_LEN) else {
        return Outcome::Drop;
    };
    if head[2] & QR != 0 {
        // A response sent to us: answering could loop between two resolvers.
        return Outcome::Drop;
    }
    if opcode(head) != OPCODE_QUERY {
        return header_reply(head, ResponseCode::NotImp, max_len);
    }
    if u16::from_be_bytes([head[4], head[5]]) != 1 {
        return header_reply(head, ResponseCode::FormErr, max_len);
    }
    let msg = match Message::from_vec(query) {
        Ok(msg) => msg,
        Err(err) => {
            debug!(%err, "magicdns: unparseable query");
            return header_reply(head, ResponseCode::FormErr, max_len);
        }
    };
    let Some(question) = msg.queries.first() else {
        return header_reply(head, ResponseCode::FormErr, max_len);
    };
    let limit = reply_limit(&msg, max_len);
    match decide(config, question) {
        Verdict::Reply(rcode, data) => {
            let record = data.map(|d| Record::from_rdata(question.name().clone(), TTL, d));
            encode_within(reply_to(&msg, rcode, record, limit), limit)
        }
        Verdict::Forward(upstreams) => Outcome::Forward {
            upstreams: upstreams.to_vec(),
            query: query.to_vec(),
        },
        Verdict::ForwardDoh(server) => Outcome::ForwardDoh {
            server,
            query: query.to_vec(),
        },
    }
}

/// What the question gets.
enum Verdict<'c> {
    Reply(ResponseCode, Option<RData>),
    Forward(&'c [SocketAddr]),
    ForwardDoh(SocketAddr),
}

fn decide<'c>(config: &'c MagicDnsConfig, question: &Query) -> Verdict<'c> {
    let key = key_of(question.name());
    let qtype = question.query_type();
    // RFC 7686: .onion names must not leak to DNS.
    if last_label(&key) == "onion" {
        return Verdict::Reply(ResponseCode::NXDomain, None);
    }
    if qtype == RecordType::PTR {
        if let Some(fqdn) = reverse_ip(&key).and_then(|ip| config.ptr.get(&ip)) {
            return ptr_answer(fqdn);
        }
    }
    if let Some(addrs) = config.lookup(&key) {
        let in_class = matches!(question.query_class(), DNSClass::IN | DNSClass::ANY);
        return host_answer(addrs, qtype, in_class);
    }
    if config.is_local(&key) {
        return Verdict::Reply(ResponseCode::NXDomain, None);
    }
    match config.upstream_for(&key) {
        Upstream::Dns([]) => Verdict::Reply(ResponseCode::ServFail, None),
        Upstream::Dns(upstreams) => Verdict::Forward(upstreams),
        Upstream::Doh(server) => Verdict::ForwardDoh(server),
    }
}

fn ptr_answer(fqdn: &str) -> Verdict<'static> {
    match Name::from_ascii(fqdn) {
        Ok(name) => Verdict::Reply(ResponseCode::NoError, Some(RData::PTR(PTR(name)))),
        // The config only keeps valid names; should one slip through, fail rather than lie.
        Err(err) => {
            warn!(%err, fqdn, "magicdns: host name not encodable");
            Verdict::Reply(ResponseCode::ServFail, None)
        }
    }
}

/// A known host: A/AAAA/ANY get its first address of that family, zone-level types are not
/// implemented here, other types exist but are empty.
fn host_answer(addrs: &[IpAddr], qtype: RecordType, in_class: bool) -> Verdict<'static> {
    let pick = |want_v4: Option<bool>| {
        addrs
            .iter()
            .find(|ip| want_v4.is_none_or(|v4| ip.is_ipv4() == v4))
            .filter(|_| in_class)
            .map(|ip| match ip {
                IpAddr::V4(v4) => RData::A(A(*v4)),
                IpAddr::V6(v6) => RData::AAAA(AAAA(*v6)),
            })
    };
    let data = match qtype {
        RecordType::A => pick(Some(true)),
        RecordType::AAAA => pick(Some(false)),
        RecordType::ANY => pick(None),
        RecordType::NS | RecordType::SOA | RecordType::AXFR | RecordType::HINFO => {
            return Verdict::Reply(ResponseCode::NotImp, None);
        }
        _ => None,
    };
    Verdict::Reply(ResponseCode::NoError, data)
}

/// The transport's limit, lowered by the query's EDNS payload size.
fn reply_limit(msg: &Message, max_len: usize) -> usize {
    match &msg.edns {
        Some(edns) => max_len.min(usize::from(edns.max_payload()).max(MIN_PAYLOAD)),
        None => max_len,
    }
}

fn reply_to(query: &Message, rcode: ResponseCode, answer: Option<Record>, limit: usize) -> Message {
    let mut reply = Message::response(query.metadata.id, OpCode::Query);
    reply.metadata = Metadata::response_from_request(&query.metadata);
    reply.metadata.authoritative = true;
    reply.metadata.recursion_available = true;
    reply.metadata.response_code = rcode;
    reply.queries = query.queries.clone();
    reply.answers.extend(answer);
    // RFC 6891: a query with OPT gets OPT back, with what we accept.
    if query.edns.is_some() {
        let mut edns = Edns::new();
        edns.set_max_payload(u16::try_from(limit.max(MIN_PAYLOAD)).unwrap_or(u16::MAX));
        reply.edns = Some(edns);
    }
    reply
}

/// Encodes `reply` in at most `limit` bytes: whole, else without records (TC), else the bare
/// header (TC); `Drop` if not even that fits.
fn encode_within(mut reply: Message, limit: usize) -> Outcome {
    for step in 0..3 {
        match reply.to_vec() {
            Ok(bytes) if bytes.len() <= limit => return Outcome::Answer(bytes),
            Ok(_) => {}
            Err(err) => {
                warn!(%err, "magicdns: reply not encodable");
                return Outcome::Drop;
            }
        }
        reply.metadata.truncation = true;
        if step == 0 {
            reply.answers.clear();
        } else {
            reply.queries.clear();
            reply.edns = None;
        }
    }
    Outcome::Drop
}

fn opcode(head: &[u8]) -> u8 {
    (head[2] >> 3) & 0x0f
}

/// A header-only error reply to a query we could not (or will not) parse: ID, opcode and RD
/// echoed, AA and RA set, no sections.
fn header_reply(head: &[u8], rcode: ResponseCode, max_len: usize) -> Outcome {
    if max_len < HEADER_LEN {
        return Outcome::Drop;
    }
    let mut out = vec![0u8; HEADER_LEN];
    out[..2].copy_from_slice(&head[..2]);
    out[2] = QR | (opcode(head) << 3) | AA | (head[2] & RD);
    out[3] = RA | (rcode.low() & 0x0f);
    Outcome::Answer(out)
}

/// SERVFAIL for a query the forwarder could not get answered (Go answers so too); `None`
/// when the query has no header to answer.
pub fn servfail(query: &[u8]) -> Option<Vec<u8>> {
    error_reply(query, ResponseCode::ServFail)
}

/// REFUSED for a query this node will not forward (an exit node's filtered names).
pub fn refused(query: &[u8]) -> Option<Vec<u8>> {
    error_reply(query, ResponseCode::Refused)
}

fn error_reply(query: &[u8], rcode: ResponseCode) -> Option<Vec<u8>> {
    let head = query.get(..HEADER_LEN)?;
    let outcome = match Message::from_vec(query) {
        Ok(msg) => encode_within(
            reply_to(&msg, rcode, None, MAX_TCP_RESPONSE),
            MAX_TCP_RESPONSE,
        ),
        Err(_) => header_reply(head, rcode, MAX_TCP_RESPONSE),
    };
    match outcome {
        Outcome::Answer(bytes) => Some(bytes),
        _ => None,
    }
}

/// Fits an upstream's reply into what the client takes: unchanged if it fits, else its header
/// and question with TC set (the client retries over TCP), else the bare header with TC; `None`
/// if the reply has no readable header or `max_len` is under 12.
pub fn fit_reply(reply: &[u8], max_len: usize) -> Option<Vec<u8>> {
    if reply.len() <= max_len {
        return Some(reply.to_vec());
    }
    let head = reply.get(..HEADER_LEN)?;
    if max_len < HEADER_LEN {
        return None;
    }
    let mut out = head.to_vec();
    out[2] |= TC;
    out[4..].fill(0);
    if let Some(question) = first_question_bytes(reply) {
        if HEADER_LEN + question.len() <= max_len {
            out[5] = 1;
            out.extend_from_slice(question);
        }
    }
    Some(out)
}

/// The bytes of the first question, if it is there, readable and uncompressed (a compressed
/// name would point into bytes we drop).
fn first_question_bytes(msg: &[u8]) -> Option<&[u8]> {
    if u16::from_be_bytes([*msg.get(4)?, *msg.get(5)?]) == 0 {
        return None;
    }
    let body = msg.get(HEADER_LEN..)?;
    let mut decoder = BinDecoder::new(body);
    Query::read(&mut decoder).ok()?;
    let bytes = body.get(..decoder.index())?;
    // A name is uncompressed when no length byte has the pointer bits set.
    let mut i = 0;
    loop {
        let len = *bytes.get(i)?;
        if len & 0xc0 != 0 {
            return None;
        }
        if len == 0 {
            return Some(bytes);
        }
        i += 1 + usize::from(len);
    }
}

#[cfg(test)]
mod tests;
