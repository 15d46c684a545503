//! The pipes a balancer holds while it works (the other /proc readings are
//! in `pglb_testkit::proc`).

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use pglb_testkit::proc::pipe_count;

/// Runs `work` while sampling the pipe fds of `pid` every 100ms; returns its
/// result and the most pipe fds seen.
pub fn max_pipes_during<T>(pid: u32, work: impl FnOnce() -> T) -> (T, usize) {
    let done = AtomicBool::new(false);
    std::thread::scope(|s| {
        let sampler = s.spawn(|| {
            let mut most = 0;
            while !done.load(Ordering::Relaxed) {
                most = most.max(pipe_count(pid).unwrap_or(0));
                std::thread::sleep(Duration::from_millis(100));
            }
            most
        });
        let result = work();
        done.store(true, Ordering::Relaxed);
        (result, sampler.join().unwrap_or(0))
    })
}
