//! Convergence: after each precopy pass, decide whether to send another pass, throttle the
//! vCPUs, wait for the destination, or switch over. A pure function of what was measured,
//! so every rule has a unit test.

use std::time::Duration;

/// Passes precopy may add once under the downtime limit, while they keep halving the dirty
/// set (each costs at most about the limit in total time).
pub const MAX_EXTRA_PASSES: u32 = 8;
/// Passes at the highest throttle before switching over without meeting the limit.
pub const MAX_PASSES_AT_FULL_THROTTLE: u32 = 5;
/// The highest throttle, percent.
pub const MAX_THROTTLE: u8 = 99;
/// Passes smaller than this are latency-bound and say little about the link.
const MIN_BANDWIDTH_SAMPLE: u64 = 4 << 20;

/// Fixed inputs of the policy.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// The downtime to aim for.
    pub downtime: Duration,
    /// Throttle vCPUs when passes stop shrinking.
    pub auto_converge: bool,
    /// Bytes of device and vCPU state expected at the switchover.
    pub state_bytes: u64,
    /// Round trip to the destination (`Ping`/`Pong` during precopy).
    pub rtt: Duration,
    /// What loading the devices costs the destination inside the downtime
    /// ([`crate::device::load_estimate`]).
    pub device_load: Duration,
}

/// What one pass measured.
#[derive(Debug, Clone, Copy)]
pub struct PassSample {
    /// Bytes the pass sent.
    pub sent: u64,
    /// How long it took.
    pub duration: Duration,
    /// Bytes dirty at the sync after it.
    pub dirty: u64,
    /// How long that sync took.
    pub sync_time: Duration,
    /// Whether the destination has acknowledged its memory preparation (or needs none).
    pub destination_ready: bool,
}

/// What to do next.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Decision {
    /// Send the dirty pages in another pass.
    NextPass,
    /// Throttle the vCPUs to this percentage, then send another pass.
    Throttle(u8),
    /// Converged, but the destination is not ready: keep the dirty set small meanwhile.
    WaitForDestination,
    /// Pause and send the rest. `converged` is false when even full throttle could not get
    /// the estimate under the limit.
    Switchover {
        /// Whether the estimate met the limit.
        converged: bool,
    },
}

/// The policy's memory across passes.
#[derive(Debug, Clone, Default)]
pub struct Convergence {
    passes: u32,
    bandwidth: f64,
    not_shrinking: u32,
    throttle: u8,
    passes_at_max: u32,
    extra_passes: u32,
}

impl Convergence {
    /// A policy that has seen no pass yet.
    pub fn new() -> Self {
        Convergence::default()
    }

    /// Link bandwidth as last measured, bytes/s.
    pub fn bandwidth(&self) -> f64 {
        self.bandwidth
    }

    /// Current throttle, percent.
    pub fn throttle(&self) -> u8 {
        self.throttle
    }

    /// Estimated downtime if the switchover happened with `dirty` bytes left.
    pub fn estimate(&self, limits: &Limits, dirty: u64, sync_time: Duration) -> Duration {
        let bytes = dirty.saturating_add(limits.state_bytes) as f64;
        Duration::from_secs_f64(bytes / self.bandwidth.max(1.0))
            + sync_time
            + limits.rtt
            + limits.device_load
    }

    /// Takes a finished pass into account and decides what comes next.
    pub fn after_pass(&mut self, limits: &Limits, s: &PassSample) -> Decision {
        self.passes += 1;
        let secs = s.duration.as_secs_f64().max(1e-6);
        if s.sent >= MIN_BANDWIDTH_SAMPLE || self.bandwidth == 0.0 {
            self.bandwidth = (s.sent.max(1) as f64 / secs).max(1.0);
        }
        let estimate = self.estimate(limits, s.dirty, s.sync_time);
        if estimate <= limits.downtime {
            return self.under_limit(s);
        }
        if s.dirty == 0 {
            // Only fixed costs (state, sync, round trip) are left: no pass can lower them.
            return if s.destination_ready {
                Decision::Switchover { converged: false }
            } else {
                Decision::WaitForDestination
            };
        }
        if self.throttle >= MAX_THROTTLE {
            self.passes_at_max += 1;
            if self.passes_at_max >= MAX_PASSES_AT_FULL_THROTTLE && s.destination_ready {
                return Decision::Switchover { converged: false };
            }
        }
        self.auto_converge(limits, s)
    }

    /// Under the limit: another pass costs at most about the limit in total time, and while
    /// passes still halve the dirty set each one halves the downtime.
    fn under_limit(&mut self, s: &PassSample) -> Decision {
        let shrinking = s.dirty > 0 && s.dirty.saturating_mul(2) <= s.sent;
        if shrinking && self.extra_passes < MAX_EXTRA_PASSES {
            self.extra_passes += 1;
            return Decision::NextPass;
        }
        if s.destination_ready {
            Decision::Switchover { converged: true }
        } else {
            Decision::WaitForDestination
        }
    }

