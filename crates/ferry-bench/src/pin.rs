//! `--pin`: the same thread placement for both systems, applied from outside as an operator
//! would with `taskset` (libvirt's `vcpupin` and `emulatorpin`): vCPU i on CPU i, every
//! other thread of both processes on the CPUs left over. Threads a process starts later
//! inherit the mask of the thread that starts them, so the engines' migration threads
//! (started by the API thread in Ferry, by the main thread in QEMU) land with the others.

use anyhow::{bail, Context, Result};
use ferry_sys::sched::{set_affinity_of, SchedError};
use serde::Serialize;

/// Where the threads go.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Pinning {
    /// vCPU i runs on `vcpus[i]`.
    pub vcpus: Vec<usize>,
    /// Every other thread runs on these.
    pub others: Vec<usize>,
}

impl Pinning {
    /// vCPU i on the i-th CPU of `cpus` (those this process may use) and the rest on the
    /// CPUs left; refused when none would be left.
    pub fn for_vcpus(vcpus: u32, cpus: &[usize]) -> Result<Pinning> {
        let n = vcpus as usize;
        if n >= cpus.len() {
            bail!(
                "--pin needs more CPUs than vCPUs: {vcpus} vCPU(s) on {} CPU(s) leave none for \
                 the other threads",
                cpus.len()
            );
        }
        Ok(Pinning {
            vcpus: cpus[..n].to_vec(),
            others: cpus[n..].to_vec(),
        })
    }

    /// One line for the report header.
    pub fn describe(&self) -> String {
        format!(
            "vCPU threads on CPUs {:?} (vCPU i on the i-th, from when both VMs answer on \
             their control sockets), every other thread of both processes and of the bench \
             on CPUs {:?} from the start",
            self.vcpus, self.others
        )
    }

    /// Places every current thread of `pid`: a thread whose name `vcpu_index` maps to an
    /// index goes to that vCPU's CPU, any other to `others`. Returns the vCPU threads found.
    pub fn apply(&self, pid: u32, vcpu_index: impl Fn(&str) -> Option<usize>) -> Result<usize> {
        let dir = format!("/proc/{pid}/task");
        let mut vcpus = 0;
        for entry in std::fs::read_dir(&dir).with_context(|| format!("reading {dir}"))? {
            let entry = entry?;
            let Some(tid) = entry
                .file_name()
                .to_str()
                .and_then(|t| t.parse::<i32>().ok())
            else {
                continue;
            };
            // A thread may exit between the listing and here; skip it then.
            let Ok(name) = std::fs::read_to_string(entry.path().join("comm")) else {
                continue;
            };
            let cpus = match vcpu_index(name.trim()) {
                Some(i) => {
                    vcpus += 1;
                    let cpu = self.vcpus.get(i).with_context(|| {
                        format!(
                            "pid {pid}: vCPU thread {i} but only {} vCPU CPUs",
                            self.vcpus.len()
                        )
                    })?;
                    std::slice::from_ref(cpu)
                }
                None => &self.others[..],
            };
            match set_affinity_of(tid, cpus) {
                // The thread exited meanwhile.
                Err(SchedError::Os { source, .. })
                    if source.raw_os_error() == Some(libc::ESRCH) => {}
                r => r.with_context(|| format!("pinning thread {tid} of process {pid}"))?,
            }
        }
        Ok(vcpus)
    }
}

/// Puts every thread of this process on the CPUs for non-vCPU threads, before it starts
/// any VM: the VMs then start there (as libvirt's `emulatorpin` places QEMU before it
/// runs), and so do the bench's own threads and children (serial readers, QMP, `ferry
/// remote`).
pub fn confine_bench(p: &Pinning) -> Result<()> {
    ferry_sys::sched::set_affinity(&p.others).context("placing the bench's main thread")?;
    p.apply(std::process::id(), |_| None)?;
    Ok(())
}

