//! A bandwidth limit shared by all data channels.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Paces senders so that, together, they stay under `rate` bytes per second.
pub struct RateLimiter {
    rate: u64,
    state: Mutex<(Instant, u64)>,
}

impl RateLimiter {
    /// A limiter at `rate` bytes/s.
    pub fn new(rate: u64) -> Self {
        RateLimiter {
            rate: rate.max(1),
            state: Mutex::new((Instant::now(), 0)),
        }
    }

    /// Accounts `bytes` and sleeps until sending them keeps the average under the rate.
    pub fn take(&self, bytes: u64) {
        let wait = {
            let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
            s.1 += bytes;
            let due = Duration::from_secs_f64(s.1 as f64 / self.rate as f64);
            due.saturating_sub(s.0.elapsed())
        };
        if !wait.is_zero() {
            std::thread::sleep(wait);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paces_to_the_rate() {
        let l = RateLimiter::new(10 << 20);
        let t = Instant::now();
        for _ in 0..4 {
            l.take(1 << 20);
        }
        let e = t.elapsed();
        assert!(e >= Duration::from_millis(350), "{e:?}");
    }
}
