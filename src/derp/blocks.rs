//! Fixed blocks of packet memory, reused once every packet cut from them is dropped.
//!
//! DERP packets travel as `Bytes` that share the block they were read or copied into: frames
//! cut from a connection's receive buffer, and the engine's copies of packets queued for a
//! region. While packets of a block are still held, the block cannot take new bytes in place,
//! and a plain `BytesMut` then allocates a fresh block; glibc gives freed blocks back to the
//! kernel and faults new ones in again. At 2.7 Gbit/s over DERP the receiving daemon took
//! 30,000 page faults a second in its receive buffer alone. [`Blocks`] moves on to a block whose
//! packets are gone instead, and allocates only when every block is still held.

use std::time::{Duration, Instant};

use bytes::BytesMut;

/// Spare blocks are let go after this long without a move to another block: the traffic that
/// needed them has ended.
const KEEP_SPARES_FOR: Duration = Duration::from_secs(1);

/// The block bytes are appended to, and blocks waiting for their packets to be dropped.
#[derive(Debug)]
pub struct Blocks {
    current: BytesMut,
    /// Blocks left while packets cut from them were still held; empty, and taken again once
    /// those packets are gone.
    spares: Vec<BytesMut>,
    block: usize,
    max_spares: usize,
    /// Whether `current` is one of our blocks (not the initial bytes, not grown past a block).
    current_is_block: bool,
    last_move: Option<Instant>,
    #[cfg(test)]
    allocated: u64,
}

impl Blocks {
    /// Blocks of `block` bytes that start with `initial` (e.g. bytes a handshake read ahead),
    /// keeping at most `max_spares` besides the current one.
    pub fn new(initial: BytesMut, block: usize, max_spares: usize) -> Self {
        Self {
            current: initial,
            spares: Vec::new(),
            block,
            max_spares,
            current_is_block: false,
            last_move: None,
            #[cfg(test)]
            allocated: 0,
        }
    }

    /// The bytes appended and not yet split off.
    pub fn bytes(&mut self) -> &mut BytesMut {
        &mut self.current
    }

    /// Makes room for `need` more bytes after those not yet split off, in a block already
    /// allocated where one is free.
    pub fn make_room(&mut self, need: usize, now: Instant) {
        if self.current.try_reclaim(need) {
            return;
        }
        let want = self.current.len() + need;
        let next = match self.spares.iter_mut().position(|s| s.try_reclaim(want)) {
            Some(free) => self.spares.swap_remove(free),
            None if self.spares.len() < self.max_spares => self.allocate(want),
            None => {
                // Every block is held: a block of its own, as `reserve` would make, that is
                // not kept once its packets are gone.
                self.count_allocation();
                self.current.reserve(need);
                self.current_is_block = false;
                return;
            }
        };
        self.move_to(next, now);
    }

    fn allocate(&mut self, want: usize) -> BytesMut {
        self.count_allocation();
        BytesMut::with_capacity(want.max(self.block))
    }

    #[cfg(test)]
    fn count_allocation(&mut self) {
        self.allocated += 1;
    }
    #[cfg(not(test))]
    fn count_allocation(&mut self) {}

    /// Appends to `next` from now on; the current block waits among the spares.
    fn move_to(&mut self, mut next: BytesMut, now: Instant) {
        // Bytes not split off yet (the start of a frame) move along.
        next.extend_from_slice(&self.current);
        let grown = next.capacity() > 2 * self.block;
        let mut left = std::mem::replace(&mut self.current, next);
        left.clear();
        // Neither the initial bytes nor a block grown for one large packet are kept.
        if self.current_is_block && self.spares.len() < self.max_spares {
            self.spares.push(left);
        }
        self.current_is_block = !grown;
        self.last_move = Some(now);
    }