    /// As QEMU's auto-converge: two passes in a row where the guest dirtied more than half
    /// of what was sent means precopy is not catching up; throttle 20%, then 10% more.
    fn auto_converge(&mut self, limits: &Limits, s: &PassSample) -> Decision {
        if !limits.auto_converge || self.passes < 2 {
            return Decision::NextPass;
        }
        if s.dirty > s.sent / 2 {
            self.not_shrinking += 1;
        } else {
            self.not_shrinking = 0;
        }
        if self.not_shrinking < 2 || self.throttle >= MAX_THROTTLE {
            return Decision::NextPass;
        }
        self.not_shrinking = 0;
        self.throttle = if self.throttle == 0 {
            20
        } else {
            (self.throttle + 10).min(MAX_THROTTLE)
        };
        Decision::Throttle(self.throttle)
    }
}

/// What a data channel has measured about one way of sending its pages (`--compress
/// auto`): sending them as they are is the way with no cost and a ratio of 1.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Way {
    /// Copying and compressing, ns per raw byte (0 for raw pages).
    pub cost_ns_per_byte: f64,
    /// Bytes sent per raw byte.
    pub ratio: f64,
}

/// The cheapest way per raw byte, given what writing a byte to the socket costs
/// (`wire_ns_per_byte`: the link's rate once it is the bottleneck, the copy into the
/// kernel when it is not): compressing pays when its cost plus the wire time of what is
/// left is below the wire time of the raw byte. Returns the index into `ways`.
pub fn cheapest(ways: &[Way], wire_ns_per_byte: f64) -> usize {
    let cost = |w: &Way| w.cost_ns_per_byte + w.ratio * wire_ns_per_byte;
    ways.iter()
        .enumerate()
        .min_by(|a, b| cost(a.1).total_cmp(&cost(b.1)))
        .map_or(0, |(i, _)| i)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MB: u64 = 1 << 20;

    fn limits(auto: bool) -> Limits {
        Limits {
            downtime: Duration::from_millis(50),
            auto_converge: auto,
            state_bytes: 0,
            rtt: Duration::ZERO,
            device_load: Duration::ZERO,
        }
    }

    /// A pass that sent `sent` MiB in `ms` and left `dirty` MiB dirty.
    fn pass(sent: u64, ms: u64, dirty: u64, ready: bool) -> PassSample {
        PassSample {
            sent: sent * MB,
            duration: Duration::from_millis(ms),
            dirty: dirty * MB,
            sync_time: Duration::ZERO,
            destination_ready: ready,
        }
    }

    #[test]
    fn switches_over_once_under_the_limit_and_no_longer_shrinking() {
        let mut c = Convergence::new();
        // 1 GiB/s: 1024 MiB in 1 s; 10 MiB dirty = 10 ms, under 50 ms, and shrinking.
        assert_eq!(
            c.after_pass(&limits(true), &pass(1024, 1000, 10, true)),
            Decision::NextPass
        );
        // 10 MiB sent, 8 MiB dirty again: not halving any more.
        assert_eq!(
            c.after_pass(&limits(true), &pass(10, 10, 8, true)),
            Decision::Switchover { converged: true }
        );
    }

    #[test]
    fn extra_passes_are_bounded() {
        let mut c = Convergence::new();
        c.after_pass(&limits(true), &pass(1024, 1000, 1024, true));
        let mut extra = 0;
        loop {
            // Always halving: only the extra-pass budget ends it.
            match c.after_pass(&limits(true), &pass(8, 8, 2, true)) {
                Decision::NextPass => extra += 1,
                Decision::Switchover { converged: true } => break,
                d => panic!("{d:?}"),
            }
        }
        assert_eq!(extra, MAX_EXTRA_PASSES);
    }

    #[test]
    fn waits_for_a_destination_that_is_not_ready() {
        let mut c = Convergence::new();
        c.after_pass(&limits(true), &pass(1024, 1000, 30, false));
        assert_eq!(
            c.after_pass(&limits(true), &pass(30, 30, 20, false)),
            Decision::WaitForDestination
        );
        assert_eq!(
            c.after_pass(&limits(true), &pass(20, 20, 15, true)),
            Decision::Switchover { converged: true }
        );
    }

    #[test]
    fn throttles_when_passes_stop_shrinking_then_steps_up() {
        let mut c = Convergence::new();
        // 100 MiB/s link, guest dirties as much as is sent: never under 50 ms.
        let p = pass(100, 1000, 100, true);
        let l = limits(true);
        assert_eq!(c.after_pass(&l, &p), Decision::NextPass); // pass 1: too early
        assert_eq!(c.after_pass(&l, &p), Decision::NextPass); // 1st not shrinking
        assert_eq!(c.after_pass(&l, &p), Decision::Throttle(20)); // 2nd
        assert_eq!(c.after_pass(&l, &p), Decision::NextPass);
        assert_eq!(c.after_pass(&l, &p), Decision::Throttle(30));
        assert_eq!(c.throttle(), 30);
        // A shrinking pass resets the count.
        assert_eq!(
            c.after_pass(&l, &pass(100, 1000, 40, true)),
            Decision::NextPass
        );
        assert_eq!(c.after_pass(&l, &p), Decision::NextPass);
        assert_eq!(c.after_pass(&l, &p), Decision::Throttle(40));
    }

    #[test]
    fn gives_up_at_full_throttle_only_when_the_destination_is_ready() {
        let mut c = Convergence::new();
        let l = limits(true);
        let p = pass(100, 1000, 100, false);
        let mut throttles = 0;
        while c.throttle() < MAX_THROTTLE {
            if let Decision::Throttle(_) = c.after_pass(&l, &p) {
                throttles += 1;
            }
        }
        assert_eq!(throttles, 9, "20, 30, ... 90, 99");
        for _ in 0..10 {
            assert_ne!(
                c.after_pass(&l, &p),
                Decision::Switchover { converged: false },
                "destination not ready"
            );
        }
        assert_eq!(
            c.after_pass(&l, &pass(100, 1000, 100, true)),
            Decision::Switchover { converged: false }
        );
    }

    #[test]
    fn fixed_costs_over_the_limit_do_not_keep_precopy_going() {
        // A 100 ms round trip against a 50 ms limit and nothing dirty: another pass cannot
        // help, so switch over (or wait for the destination), never spin on empty passes.
        let l = Limits {
            rtt: Duration::from_millis(100),
            ..limits(true)
        };
        let mut c = Convergence::new();
        assert_eq!(
            c.after_pass(&l, &pass(1024, 1000, 0, false)),
            Decision::WaitForDestination
        );
        assert_eq!(
            c.after_pass(&l, &pass(0, 1, 0, true)),
            Decision::Switchover { converged: false }
        );
    }

    #[test]
    fn without_auto_converge_it_never_throttles() {
        let mut c = Convergence::new();
        let p = pass(100, 1000, 100, true);
        for _ in 0..20 {
            assert_eq!(c.after_pass(&limits(false), &p), Decision::NextPass);
        }
    }

    #[test]
    fn small_passes_do_not_replace_the_measured_bandwidth() {
        let mut c = Convergence::new();
        c.after_pass(&limits(true), &pass(1024, 1000, 500, true));
        let bw = c.bandwidth();
        // 1 MiB in 100 ms looks like 10 MiB/s but is latency, not the link.
        c.after_pass(&limits(true), &pass(1, 100, 1, true));
        assert_eq!(c.bandwidth(), bw);
    }

    #[test]
    fn the_estimate_counts_state_sync_and_round_trip() {
        let mut c = Convergence::new();
        c.after_pass(&limits(true), &pass(1000, 1000, 999, true)); // 1000 MiB/s
        let l = Limits {
            state_bytes: 10 * MB,
            rtt: Duration::from_millis(3),
            ..limits(true)
        };
        let e = c.estimate(&l, 20 * MB, Duration::from_millis(2));
        assert!((e.as_secs_f64() - 0.035).abs() < 1e-6, "{e:?}");
        let l = Limits {
            device_load: Duration::from_millis(20),
            ..l
        };
        let e = c.estimate(&l, 20 * MB, Duration::from_millis(2));
        assert!((e.as_secs_f64() - 0.055).abs() < 1e-6, "{e:?}");
    }

    #[test]
    fn compression_pays_only_where_the_link_is_the_bottleneck() {
        let raw = Way {
            cost_ns_per_byte: 0.0,
            ratio: 1.0,
        };
        let zstd = Way {
            cost_ns_per_byte: 1.0,
            ratio: 0.25,
        };
        let lz4 = Way {
            cost_ns_per_byte: 0.2,
            ratio: 0.5,
        };
        let ways = [raw, lz4, zstd];
        // 1 Gbit/s is 8 ns per byte: zstd's better ratio wins.
        assert_eq!(cheapest(&ways, 8.0), 2);
        // 10 Gbit/s, 0.8 ns per byte: lz4 is cheaper than both.
        assert_eq!(cheapest(&ways, 0.8), 1);
        // Loopback at 0.3 ns per byte: raw.
        assert_eq!(cheapest(&ways, 0.3), 0);
        // Incompressible data never pays.
        let useless = Way {
            cost_ns_per_byte: 0.2,
            ratio: 1.0,
        };
        assert_eq!(cheapest(&[raw, useless], 8.0), 0);
    }
}
