//! The client's per-region write queue (Go magicsock: 32 entries, the oldest dropped when
//! full): a fresh packet is worth more than a stale one, which TCP has likely retransmitted
//! already. One producer (the engine), one consumer (the region's task).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

/// Go's depth for a region's write queue.
pub const DEPTH: usize = 32;

struct Shared<T> {
    items: Mutex<Inner<T>>,
    ready: Notify,
}

struct Inner<T> {
    queue: VecDeque<T>,
    closed: bool,
}

/// The producing side; dropping it ends the consumer once the queue is empty.
pub struct Sender<T> {
    shared: Arc<Shared<T>>,
    depth: usize,
}

/// The consuming side.
pub struct Receiver<T> {
    shared: Arc<Shared<T>>,
}

/// A queue holding at most `depth` items.
pub fn channel<T>(depth: usize) -> (Sender<T>, Receiver<T>) {
    let shared = Arc::new(Shared {
        items: Mutex::new(Inner {
            queue: VecDeque::with_capacity(depth),
            closed: false,
        }),
        ready: Notify::new(),
    });
    (
        Sender {
            shared: shared.clone(),
            depth: depth.max(1),
        },
        Receiver { shared },
    )
}

impl<T> Sender<T> {
    /// Queues `item`; returns true when the oldest item was dropped to make room.
    pub fn push(&self, item: T) -> bool {
        let dropped = match self.shared.items.lock() {
            Ok(mut inner) => {
                let dropped = inner.queue.len() >= self.depth;
                if dropped {
                    inner.queue.pop_front();
                }
                inner.queue.push_back(item);
                dropped
            }
            Err(_) => true, // a consumer panicked while holding the lock: nothing is read
        };
        self.shared.ready.notify_one();
        dropped
    }
}

impl<T> Drop for Sender<T> {
    fn drop(&mut self) {
        if let Ok(mut inner) = self.shared.items.lock() {
            inner.closed = true;
        }
        self.shared.ready.notify_one();
    }
}

impl<T> Receiver<T> {
    /// The oldest item; `None` once the sender is gone and the queue is empty. Cancel-safe.
    pub async fn recv(&mut self) -> Option<T> {
        loop {
            {
                let mut inner = self.shared.items.lock().ok()?;
                if let Some(item) = inner.queue.pop_front() {
                    return Some(item);
                }
                if inner.closed {
                    return None;
                }
            }
            // A push between the check and this wait leaves a permit: no wakeup is lost.
            self.shared.ready.notified().await;
        }
    }

    /// The oldest item if one is waiting.
    pub fn try_recv(&mut self) -> Option<T> {
        self.shared.items.lock().ok()?.queue.pop_front()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_oldest_goes_when_full_and_the_end_is_seen() {
        let (tx, mut rx) = channel(3);
        assert!(!tx.push(1));
        assert!(!tx.push(2));
        assert!(!tx.push(3));
        assert!(tx.push(4), "full: 1 dropped");
        assert_eq!(rx.recv().await, Some(2));
        assert_eq!(rx.try_recv(), Some(3));
        assert_eq!(rx.recv().await, Some(4));
        assert_eq!(rx.try_recv(), None);
        tx.push(5);
        drop(tx);
        assert_eq!(rx.recv().await, Some(5), "queued items outlive the sender");
        assert_eq!(rx.recv().await, None);
    }

    #[tokio::test]
    async fn a_waiting_consumer_is_woken() {
        let (tx, mut rx) = channel(DEPTH);
        let consumer = tokio::spawn(async move { rx.recv().await });
        tokio::task::yield_now().await;
        tx.push(7u32);
        let got = tokio::time::timeout(std::time::Duration::from_secs(2), consumer)
            .await
            .expect("woken")
            .expect("task");
        assert_eq!(got, Some(7));
    }
}
