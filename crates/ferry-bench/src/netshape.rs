//! A rate-limited link between the root network namespace and a private one (issue 11).
//!
//! [`ShapedLink::new`] creates a network namespace, a veth pair between it and the root
//! namespace ([`ROOT_ADDR`] on the root end, [`NS_ADDR`] in the namespace, both /24) and a
//! tbf qdisc with the given rate on the egress of both ends, so each direction is shaped.
//! A process started with [`ShapedLink::netns_command`] (the migration destination) runs
//! inside the namespace; unix sockets in the file system still connect across it.
//!
//! Everything is deleted on drop (also when unwinding from a panic). A run killed by a
//! signal leaves its namespace behind; the next [`ShapedLink::new`] removes namespaces
//! left by processes that no longer exist. Only one link can exist at a time in a process,
//! since every link uses the same addresses. Needs root and iproute2 (`ip`, `tc`); netem
//! is not available here, so links have a rate but no added delay or loss.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, Shutdown, TcpListener};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// The root namespace's end of the link.
pub const ROOT_ADDR: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
/// The private namespace's end of the link.
pub const NS_ADDR: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);

/// Name prefix of the namespaces made here: `ferry-b-<pid>-<n>`.
const NETNS_PREFIX: &str = "ferry-b-";

/// Set while a link exists in this process (they would share addresses).
static IN_USE: AtomicBool = AtomicBool::new(false);

/// A veth pair into a private network namespace, shaped by tbf in both directions.
#[derive(Debug)]
pub struct ShapedLink {
    netns: String,
    root_if: String,
    ns_if: String,
    rate_bits: u64,
}

/// TCP goodput measured over a link by [`ShapedLink::measure_tcp`], in bits/s.
#[derive(Debug, Clone, Copy)]
pub struct LinkRates {
    /// Root namespace to private namespace (source to destination).
    pub to_ns: f64,
    /// Private namespace to root namespace.
    pub from_ns: f64,
}

impl ShapedLink {
    /// Creates the namespace, the veth pair and the shaping. `rate` is a tc rate in bits
    /// per second: `1gbit`, `10gbit`, `500mbit`, `100kbit`, `1000bit`.
    pub fn new(rate: &str) -> Result<ShapedLink> {
        let rate_bits = parse_rate(rate)?;
        check_root()?;
        run(Command::new("ip").arg("-V")).map_err(|e| {
            match e.downcast_ref::<std::io::Error>() {
                Some(io) if io.kind() == std::io::ErrorKind::NotFound => {
                    anyhow::anyhow!("`ip` (iproute2) is not installed or not in PATH")
                }
                _ => e,
            }
        })?;
        if IN_USE.swap(true, Ordering::SeqCst) {
            bail!("a ShapedLink already exists in this process (only one at a time: they share 10.77.0.0/24)");
        }
        remove_stale_netns();
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        // Interface names must fit in 15 bytes: "fb" + pid (<= 7 digits) + n + "r"/"n".
        let link = ShapedLink {
            netns: format!("{NETNS_PREFIX}{pid}-{n}"),
            root_if: format!("fb{pid}x{n}r"),
            ns_if: format!("fb{pid}x{n}n"),
            rate_bits,
        };
        // From here on, drop undoes whatever was done.
        link.setup().with_context(|| {
            format!("setting up the shaped link ({rate}, netns {})", link.netns)
        })?;
        Ok(link)
    }

    fn setup(&self) -> Result<()> {
        let (ns, rif, nif) = (&self.netns, &self.root_if, &self.ns_if);
        ip(&["netns", "add", ns])?;
        ip(&[
            "link", "add", rif, "type", "veth", "peer", "name", nif, "netns", ns,
        ])?;
        ip(&["addr", "add", &format!("{ROOT_ADDR}/24"), "dev", rif])?;
        ip(&["link", "set", rif, "up"])?;
        ip(&[
            "-n",
            ns,
            "addr",
            "add",
            &format!("{NS_ADDR}/24"),
            "dev",
            nif,
        ])?;
        ip(&["-n", ns, "link", "set", nif, "up"])?;
        ip(&["-n", ns, "link", "set", "lo", "up"])?;
        // tbf needs a bucket of at least rate/HZ bytes (HZ is 250 here) or it cannot reach
        // its rate; 10 ms worth of traffic leaves a margin for any HZ >= 100.
        let burst = (self.rate_bits / 8 / 100).max(64 << 10).to_string();
        let rate = format!("{}bit", self.rate_bits);
        let tbf = [
            "root", "tbf", "rate", &rate, "burst", &burst, "latency", "20ms",
        ];
        for (netns, dev) in [(None, rif), (Some(ns), nif)] {
            let mut tc = Command::new("tc");
            if let Some(ns) = netns {
                tc.args(["-n", ns]);
            }
            tc.args(["qdisc", "replace", "dev", dev]).args(tbf);
            run(&mut tc).context("`tc qdisc replace ... tbf` (is sch_tbf available?)")?;
        }
        Ok(())
    }

