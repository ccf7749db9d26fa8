//! A smoltcp device that is two bounded packet queues: what came in for the stack, what the
//! stack sends. The task around it moves packets between the queues and the TUN or WireGuard.

use smoltcp::phy::{self, Device, DeviceCapabilities, Medium};
use smoltcp::time::Instant;

use super::PacketQueue;

pub(super) struct QueueDevice {
    rx: PacketQueue,
    tx: PacketQueue,
    mtu: usize,
    limit: usize,
}

impl QueueDevice {
    pub(super) fn new(mtu: usize, limit: usize) -> Self {
        Self {
            rx: PacketQueue::new(),
            tx: PacketQueue::new(),
            mtu,
            limit,
        }
    }

    /// Queues a packet for the stack; false when the queue is full (the packet is dropped).
    pub(super) fn push_rx(&mut self, packet: &[u8]) -> bool {
        if self.rx.len() >= self.limit {
            return false;
        }
        self.rx.push_back(packet.to_vec());
        true
    }

    /// Everything the stack sent since the last call.
    pub(super) fn take_tx(&mut self) -> Vec<Vec<u8>> {
        self.tx.drain(..).collect()
    }
}

pub(super) struct RxToken(Vec<u8>);

impl phy::RxToken for RxToken {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

pub(super) struct TxToken<'a> {
    queue: &'a mut PacketQueue,
    limit: usize,
}

impl phy::TxToken for TxToken<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut packet = vec![0u8; len];
        let result = f(&mut packet);
        // Over the limit the packet is lost, as on a full NIC queue; TCP sends it again.
        if self.queue.len() < self.limit {
            self.queue.push_back(packet);
        }
        result
    }
}

impl Device for QueueDevice {
    type RxToken<'a> = RxToken;
    type TxToken<'a> = TxToken<'a>;

    fn receive(&mut self, _now: Instant) -> Option<(RxToken, TxToken<'_>)> {
        let packet = self.rx.pop_front()?;
        Some((
            RxToken(packet),
            TxToken {
                queue: &mut self.tx,
                limit: self.limit,
            },
        ))
    }

    fn transmit(&mut self, _now: Instant) -> Option<TxToken<'_>> {
        (self.tx.len() < self.limit).then_some(TxToken {
            queue: &mut self.tx,
            limit: self.limit,
        })
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ip;
        caps.max_transmission_unit = self.mtu;
        caps
    }
}
