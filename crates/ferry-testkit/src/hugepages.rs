//! Reserving 2 MiB huge pages for a test (hugetlb memory needs them; the kernel keeps none
//! by default). Writing the count needs root.

use std::path::Path;

const NR_HUGEPAGES: &str = "/proc/sys/vm/nr_hugepages";

/// `n` more huge pages than before, reserved while this lives; the old count comes back
/// when it is dropped.
#[derive(Debug)]
pub struct HugePages {
    old: u64,
}

fn read_count() -> Option<u64> {
    std::fs::read_to_string(Path::new(NR_HUGEPAGES))
        .ok()?
        .trim()
        .parse()
        .ok()
}

impl HugePages {
    /// Reserves `n` more huge pages; `None` if they cannot be (not root, or not enough
    /// free memory), with nothing changed.
    pub fn reserve(n: u64) -> Option<HugePages> {
        let old = read_count()?;
        std::fs::write(NR_HUGEPAGES, (old + n).to_string()).ok()?;
        let reserved = HugePages { old };
        (read_count()? >= old + n).then_some(reserved)
    }
}

impl Drop for HugePages {
    fn drop(&mut self) {
        let _ = std::fs::write(NR_HUGEPAGES, self.old.to_string());
    }
}
