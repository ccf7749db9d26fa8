//! The tokio runtime of a long-running command (`tern daemon`, `tern derp`), sized by its
//! `--threads` flag.
//!
//! One thread is the default: the data path hands each packet between tasks (engine, DERP
//! reader and writer, the DERP server's per-client tasks), and on one thread those hand-offs
//! are plain function calls where a work-stealing pool wakes another thread through the kernel
//! for each burst. Measured on 2 cores (bench/README.md, issue 15): the DERP server forwards
//! ~20 % more packets per unit of CPU and the DERP path carries more, with the direct path
//! unchanged. More threads are for servers with many busy clients.

use std::io;

use tokio::runtime::{Builder, Runtime};

/// `threads`: 1 = one thread for everything; 0 = one worker per CPU; N = N workers.
pub fn build(threads: usize) -> io::Result<Runtime> {
    match threads {
        1 => Builder::new_current_thread().enable_all().build(),
        0 => Builder::new_multi_thread().enable_all().build(),
        n => Builder::new_multi_thread()
            .worker_threads(n)
            .enable_all()
            .build(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_thread_runs_tasks_on_the_calling_thread_and_more_use_workers() {
        let caller = std::thread::current().id();
        let single = build(1).unwrap();
        let ran_on =
            single.block_on(async { tokio::spawn(async { std::thread::current().id() }).await });
        assert_eq!(ran_on.unwrap(), caller);
        let pool = build(2).unwrap();
        assert_eq!(pool.metrics().num_workers(), 2);
        let ran_on =
            pool.block_on(async { tokio::spawn(async { std::thread::current().id() }).await });
        assert_ne!(ran_on.unwrap(), caller);
    }
}
