//! UDP segmentation offloads for WireGuard.
//!
//! Sending (GSO): consecutive datagrams to the same address with the same size go to the kernel
//! as one buffer and one `sendmsg` with a `UDP_SEGMENT` control message. The kernel (or the NIC)
//! cuts it into datagrams as late as it can, so one skb instead of dozens crosses the stack; on a
//! veth path (the lab) the whole forwarding path runs once per batch instead of once per packet.
//! [`GsoBatch`] is the pure part (which datagrams may share a send); [`send`] is the syscall. A
//! kernel or device without UDP GSO fails the first batched send with an error other than
//! `WouldBlock`; the caller then sends that batch one datagram at a time and stops batching.
//!
//! Receiving (GRO): with `UDP_GRO` on, the kernel may hand one `recvmsg` several datagrams of one
//! flow back to back, all `segment` bytes but the last, and says so in a `UDP_GRO` control
//! message ([`recv`]); [`segments`] splits them again.

use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;

use tokio::io::Interest;
use tokio::net::UdpSocket;

/// Linux `UDP_SEGMENT` and `UDP_GRO` (include/uapi/linux/udp.h), at level `IPPROTO_UDP`.
const UDP_SEGMENT: libc::c_int = 103;
const UDP_GRO: libc::c_int = 104;
/// The kernel's limit of segments per GSO send (`UDP_MAX_SEGMENTS`).
pub const MAX_SEGMENTS: usize = 64;
/// One send carries at most this many bytes (an IP packet's payload limit).
pub const MAX_BYTES: usize = 65_000;

/// Datagrams waiting to go to one address in one send: all `segment` bytes long except
/// possibly the last, which may be shorter (and then closes the batch).
#[derive(Debug, Default)]
pub struct GsoBatch {
    dest: Option<SocketAddr>,
    segment: usize,
    count: usize,
    closed: bool,
    buf: Vec<u8>,
}

/// A batch taken out of [`GsoBatch`], ready to send.
#[derive(Debug, PartialEq, Eq)]
pub struct Ready {
    pub dest: SocketAddr,
    /// Size of every datagram but the last.
    pub segment: usize,
    pub count: usize,
    pub bytes: Vec<u8>,
}

impl Ready {
    /// The datagrams one by one (for the fallback without GSO).
    pub fn datagrams(&self) -> impl Iterator<Item = &[u8]> {
        self.bytes.chunks(self.segment.max(1))
    }
}

impl GsoBatch {
    /// Adds `datagram` for `dest`. When it cannot join the waiting batch, that batch is
    /// returned (send it first) and a new one starts with `datagram`.
    pub fn push(&mut self, dest: SocketAddr, datagram: &[u8]) -> Option<Ready> {
        self.push_parts(dest, &[], datagram)
    }

    /// Like [`GsoBatch::push`] for the datagram `prefix ‖ payload` (a Geneve header in front of
    /// WireGuard), without building it first.
    pub fn push_parts(&mut self, dest: SocketAddr, prefix: &[u8], payload: &[u8]) -> Option<Ready> {
        let len = prefix.len() + payload.len();
        let joins = self.dest == Some(dest)
            && !self.closed
            && len != 0
            && len <= self.segment
            && self.count < MAX_SEGMENTS
            && self.buf.len() + len <= MAX_BYTES;
        if joins {
            self.buf.extend_from_slice(prefix);
            self.buf.extend_from_slice(payload);
            self.count += 1;
            self.closed = len < self.segment;
            return None;
        }
        let ready = self.take();
        self.dest = Some(dest);
        self.segment = len;
        self.count = 1;
        self.closed = false;
        self.buf.extend_from_slice(prefix);
        self.buf.extend_from_slice(payload);
        ready
    }

    /// The waiting batch, if any.
    pub fn take(&mut self) -> Option<Ready> {
        let dest = self.dest.take()?;
        let ready = Ready {
            dest,
            segment: self.segment,
            count: self.count,
            bytes: self.buf.clone(),
        };
        self.buf.clear();
        self.count = 0;
        Some(ready)
    }
}