    /// The namespace's name, for `ip netns exec` or `ip -n`.
    pub fn netns(&self) -> &str {
        &self.netns
    }

    /// The veth end in the root namespace (its counters are the source's traffic).
    #[cfg(test)]
    pub fn root_if(&self) -> &str {
        &self.root_if
    }

    /// Bytes the root end has sent so far (the source's side of a migration: everything
    /// that went into the namespace, headers included). Read it before and after a run.
    pub fn root_tx_bytes(&self) -> Result<u64> {
        let path = format!("/sys/class/net/{}/statistics/tx_bytes", self.root_if);
        let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
        text.trim()
            .parse()
            .with_context(|| format!("parsing {path}: {text:?}"))
    }

    /// The shaped rate in bits/s (each direction).
    pub fn rate_bits_per_s(&self) -> u64 {
        self.rate_bits
    }

    /// A command that runs `program` inside the namespace (`ip netns exec NAME program`).
    /// `ip netns exec` execs the program, so the child's pid is the program's own.
    pub fn netns_command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.netns]).arg(program);
        cmd
    }

    /// Measures TCP goodput in each direction by sending `bytes` over one connection
    /// (the namespace side is `dd` through bash's `/dev/tcp`, so it needs bash and dd).
    pub fn measure_tcp(&self, bytes: u64) -> Result<LinkRates> {
        let listener = TcpListener::bind((ROOT_ADDR, 0)).context("binding on the link")?;
        let port = listener.local_addr()?.port();
        let mib = bytes.div_ceil(1 << 20);
        let dev_tcp = format!("/dev/tcp/{ROOT_ADDR}/{port}");
        let bash = |script: String| -> Result<crate::qemu::ChildGuard> {
            let child = self
                .netns_command("bash")
                .args(["-c", &script])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .context("running bash in the namespace")?;
            Ok(crate::qemu::ChildGuard::new(child))
        };
        listener.set_nonblocking(true)?;
        let accept = |child: &mut crate::qemu::ChildGuard| -> Result<std::net::TcpStream> {
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                match listener.accept() {
                    Ok((s, _)) => {
                        s.set_nonblocking(false)?;
                        return Ok(s);
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e.into()),
                }
                if let Some(status) = child.0.try_wait()? {
                    bail!("the namespace side exited with {status} before connecting");
                }
                if Instant::now() > deadline {
                    bail!("the namespace side did not connect in 10 s");
                }
                std::thread::sleep(Duration::from_millis(2));
            }
        };
        let mut buf = vec![0u8; 1 << 20];

        // Namespace to root: timed from the first byte to EOF.
        let mut child = bash(format!(
            "dd if=/dev/zero bs=1M count={mib} status=none > {dev_tcp}"
        ))?;
        let mut s = accept(&mut child)?;
        let mut got = 0u64;
        let mut first = None;
        loop {
            let n = s.read(&mut buf).context("receiving from the namespace")?;
            if n == 0 {
                break;
            }
            first.get_or_insert_with(Instant::now);
            got += n as u64;
        }
        let from_secs = first.map_or(0.0, |t| t.elapsed().as_secs_f64());
        let status = child.0.wait()?;
        if !status.success() || got != mib << 20 {
            bail!(
                "namespace to root: got {got} of {} bytes, sender {status}",
                mib << 20
            );
        }

        // Root to namespace: timed from the first write until the reader saw EOF and exited.
        let mut child = bash(format!("cat < {dev_tcp} > /dev/null"))?;
        let mut s = accept(&mut child)?;
        let t = Instant::now();
        for _ in 0..mib {
            s.write_all(&buf).context("sending to the namespace")?;
        }
        s.shutdown(Shutdown::Write)?;
        let status = child.0.wait()?;
        let to_secs = t.elapsed().as_secs_f64();
        if !status.success() {
            bail!("root to namespace: reader exited with {status}");
        }
        let bits = (mib << 20) as f64 * 8.0;
        Ok(LinkRates {
            to_ns: bits / to_secs,
            from_ns: bits / from_secs,
        })
    }
}

impl Drop for ShapedLink {
    fn drop(&mut self) {
        // Deleting one end deletes both, synchronously (a namespace's devices go away
        // asynchronously when the namespace does).
        let _ = ip(&["link", "del", &self.root_if]);
        let _ = ip(&["netns", "del", &self.netns]);
        IN_USE.store(false, Ordering::SeqCst);
    }
}

/// A tc rate in bits/s: a number with `bit`, `kbit`, `mbit`, `gbit` or `tbit` (powers of
/// 1000, as tc reads them).
pub fn parse_rate(rate: &str) -> Result<u64> {
    let r = rate.trim().to_ascii_lowercase();
    let units = [
        ("tbit", 1_000_000_000_000u64),
        ("gbit", 1_000_000_000),
        ("mbit", 1_000_000),
        ("kbit", 1_000),
        ("bit", 1),
    ];
    for (suffix, mult) in units {
        if let Some(num) = r.strip_suffix(suffix) {
            let v: f64 = num
                .trim()
                .parse()
                .with_context(|| format!("bad rate {rate:?}: expected e.g. 1gbit"))?;
            let bits = v * mult as f64;
            if !(8.0..1e15).contains(&bits) {
                bail!("rate {rate:?} out of range");
            }
            return Ok(bits as u64);
        }
    }
    bail!("bad rate {rate:?}: expected a number with bit, kbit, mbit, gbit or tbit (e.g. 1gbit)")
}

