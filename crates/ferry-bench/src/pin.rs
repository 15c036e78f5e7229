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
            "vCPU i on CPU {:?}[i], every other thread of both processes on CPUs {:?}",
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

/// Places the threads of a migration's source and destination (each with `vcpus` vCPU
/// threads, the destination's already waiting) and checks that every vCPU thread was found.
pub fn pin_pair(
    p: Option<&Pinning>,
    pids: [u32; 2],
    vcpus: u32,
    vcpu_index: impl Fn(&str) -> Option<usize> + Copy,
) -> Result<()> {
    let Some(p) = p else { return Ok(()) };
    for pid in pids {
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

    #[test]
    fn pins_a_vcpu_thread_apart_from_the_others() {
        let cpus = ferry_sys::sched::affinity().expect("affinity");
        let (tid_tx, tid_rx) = std::sync::mpsc::channel();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let vcpu = std::thread::Builder::new()
            .name("vcpu0".into())
            .spawn(move || {
                tid_tx.send(ferry_sys::sched::gettid()).expect("send tid");
                let _ = done_rx.recv();
            })
            .expect("spawn");
        let tid = tid_rx.recv().expect("tid");
        let p = Pinning {
            vcpus: vec![*cpus.last().expect("a CPU")],
            others: cpus.clone(),
        };
        let me = std::process::id();
        assert_eq!(p.apply(me, ferry_vcpu).expect("apply"), 1);
        let status =
            std::fs::read_to_string(format!("/proc/{me}/task/{tid}/status")).expect("status");
        let allowed = status
            .lines()
            .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
            .expect("Cpus_allowed_list")
            .trim()
            .to_string();
        assert_eq!(allowed, p.vcpus[0].to_string());
        // Every other thread (this one included) keeps all the CPUs it had.
        assert_eq!(ferry_sys::sched::affinity().expect("affinity"), cpus);
        let err = pin_pair(Some(&p), [me, me], 2, ferry_vcpu).expect_err("one vCPU thread");
        assert!(
            err.to_string().contains("found 1 vCPU threads, expected 2"),
            "{err}"
        );
        done_tx.send(()).expect("stop");
        vcpu.join().expect("join");
    }
}