/// Sends a batch of more than one datagram with `UDP_SEGMENT` in one `sendmsg`.
pub fn send(socket: &UdpSocket, ready: &Ready) -> io::Result<()> {
    let segment = u16::try_from(ready.segment)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "segment too large"))?;
    let addr = socket2::SockAddr::from(ready.dest);
    let mut iov = libc::iovec {
        iov_base: ready.bytes.as_ptr() as *mut libc::c_void,
        iov_len: ready.bytes.len(),
    };
    // A control buffer for one cmsg with a u16, aligned like `cmsghdr`.
    let mut control = [0u64; 4];
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE(std::mem::size_of::<u16>() as u32) } as usize;
    debug_assert!(space <= std::mem::size_of_val(&control));
    // SAFETY: zeroed msghdr is valid; every pointer set below outlives the sendmsg call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_name = addr.as_ptr() as *mut libc::c_void;
    msg.msg_namelen = addr.len();
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = space as _;
    // SAFETY: msg_control points at `space` writable bytes, enough for one u16 cmsg.
    unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        if cmsg.is_null() {
            return Err(io::Error::other(
                "no room for the UDP_SEGMENT control message",
            ));
        }
        (*cmsg).cmsg_level = libc::IPPROTO_UDP;
        (*cmsg).cmsg_type = UDP_SEGMENT;
        (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<u16>() as u32) as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<u16>(), segment);
    }
    // SAFETY: a valid socket fd and a fully initialised msghdr.
    let sent = unsafe { libc::sendmsg(socket.as_raw_fd(), &msg, libc::MSG_DONTWAIT) };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Asks the kernel to coalesce received datagrams (`UDP_GRO`); false where it cannot.
pub fn enable_gro(socket: &UdpSocket) -> bool {
    let on: libc::c_int = 1;
    // SAFETY: a valid socket fd and a c_int option value of the right size.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_UDP,
            UDP_GRO,
            std::ptr::addr_of!(on).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    rc == 0
}

/// What one [`recv`] read: `len` bytes from `from`, several datagrams of `segment` bytes each
/// (the last may be shorter) when the kernel coalesced them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Received {
    pub len: usize,
    pub from: SocketAddr,
    pub segment: Option<usize>,
}

/// The datagrams in `buf` as [`recv`] described them.
pub fn segments(buf: &[u8], segment: Option<usize>) -> impl Iterator<Item = &[u8]> {
    let size = segment.filter(|s| *s > 0).unwrap_or(buf.len().max(1));
    buf.chunks(size)
}

/// One non-blocking `recvmsg` (`WouldBlock` when nothing waits), with the `UDP_GRO` segment
/// size if the kernel coalesced datagrams. A datagram larger than `buf` is an error
/// (`InvalidData`): it is dropped rather than handed on truncated.
pub fn recv(socket: &UdpSocket, buf: &mut [u8]) -> io::Result<Received> {
    socket.try_io(Interest::READABLE, || recvmsg(socket.as_raw_fd(), buf))
}

fn recvmsg(fd: libc::c_int, buf: &mut [u8]) -> io::Result<Received> {
    // SAFETY: zeroed sockaddr_storage and msghdr are valid; every pointer set below outlives
    // the recvmsg call and the buffers have the lengths given.
    unsafe {
        let mut storage: libc::sockaddr_storage = std::mem::zeroed();
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        let mut control = [0u64; 8];
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_name = std::ptr::addr_of_mut!(storage).cast();
        msg.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = std::mem::size_of_val(&control) as _;
        let n = libc::recvmsg(fd, &mut msg, libc::MSG_DONTWAIT);
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        if msg.msg_flags & libc::MSG_TRUNC != 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "datagram truncated",
            ));
        }
        let mut segment = None;
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::IPPROTO_UDP && (*cmsg).cmsg_type == UDP_GRO {
                let size = std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast::<libc::c_int>());
                segment = usize::try_from(size).ok().filter(|s| *s > 0);
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
        let from = socket_addr(&storage).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                "datagram from an unknown address family",
            )
        })?;
        Ok(Received {
            len: n as usize,
            from,
            segment,
        })
    }
}