/// Fails unless the effective uid is 0 (from /proc, as this crate forbids unsafe code).
fn check_root() -> Result<()> {
    let status =
        std::fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    let euid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .context("no Uid line in /proc/self/status")?;
    if euid != "0" {
        bail!("a shaped link needs root (network namespaces, veth, tc); running as uid {euid}");
    }
    Ok(())
}

/// Runs `ip ARGS`, failing with its stderr.
fn ip(args: &[&str]) -> Result<()> {
    run(Command::new("ip").args(args))
}

/// Runs a command to completion, failing with its stderr.
fn run(cmd: &mut Command) -> Result<()> {
    let line = format!("{cmd:?}").replace('"', "");
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(anyhow::Error::from)
        .map_err(|e| e.context(format!("running `{line}`")))?;
    if !out.status.success() {
        bail!(
            "`{line}` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Deletes `ferry-b-<pid>-<n>` namespaces whose process is gone (a run killed by a signal).
fn remove_stale_netns() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        let Some(pid) = name
            .strip_prefix(NETNS_PREFIX)
            .and_then(|rest| rest.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = ip(&["netns", "del", name]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_rates() {
        assert_eq!(parse_rate("1gbit").unwrap(), 1_000_000_000);
        assert_eq!(parse_rate("10Gbit").unwrap(), 10_000_000_000);
        assert_eq!(parse_rate("2.5mbit").unwrap(), 2_500_000);
        assert_eq!(parse_rate("800kbit").unwrap(), 800_000);
        for bad in ["1gbps", "fast", "gbit", "-1gbit", "1 gigabit"] {
            assert!(parse_rate(bad).is_err(), "{bad}");
        }
    }

    /// The link exists while the guard lives, a command runs inside the namespace under
    /// its own pid, the shaped rate holds in both directions, and nothing is left after.
    #[test]
    fn a_shaped_link_holds_its_rate_and_cleans_up() {
        let _heavy = crate::qemu::tests::heavy();
        let link = ShapedLink::new("1gbit").unwrap();
        let (netns, root_if) = (link.netns().to_string(), link.root_if().to_string());
        assert!(ShapedLink::new("1gbit").is_err(), "a second link at once");

        let out = link
            .netns_command("ip")
            .args(["-o", "addr", "show"])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains(&format!("{NS_ADDR}/24")), "{text}");
        let mut sleep = link.netns_command("sleep").arg("5").spawn().unwrap();
        std::thread::sleep(Duration::from_millis(100));
        let comm = std::fs::read_to_string(format!("/proc/{}/comm", sleep.id())).unwrap();
        let _ = sleep.kill();
        let _ = sleep.wait();
        assert_eq!(comm.trim(), "sleep");

        // 1 Gbit/s for about 1.3 s each way. TCP goodput is about 96% of the tbf rate.
        let r = link.measure_tcp(160 << 20).unwrap();
        println!(
            "tbf 1gbit: to netns {:.3} Gbit/s, from netns {:.3} Gbit/s",
            r.to_ns / 1e9,
            r.from_ns / 1e9
        );
        for v in [r.to_ns, r.from_ns] {
            assert!((0.85e9..1.03e9).contains(&v), "{r:?}");
        }

        drop(link);
        let list = Command::new("ip").args(["netns", "list"]).output().unwrap();
        assert!(!String::from_utf8_lossy(&list.stdout).contains(&netns));
        assert!(!std::path::Path::new(&format!("/sys/class/net/{root_if}")).exists());
        // The slot is free again.
        drop(ShapedLink::new("10gbit").unwrap());
    }

    /// Measures the TCP goodput of links shaped to 1, 10 and 100 Gbit/s (the last is
    /// above what veth reaches here, so it shows the unshaped limit). `cargo test -p ferry-bench --release -- --ignored --nocapture shaped_rates`.
    #[test]
    #[ignore = "a measurement, not a test: prints the goodput of 1, 10 and 100 Gbit/s links"]
    fn shaped_rates() {
        let _heavy = crate::qemu::tests::heavy();
        for rate in ["1gbit", "10gbit", "100gbit"] {
            let link = ShapedLink::new(rate).unwrap();
            let bytes = (link.rate_bits_per_s() / 8 * 2).min(4 << 30);
            for _ in 0..2 {
                let r = link.measure_tcp(bytes).unwrap();
                println!(
                    "tbf {rate}: to netns {:.3} Gbit/s, from netns {:.3} Gbit/s",
                    r.to_ns / 1e9,
                    r.from_ns / 1e9
                );
            }
        }
    }
}
