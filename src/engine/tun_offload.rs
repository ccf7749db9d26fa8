//! The engine's side of TUN offloads ([`crate::vnet`]): frames read from the TUN are split into
//! packets for WireGuard, decrypted packets wait in the coalescer until the end of the wakeup
//! (or until it is full) and go to the TUN as super-packets.

use crate::vnet::{self, Coalescer};

/// Offload state and counters; `enabled` only with a kernel TUN that accepted offloads.
#[derive(Default)]
pub(super) struct TunOffload {
    pub(super) enabled: bool,
    coalescer: Coalescer,
    counters: OffloadCounters,
}

#[derive(Debug, Default, Clone, Copy)]
struct OffloadCounters {
    /// TCP super-packets read from the TUN, and the packets they were cut into.
    super_packets_read: u64,
    segments_split: u64,
    /// UDP super-packets (USO) read from the TUN, and the datagrams they were cut into.
    udp_super_packets_read: u64,
    datagrams_split: u64,
    /// Frames whose virtio-net header or headers we could not take apart (dropped).
    frames_refused: u64,
    /// Decrypted packets given to the coalescer, and the writes they took.
    packets_to_tun: u64,
    tun_writes: u64,
    /// Writes that were super-packets, and those of them that joined UDP datagrams (USO).
    super_packets_written: u64,
    udp_super_packets_written: u64,
}

impl TunOffload {
    /// Offloads on (`enabled`), and UDP datagrams joined too when the TUN takes UDP
    /// super-packets (`uso`).
    pub(super) fn enable(&mut self, enabled: bool, uso: bool) {
        self.enabled = enabled;
        self.coalescer.set_udp(enabled && uso);
    }

    /// Counts what [`vnet::split`] made of one frame read from the TUN.
    pub(super) fn note_split(&mut self, result: Result<vnet::Split, vnet::VnetError>) {
        match result {
            Ok(s) if s.packets > 1 && s.gso == vnet::GsoType::UdpL4 => {
                self.counters.udp_super_packets_read += 1;
                self.counters.datagrams_split += s.packets as u64;
            }
            Ok(s) if s.packets > 1 => {
                self.counters.super_packets_read += 1;
                self.counters.segments_split += s.packets as u64;
            }
            Ok(_) => {}
            Err(e) => {
                self.counters.frames_refused += 1;
                tracing::debug!(error = %e, "TUN frame dropped");
            }
        }
    }

    /// Queues a decrypted packet; true when the queue should be written out now.
    pub(super) fn push(&mut self, packet: &[u8]) -> bool {
        self.counters.packets_to_tun += 1;
        self.coalescer.push(packet);
        self.coalescer.is_full()
    }

    /// The next frame to write (virtio-net header first, in parts); `None` when all are out.
    pub(super) fn next_frame(&mut self) -> Option<vnet::coalesce::Output<'_>> {
        let frame = self.coalescer.next_output()?;
        self.counters.tun_writes += 1;
        if frame.joined() {
            self.counters.super_packets_written += 1;
        }
        if frame.joined_udp() {
            self.counters.udp_super_packets_written += 1;
        }
        Some(frame)
    }

    /// Counters by name for status (empty when offloads are off).
    pub(super) fn named(&self) -> Vec<(&'static str, u64)> {
        if !self.enabled {
            return Vec::new();
        }
        let c = &self.counters;
        vec![
            ("super_packets_read", c.super_packets_read),
            ("segments_split", c.segments_split),
            ("udp_super_packets_read", c.udp_super_packets_read),
            ("datagrams_split", c.datagrams_split),
            ("frames_refused", c.frames_refused),
            ("packets_to_tun", c.packets_to_tun),
            ("tun_writes", c.tun_writes),
            ("super_packets_written", c.super_packets_written),
            ("udp_super_packets_written", c.udp_super_packets_written),
        ]
    }
}