/// Places the threads of a migration's source and destination as soon as both answer on
/// their control sockets (each with `vcpus` vCPU threads by then, the destination's
/// waiting) and checks that every vCPU thread was found. Each process is placed twice: a
/// thread started while the first pass read the thread list, by a thread not yet placed,
/// is caught by the second.
pub fn pin_pair(
    p: Option<&Pinning>,
    pids: [u32; 2],
    vcpus: u32,
    vcpu_index: impl Fn(&str) -> Option<usize> + Copy,
) -> Result<()> {
    let Some(p) = p else { return Ok(()) };
    pin_processes(p, pids, vcpus, vcpu_index)
}

fn pin_processes(
    p: &Pinning,
    pids: [u32; 2],
    vcpus: u32,
    vcpu_index: impl Fn(&str) -> Option<usize> + Copy,
) -> Result<()> {
    for pid in pids {
        p.apply(pid, vcpu_index)?;
        let found = p.apply(pid, vcpu_index)?;
        if found != vcpus as usize {
            bail!("pinning process {pid}: found {found} vCPU threads, expected {vcpus}");
        }
    }
    Ok(())
}

/// Ferry names its vCPU threads `vcpu0`, `vcpu1`, ...
pub fn ferry_vcpu(name: &str) -> Option<usize> {
    name.strip_prefix("vcpu")?.parse().ok()
}

/// QEMU started with `-name ...,debug-threads=on` names them `CPU 0/KVM`, ...
pub fn qemu_vcpu(name: &str) -> Option<usize> {
    name.strip_prefix("CPU ")?
        .strip_suffix("/KVM")?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn places_vcpus_first_and_refuses_a_full_host() {
        let p = Pinning::for_vcpus(1, &[2, 5]).expect("1 on 2");
        assert_eq!(p.vcpus, vec![2]);
        assert_eq!(p.others, vec![5]);
        let err = Pinning::for_vcpus(2, &[0, 1]).expect_err("2 on 2");
        assert!(err.to_string().contains("more CPUs than vCPUs"), "{err}");
    }

    #[test]
    fn recognises_vcpu_thread_names() {
        assert_eq!(ferry_vcpu("vcpu1"), Some(1));
        assert_eq!(ferry_vcpu("vcpu-stats"), None);
        assert_eq!(ferry_vcpu("api"), None);
        assert_eq!(qemu_vcpu("CPU 0/KVM"), Some(0));
        assert_eq!(qemu_vcpu("CPU 12/KVM"), Some(12));
        assert_eq!(qemu_vcpu("live_migration"), None);
    }

    /// The CPUs thread `tid` of process `pid` may run on, as /proc lists them.
    fn allowed(pid: u32, tid: u32) -> String {
        let status =
            std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/status")).expect("status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
            .expect("Cpus_allowed_list")
            .trim()
            .to_string()
    }

    /// Run against a child process (`sleep`, one thread), so the test's own threads and
    /// the tests running beside it keep their CPUs.
    #[test]
    fn pins_vcpu_threads_and_the_others_apart() {
        let cpus = ferry_sys::sched::affinity().expect("affinity");
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("sleep");
        let pid = child.id();
        // Until the child has exec'd, its thread still carries this process's name.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !std::fs::read_to_string(format!("/proc/{pid}/comm"))
            .is_ok_and(|c| c.trim() == "sleep")
        {
            assert!(std::time::Instant::now() < deadline, "sleep never started");
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        let p = Pinning {
            vcpus: vec![cpus[0]],
            others: vec![*cpus.last().expect("a CPU")],
        };
        let as_vcpu = |name: &str| (name == "sleep").then_some(0);
        assert_eq!(p.apply(pid, as_vcpu).expect("apply"), 1);
        assert_eq!(allowed(pid, pid), p.vcpus[0].to_string());
        assert_eq!(p.apply(pid, ferry_vcpu).expect("apply"), 0);
        assert_eq!(allowed(pid, pid), p.others[0].to_string());
        let err = pin_processes(&p, [pid, pid], 2, as_vcpu).expect_err("one vCPU thread");
        assert!(
            err.to_string().contains("found 1 vCPU threads, expected 2"),
            "{err}"
        );
        let _ = child.kill();
        let _ = child.wait();
    }
}
