//! A bandwidth limit shared by all data channels.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Longest single sleep, so a stop is noticed promptly whatever the rate.
const STEP: Duration = Duration::from_millis(20);

/// Paces senders so that, together, they stay under `rate` bytes per second.
pub struct RateLimiter {
    rate: u64,
    state: Mutex<(Instant, u64)>,
    stopped: AtomicBool,
}

impl RateLimiter {
    /// A limiter at `rate` bytes/s.
    pub fn new(rate: u64) -> Self {
        RateLimiter {
            rate: rate.max(1),
            state: Mutex::new((Instant::now(), 0)),
            stopped: AtomicBool::new(false),
        }
    }

    /// Accounts `bytes` and sleeps until sending them keeps the average under the rate.
    /// Returns false, at once, when the limiter was stopped (the migration is ending).
    pub fn take(&self, bytes: u64) -> bool {
        let due = {
            let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
            s.1 += bytes;
            s.0 + Duration::from_secs_f64(s.1 as f64 / self.rate as f64)
        };
        loop {
            if self.stopped.load(Ordering::Relaxed) {
                return false;
            }
            let left = due.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return true;
            }
            std::thread::sleep(left.min(STEP));
        }
    }

    /// Wakes every sender waiting on the limit; later waits return at once.
    pub fn stop(&self) {
        self.stopped.store(true, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn paces_to_the_rate() {
        let l = RateLimiter::new(10 << 20);
        let t = Instant::now();
        for _ in 0..4 {
            assert!(l.take(1 << 20));
        }
        let e = t.elapsed();
        assert!(e >= Duration::from_millis(350), "{e:?}");
    }

    #[test]
    fn a_stop_ends_a_long_wait_at_once() {
        let l = Arc::new(RateLimiter::new(1));
        let l2 = l.clone();
        let t = Instant::now();
        let waiter = std::thread::spawn(move || l2.take(1 << 30));
        std::thread::sleep(Duration::from_millis(50));
        l.stop();
        assert!(!waiter.join().unwrap());
        assert!(t.elapsed() < Duration::from_secs(1));
    }
}
