//! Relaying a client's raw query to upstream resolvers, as Go's quad-100 forwarder does: the
//! query is sent unchanged by UDP to every upstream at once and the first answer that matches
//! (ID and question) wins; TCP is used when the client came over TCP, when a UDP answer is
//! truncated, or when an upstream stays silent on UDP.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use hickory_proto::op::{Header, Query};
use hickory_proto::serialize::binary::{BinDecodable, BinDecoder};
use thiserror::Error;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio::task::JoinSet;
use tokio::time::timeout;
use tracing::debug;

use super::config::DNS_PORT;
use super::name::key_of;

/// Largest answer taken over UDP (a longer datagram is treated as broken and retried by TCP).
pub const MAX_UDP_ANSWER: usize = 4096;

/// Largest answer over TCP (what the 2-byte length prefix allows).
pub const MAX_TCP_ANSWER: usize = 65535;

use crate::netstack::{QUAD_100_V4, QUAD_100_V6};

/// How long to wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// UDP silence from one upstream before asking it over TCP.
    pub udp: Duration,
    /// The whole exchange.
    pub overall: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            udp: Duration::from_secs(2),
            overall: Duration::from_secs(10),
        }
    }
}

#[derive(Debug, Error)]
pub enum ForwardError {
    #[error("no upstream resolver")]
    NoUpstreams,
    #[error("not a DNS query with a question")]
    BadQuery,
    #[error("query of {0} bytes is too long for TCP")]
    TooLong(usize),
    #[error("no upstream answered within {0:?}")]
    Timeout(Duration),
    #[error("every upstream failed, the last with: {0}")]
    Failed(#[source] io::Error),
}

/// Forwards `query` with the default timeouts (2 s UDP silence, 10 s overall).
pub async fn forward(
    upstreams: &[SocketAddr],
    query: &[u8],
    tcp_client: bool,
) -> Result<Vec<u8>, ForwardError> {
    forward_with(upstreams, query, tcp_client, Timeouts::default()).await
}

/// Forwards `query` to all `upstreams` at once; the first matching answer wins.
pub async fn forward_with(
    upstreams: &[SocketAddr],
    query: &[u8],
    tcp_client: bool,
    timeouts: Timeouts,
) -> Result<Vec<u8>, ForwardError> {
    if upstreams.is_empty() {
        return Err(ForwardError::NoUpstreams);
    }
    if query.len() > MAX_TCP_ANSWER {
        return Err(ForwardError::TooLong(query.len()));
    }
    let expect = Arc::new(Expect::of(query).ok_or(ForwardError::BadQuery)?);
    let query: Arc<[u8]> = Arc::from(query);
    let mut tasks = JoinSet::new();
    for &upstream in upstreams {
        let (query, expect) = (query.clone(), expect.clone());
        tasks.spawn(async move {
            let res = ask(upstream, &query, &expect, tcp_client, timeouts.udp).await;
            (upstream, res)
        });
    }
    // Dropping the set (on return) aborts the upstreams still running.
    let race = async {
        let mut last = io::Error::other("no upstream answered");
        while let Some(joined) = tasks.join_next().await {
            match joined {
                Ok((_, Ok(answer))) => return Ok(answer),
                Ok((upstream, Err(err))) => {
                    debug!(%upstream, %err, "dns forward: upstream failed");
                    last = err;
                }
                Err(err) => last = io::Error::other(err),
            }
        }
        Err(ForwardError::Failed(last))
    };
    match timeout(timeouts.overall, race).await {
        Ok(result) => result,
        Err(_) => Err(ForwardError::Timeout(timeouts.overall)),
    }
}

/// What a matching answer carries: the query's ID and question (name compared without case).
#[derive(Debug, PartialEq, Eq)]
struct Expect {
    id: u16,
    question: Option<(String, u16, u16)>,
}

impl Expect {
    fn of(msg: &[u8]) -> Option<Expect> {
        let mut decoder = BinDecoder::new(msg);
        let header = Header::read(&mut decoder).ok()?;
        let question = if header.counts.queries == 0 {
            None
        } else {
            let q = Query::read(&mut decoder).ok()?;
            Some((
                key_of(q.name()),
                u16::from(q.query_type()),
                u16::from(q.query_class()),
            ))
        };
        Some(Expect {
            id: header.metadata.id,
            question,
        })
    }

