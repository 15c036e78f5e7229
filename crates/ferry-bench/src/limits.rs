//! The physical limits a migration is compared with, measured in the same run.
//!
//! Both figures vary a lot on this machine (a nested VM whose host reclaims idle memory),
//! so measure them next to the migrations they bound, not once and for all. [`CpuSample`]
//! tells whether other work on the machine was competing for its two CPUs meanwhile.

use std::hint::black_box;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::Instant;

use anyhow::{anyhow, Context, Result};

use crate::stats::median;

/// Size of every write and read in [`loopback_tcp_bandwidth`].
const IO_CHUNK: usize = 1 << 20;

/// Memory copy bandwidth in bytes/s: the median of `reps` copies of `bytes` between two
/// buffers that are written before timing (so page faults are not measured).
pub fn memcpy_bandwidth(bytes: usize, reps: usize) -> f64 {
    // Non-zero fills: zeroed allocations would map the shared zero page, not real memory.
    let src = vec![0x5au8; bytes];
    let mut dst = vec![0xa5u8; bytes];
    let mut rates: Vec<f64> = (0..reps.max(1))
        .map(|_| {
            let start = Instant::now();
            dst.copy_from_slice(black_box(&src));
            black_box(&mut dst);
            bytes as f64 / start.elapsed().as_secs_f64()
        })
        .collect();
    median(&mut rates)
}

/// Loopback TCP bandwidth in bytes/s: `connections` streams on 127.0.0.1, each with its
/// own sender and receiver thread moving `bytes_per_conn` in 1 MiB writes and reads.
/// Timed from when every connection is up until the last receiver has seen EOF.
pub fn loopback_tcp_bandwidth(connections: usize, bytes_per_conn: u64) -> Result<f64> {
    let connections = connections.max(1);
    let listener = TcpListener::bind("127.0.0.1:0").context("binding a loopback listener")?;
    let addr = listener.local_addr()?;
    // Senders and this thread meet here, so connection setup is outside the timing.
    let start = Arc::new(Barrier::new(connections + 1));

    let senders: Vec<_> = (0..connections)
        .map(|_| {
            let start = Arc::clone(&start);
            thread::spawn(move || -> Result<()> {
                let conn = TcpStream::connect(addr);
                // Always reach the barrier, or the others would wait forever.
                start.wait();
                let mut conn = conn?;
                let buf = vec![0x5au8; IO_CHUNK];
                let mut left = bytes_per_conn;
                while left > 0 {
                    let n = left.min(IO_CHUNK as u64) as usize;
                    conn.write_all(&buf[..n])?;
                    left -= n as u64;
                }
                conn.shutdown(Shutdown::Write)?;
                Ok(())
            })
        })
        .collect();

    let mut accepted = Vec::with_capacity(connections);
    for _ in 0..connections {
        match listener.accept() {
            Ok((conn, _)) => accepted.push(conn),
            Err(e) => {
                // Release the senders before giving up.
                start.wait();
                return Err(e).context("accepting a loopback connection");
            }
        }
    }
    let receivers: Vec<_> = accepted
        .into_iter()
        .map(|mut conn| {
            thread::spawn(move || -> Result<u64> {
                let mut buf = vec![0u8; IO_CHUNK];
                let mut total = 0u64;
                loop {
                    match conn.read(&mut buf) {
                        Ok(0) => return Ok(total),
                        Ok(n) => total += n as u64,
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                        Err(e) => return Err(e.into()),
                    }
                }
            })
        })
        .collect();

    start.wait();
    let t0 = Instant::now();
    let mut received = 0u64;
    for r in receivers {
        received += r
            .join()
            .map_err(|_| anyhow!("receiver thread panicked"))??;
    }
    let elapsed = t0.elapsed().as_secs_f64();
    for s in senders {
        s.join().map_err(|_| anyhow!("sender thread panicked"))??;
    }
    Ok(received as f64 / elapsed)
}

/// A snapshot of CPU time: the whole machine's, and that of a set of "own" processes.
///
/// Two snapshots tell how much CPU *other* processes used in between. This machine has
/// two CPUs and is shared, so a figure measured while something else ran is suspect.
#[derive(Debug, Clone)]
pub struct CpuSample {
    /// Busy ticks over all CPUs (user, nice, system, irq, softirq).
    busy: u64,
    /// All ticks over all CPUs, idle included.
    total: u64,
    /// Ticks (user + system) of the own processes.
    own: u64,
    /// CPUs counted in `/proc/stat`.
    cpus: usize,
}

impl CpuSample {
    /// Reads `/proc/stat` and the CPU time of `pids` and of this process. A pid that is
    /// gone counts as 0, so take both snapshots while the processes still run.
    pub fn take(pids: &[u32]) -> Result<CpuSample> {
        let stat = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
        let first = stat.lines().next().unwrap_or("");
        let v: Vec<u64> = first
            .split_whitespace()
            .skip(1)
            .map(|f| f.parse().unwrap_or(0))
            .collect();
        let get = |i: usize| v.get(i).copied().unwrap_or(0);
        // user nice system idle iowait irq softirq steal ...; guest time is inside user.
        let busy = get(0) + get(1) + get(2) + get(5) + get(6);
        let total = busy + get(3) + get(4) + get(7);
        let cpus = stat
            .lines()
            .filter(|l| l.starts_with("cpu") && l.as_bytes().get(3).is_some_and(u8::is_ascii_digit))
            .count();
        let own = std::iter::once(std::process::id())
            .chain(pids.iter().copied())
            .map(process_ticks)
            .sum();
        Ok(CpuSample {
            busy,
            total,
            own,
            cpus,
        })
    }

    /// The average number of CPUs that other processes kept busy since `earlier`
    /// (0 on a quiet machine). NaN if no time passed.
    pub fn others_since(&self, earlier: &CpuSample) -> f64 {
        let total = self.total.saturating_sub(earlier.total);
        if total == 0 {
            return f64::NAN;
        }
        let busy = self.busy.saturating_sub(earlier.busy);
        let own = self.own.saturating_sub(earlier.own);
        busy.saturating_sub(own) as f64 / total as f64 * self.cpus as f64
    }
}

/// User + system ticks of process `pid` (all its threads), 0 if it cannot be read.
fn process_ticks(pid: u32) -> u64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0;
    };
    // The command name may hold spaces and parentheses: fields start after the last ')'.
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return 0;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest[0] is field 3 (state); utime and stime are fields 14 and 15.
    let tick = |i: usize| f.get(i).and_then(|x| x.parse::<u64>().ok()).unwrap_or(0);
    tick(11) + tick(12)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_sample_counts_own_work() {
        let a = CpuSample::take(&[]).unwrap();
        assert!(a.cpus >= 1);
        // Busy-spin ~200 ms in this process: it is "own" work, not others'.
        let t = Instant::now();
        let mut x = 0u64;
        while t.elapsed().as_millis() < 200 {
            x = black_box(x.wrapping_add(1));
        }
        let b = CpuSample::take(&[]).unwrap();
        assert!(b.own > a.own);
        let others = b.others_since(&a);
        assert!((0.0..=a.cpus as f64).contains(&others), "{others}");
    }

    #[test]
    fn limits_are_positive() {
        assert!(memcpy_bandwidth(1 << 20, 3) > 0.0);
        assert!(loopback_tcp_bandwidth(2, 4 << 20).unwrap() > 0.0);
    }
}