/// A `sockaddr_storage` filled by the kernel as a `SocketAddr` (IPv4 or IPv6).
fn socket_addr(storage: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match libc::c_int::from(storage.ss_family) {
        libc::AF_INET => {
            // SAFETY: the family says the storage holds a sockaddr_in.
            let sin =
                unsafe { &*(storage as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            let ip = std::net::Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
            Some(SocketAddr::new(ip.into(), u16::from_be(sin.sin_port)))
        }
        libc::AF_INET6 => {
            // SAFETY: the family says the storage holds a sockaddr_in6.
            let sin6 = unsafe {
                &*(storage as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>()
            };
            let ip = std::net::Ipv6Addr::from(sin6.sin6_addr.s6_addr);
            Some(SocketAddr::V6(std::net::SocketAddrV6::new(
                ip,
                u16::from_be(sin6.sin6_port),
                sin6.sin6_flowinfo,
                sin6.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn equal_datagrams_to_one_address_share_a_batch() {
        let mut b = GsoBatch::default();
        let to = addr("198.18.2.2:41641");
        assert_eq!(b.push(to, &[1; 100]), None);
        assert_eq!(b.push(to, &[2; 100]), None);
        // A shorter one may end the batch…
        assert_eq!(b.push(to, &[3; 40]), None);
        // …and nothing joins after it.
        let ready = b.push(to, &[4; 40]).expect("closed batch handed out");
        assert_eq!((ready.dest, ready.segment, ready.count), (to, 100, 3));
        let parts: Vec<&[u8]> = ready.datagrams().collect();
        assert_eq!(parts, vec![&[1u8; 100][..], &[2; 100], &[3; 40]]);
        // Another address or a longer datagram starts a new batch.
        let ready = b.push(addr("198.18.1.2:41641"), &[5; 40]).unwrap();
        assert_eq!((ready.segment, ready.count), (40, 1));
        let ready = b.push(addr("198.18.1.2:41641"), &[6; 41]).unwrap();
        assert_eq!(ready.dest, addr("198.18.1.2:41641"));
        let last = b.take().unwrap();
        assert_eq!((last.segment, last.count, last.bytes.len()), (41, 1, 41));
        assert_eq!(b.take(), None);
    }

    #[test]
    fn batches_stop_at_the_kernel_limits() {
        let mut b = GsoBatch::default();
        let to = addr("198.18.2.2:41641");
        let mut handed_out = Vec::new();
        for _ in 0..MAX_SEGMENTS + 1 {
            handed_out.extend(b.push(to, &[0; 10]));
        }
        assert_eq!(handed_out.len(), 1);
        assert_eq!(handed_out[0].count, MAX_SEGMENTS);
        let mut b = GsoBatch::default();
        let big = vec![0u8; 1500];
        let mut counts = Vec::new();
        for _ in 0..60 {
            counts.extend(b.push(to, &big).map(|r| r.bytes.len()));
        }
        assert!(counts.iter().all(|n| *n <= MAX_BYTES), "{counts:?}");
        assert_eq!(counts.first(), Some(&(MAX_BYTES / 1500 * 1500)));
    }

    /// A real GSO send on loopback arrives as separate datagrams (or the kernel refuses GSO,
    /// which the engine handles by falling back).
    #[tokio::test]
    async fn a_gso_send_arrives_as_separate_datagrams() {
        let rx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        rx.set_read_timeout(Some(std::time::Duration::from_secs(2)))
            .unwrap();
        let tx = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let mut b = GsoBatch::default();
        let to = rx.local_addr().unwrap();
        for i in 0..5u8 {
            assert_eq!(b.push(to, &[i; 300]), None);
        }
        assert_eq!(b.push(to, &[9; 7]), None);
        let ready = b.take().unwrap();
        if let Err(e) = send(&tx, &ready) {
            panic!("UDP GSO on loopback failed: {e}");
        }
        let mut got = Vec::new();
        let mut buf = [0u8; 2048];
        for _ in 0..6 {
            let n = rx.recv(&mut buf).expect("a segment");
            got.push(buf[..n].to_vec());
        }
        let want: Vec<Vec<u8>> = (0..5u8).map(|i| vec![i; 300]).chain([vec![9; 7]]).collect();
        assert_eq!(got, want);
    }

    /// GSO out, GRO in on loopback: the receiver reads the datagrams back, coalesced or not,
    /// with the sender's address, and `segments` splits them as sent.
    #[tokio::test]
    async fn gro_receive_splits_back_into_the_datagrams_sent() {
        let rx = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        assert!(enable_gro(&rx), "UDP_GRO refused on loopback");
        let tx = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let to = rx.local_addr().unwrap();
        let mut b = GsoBatch::default();
        for i in 0..4u8 {
            assert_eq!(b.push(to, &[i; 200]), None);
        }
        send(&tx, &b.take().unwrap()).expect("GSO send");
        let mut got: Vec<Vec<u8>> = Vec::new();
        let mut buf = vec![0u8; 65535];
        while got.len() < 4 {
            rx.readable().await.unwrap();
            let r = match recv(&rx, &mut buf) {
                Ok(r) => r,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => panic!("recv: {e}"),
            };
            assert_eq!(r.from, tx.local_addr().unwrap());
            got.extend(segments(&buf[..r.len], r.segment).map(<[u8]>::to_vec));
        }
        let want: Vec<Vec<u8>> = (0..4u8).map(|i| vec![i; 200]).collect();
        assert_eq!(got, want);
        assert_eq!(segments(&[1, 2, 3], None).count(), 1);
        assert_eq!(
            segments(&[1, 2, 3], Some(2)).collect::<Vec<_>>(),
            vec![&[1, 2][..], &[3]]
        );
    }
}