    fn matches(&self, answer: &[u8]) -> bool {
        Expect::of(answer).is_some_and(|got| got == *self)
    }
}

fn truncated(answer: &[u8]) -> bool {
    answer.get(2).is_some_and(|b| b & 0x02 != 0)
}

/// One upstream: UDP, then TCP if the answer is truncated or UDP fails or stays silent.
async fn ask(
    upstream: SocketAddr,
    query: &[u8],
    expect: &Expect,
    tcp_client: bool,
    udp_silence: Duration,
) -> io::Result<Vec<u8>> {
    if !tcp_client {
        match timeout(udp_silence, ask_udp(upstream, query, expect)).await {
            Ok(Ok(answer)) if !truncated(&answer) => return Ok(answer),
            Ok(Ok(_)) => debug!(%upstream, "dns forward: truncated over UDP, asking over TCP"),
            Ok(Err(err)) => debug!(%upstream, %err, "dns forward: UDP failed, asking over TCP"),
            Err(_) => debug!(%upstream, "dns forward: UDP silent, asking over TCP"),
        }
    }
    ask_tcp(upstream, query, expect).await
}

async fn ask_udp(upstream: SocketAddr, query: &[u8], expect: &Expect) -> io::Result<Vec<u8>> {
    let local: SocketAddr = match upstream {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let sock = UdpSocket::bind(local).await?;
    // Connected: the kernel drops datagrams from anyone else.
    sock.connect(upstream).await?;
    sock.send(query).await?;
    // One byte more than allowed tells an oversized datagram from one that just fits.
    let mut buf = vec![0u8; MAX_UDP_ANSWER + 1];
    loop {
        let n = sock.recv(&mut buf).await?;
        if n > MAX_UDP_ANSWER {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "UDP answer too long",
            ));
        }
        let answer = &buf[..n];
        if expect.matches(answer) {
            return Ok(answer.to_vec());
        }
        // A stale or forged answer: keep listening for ours.
        debug!(%upstream, len = n, "dns forward: ignored a UDP answer to another query");
    }
}

async fn ask_tcp(upstream: SocketAddr, query: &[u8], expect: &Expect) -> io::Result<Vec<u8>> {
    let len = u16::try_from(query.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "query too long"))?;
    let mut stream = TcpStream::connect(upstream).await?;
    let mut framed = Vec::with_capacity(query.len() + 2);
    framed.extend_from_slice(&len.to_be_bytes());
    framed.extend_from_slice(query);
    stream.write_all(&framed).await?;
    let mut len = [0u8; 2];
    stream.read_exact(&mut len).await?;
    // The u16 prefix bounds the answer at 64 KiB.
    let mut answer = vec![0u8; usize::from(u16::from_be_bytes(len))];
    stream.read_exact(&mut answer).await?;
    if expect.matches(&answer) {
        Ok(answer)
    } else {
        Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "TCP answer to another query",
        ))
    }
}

/// The `nameserver` lines of a resolv.conf text (port 53), without tern's own addresses and
/// duplicates; IPv6 zones (`fe80::1%eth0`) become scope IDs, unknown ones are skipped.
pub fn os_base_resolvers(resolv_conf: &str) -> Vec<SocketAddr> {
    let mut out = Vec::new();
    for line in resolv_conf.lines() {
        let mut words = line.split_whitespace();
        if words.next() != Some("nameserver") {
            continue;
        }
        let Some(addr) = words.next().and_then(parse_nameserver) else {
            continue;
        };
        if !is_ours(addr.ip()) && !out.contains(&addr) {
            out.push(addr);
        }
    }
    out
}

fn parse_nameserver(word: &str) -> Option<SocketAddr> {
    // Comments may follow without a space.
    let word = word.split(['#', ';']).next()?;
    let (ip, zone) = match word.split_once('%') {
        Some((ip, zone)) => (ip, Some(zone)),
        None => (word, None),
    };
    match ip.parse::<IpAddr>().ok()? {
        IpAddr::V4(v4) if zone.is_none() => Some(SocketAddr::new(v4.into(), DNS_PORT)),
        IpAddr::V4(_) => None,
        IpAddr::V6(v6) => {
            let scope = match zone {
                None => 0,
                Some(zone) => zone_index(zone)?,
            };
            Some(std::net::SocketAddrV6::new(v6, DNS_PORT, 0, scope).into())
        }
    }
}

fn zone_index(zone: &str) -> Option<u32> {
    zone.parse()
        .ok()
        .or_else(|| nix::net::if_::if_nametoindex(zone).ok())
}

fn is_ours(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4 == QUAD_100_V4,
        IpAddr::V6(v6) => v6 == QUAD_100_V6 || v6.to_ipv4_mapped() == Some(QUAD_100_V4),
    }
}

#[cfg(test)]
mod tests;