    /// Frees the spare blocks once nothing moved to another block for a while: the traffic
    /// that needed them has ended.
    pub fn let_spares_go_if_idle(&mut self, now: Instant) {
        if !self.spares.is_empty()
            && self
                .last_move
                .is_none_or(|t| now.saturating_duration_since(t) >= KEEP_SPARES_FOR)
        {
            self.spares = Vec::new();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    const BLOCK: usize = 4096;

    /// Appends `n` bytes of `fill` after room for a whole block was made, as the DERP reader
    /// does (spares let go first when idle).
    fn read(blocks: &mut Blocks, fill: u8, n: usize, now: Instant) {
        blocks.let_spares_go_if_idle(now);
        blocks.make_room(BLOCK, now);
        let room = blocks.bytes().capacity() - blocks.bytes().len();
        assert!(room >= BLOCK, "make_room left {room} bytes, not a block");
        blocks.bytes().extend_from_slice(&vec![fill; n]);
    }

    /// Takes `n` bytes off the front as a packet somebody holds.
    fn take(blocks: &mut Blocks, n: usize) -> Bytes {
        blocks.bytes().split_to(n).freeze()
    }

    #[test]
    fn a_block_is_used_again_once_its_packets_are_dropped() {
        let now = Instant::now();
        let mut blocks = Blocks::new(BytesMut::new(), BLOCK, 2);
        read(&mut blocks, 1, 3000, now);
        let first = take(&mut blocks, 3000);
        let first_block = first.as_ptr();
        // `first` is still held: the next read goes to a new block.
        read(&mut blocks, 2, 3000, now);
        let second = take(&mut blocks, 3000);
        assert_ne!(second.as_ptr(), first_block);
        let allocated = blocks.allocated;
        drop(first);
        // `first` is gone, `second` held: the next read takes the first block back.
        read(&mut blocks, 3, 3000, now);
        let third = take(&mut blocks, 3000);
        assert_eq!(third.as_ptr(), first_block);
        assert_eq!(blocks.allocated, allocated);
        assert!(third.iter().all(|&b| b == 3));
        assert!(second.iter().all(|&b| b == 2));
    }

    #[test]
    fn steady_reads_allocate_nothing_once_the_blocks_exist() {
        let now = Instant::now();
        let mut blocks = Blocks::new(BytesMut::new(), BLOCK, 3);
        let mut held = std::collections::VecDeque::new();
        for round in 0..200u32 {
            read(&mut blocks, round as u8, 2500, now);
            held.push_back(take(&mut blocks, 2500));
            // The consumer lags two reads behind.
            if held.len() > 2 {
                held.pop_front();
            }
        }
        assert!(
            blocks.allocated <= 3,
            "allocated {} blocks for 200 reads",
            blocks.allocated
        );
    }

    #[test]
    fn packets_copied_in_share_blocks_that_are_reused() {
        let now = Instant::now();
        let mut blocks = Blocks::new(BytesMut::new(), BLOCK, 3);
        let mut queued = std::collections::VecDeque::new();
        for i in 0..1000u32 {
            let packet = vec![i as u8; 1000 + (i as usize % 300)];
            blocks.make_room(packet.len(), now);
            blocks.bytes().extend_from_slice(&packet);
            queued.push_back((packet, blocks.bytes().split().freeze()));
            // A writer sends what is more than four packets old.
            while queued.len() > 4 {
                let (packet, copy) = queued.pop_front().unwrap();
                assert_eq!(&copy[..], &packet[..]);
            }
        }
        assert!(blocks.allocated <= 4, "{} blocks", blocks.allocated);
    }

    #[test]
    fn a_partial_frame_moves_with_the_reader() {
        let now = Instant::now();
        let mut blocks = Blocks::new(BytesMut::new(), BLOCK, 2);
        read(&mut blocks, 7, 3000, now);
        let held = take(&mut blocks, 2000);
        // 1000 bytes of an unfinished frame stay; the block has no room for a whole read.
        read(&mut blocks, 8, 500, now);
        assert_ne!(blocks.bytes().as_ptr(), held.as_ptr().wrapping_add(2000));
        let rest = blocks.bytes().split().freeze();
        assert_eq!(rest.len(), 1500);
        assert!(rest[..1000].iter().all(|&b| b == 7));
        assert!(rest[1000..].iter().all(|&b| b == 8));
    }

    #[test]
    fn when_every_block_is_held_it_still_reads_and_keeps_at_most_max_spares() {
        let now = Instant::now();
        let mut blocks = Blocks::new(BytesMut::new(), BLOCK, 2);
        let mut held = Vec::new();
        for round in 0..10u8 {
            read(&mut blocks, round, 3000, now);
            held.push(take(&mut blocks, 3000));
        }
        assert!(blocks.spares.len() <= 2);
        for (round, packet) in held.iter().enumerate() {
            assert!(packet.iter().all(|&b| b == round as u8));
        }
        assert!(blocks.allocated >= 8);
    }

    #[test]
    fn a_block_grown_for_a_large_frame_is_not_kept() {
        let now = Instant::now();
        let mut blocks = Blocks::new(BytesMut::new(), BLOCK, 2);
        // A frame of five blocks arrives over several reads.
        for _ in 0..5 {
            read(&mut blocks, 9, BLOCK, now);
        }
        let large = take(&mut blocks, 5 * BLOCK);
        read(&mut blocks, 1, 100, now);
        drop(large);
        read(&mut blocks, 2, 100, now);
        assert!(!blocks.spares.is_empty());
        assert!(blocks.spares.iter().all(|s| s.capacity() <= 2 * BLOCK));
    }

    #[test]
    fn spares_are_let_go_a_second_after_the_last_move() {
        let start = Instant::now();
        let mut blocks = Blocks::new(BytesMut::new(), BLOCK, 3);
        let mut held = Vec::new();
        for _ in 0..4 {
            read(&mut blocks, 1, 3000, start);
            held.push(take(&mut blocks, 3000));
        }
        assert_eq!(blocks.spares.len(), 3);
        held.clear();
        // Traffic goes on in the current block: the spares stay for now.
        read(&mut blocks, 2, 100, start + Duration::from_millis(500));
        drop(take(&mut blocks, 100));
        assert_eq!(blocks.spares.len(), 3);
        read(&mut blocks, 2, 100, start + KEEP_SPARES_FOR);
        assert!(blocks.spares.is_empty());
    }

    #[test]
    fn spares_are_let_go_when_asked_after_traffic_stopped() {
        let start = Instant::now();
        let mut blocks = Blocks::new(BytesMut::new(), BLOCK, 3);
        let held: Vec<Bytes> = (0..3)
            .map(|_| {
                read(&mut blocks, 1, 3000, start);
                take(&mut blocks, 3000)
            })
            .collect();
        drop(held);
        blocks.let_spares_go_if_idle(start + Duration::from_millis(999));
        assert_eq!(blocks.spares.len(), 2);
        blocks.let_spares_go_if_idle(start + KEEP_SPARES_FOR);
        assert!(blocks.spares.is_empty());
    }

    #[test]
    fn handshake_bytes_read_ahead_are_kept() {
        let mut blocks = Blocks::new(BytesMut::from(&b"ahead"[..]), BLOCK, 2);
        read(&mut blocks, b'!', 1, Instant::now());
        assert_eq!(&blocks.bytes()[..], b"ahead!");
    }
}
