//! Whether a destination can take a source VM.

use ferry_proto::VmDescription;

const REG_NAMES: [&str; 4] = ["eax", "ebx", "ecx", "edx"];

fn mib(d: &VmDescription) -> u64 {
    d.regions.iter().map(|r| r.size).sum::<u64>() >> 20
}

/// Checks that `target` matches `source`: same vCPU count, same RAM layout, and every CPU
/// feature bit the guest sees is available on the target. The error says what to change.
pub fn check(source: &VmDescription, target: &VmDescription) -> Result<(), String> {
    if source.vcpus != target.vcpus {
        return Err(format!(
            "the source VM has {} vCPUs but this destination has {} (start it with --vcpus {})",
            source.vcpus, target.vcpus, source.vcpus
        ));
    }
    if source.page_size != target.page_size {
        return Err(format!(
            "page size {} on the source, {} here",
            source.page_size, target.page_size
        ));
    }
    if source.regions != target.regions {
        return Err(format!(
            "the source VM has {} MiB of RAM ({} regions) but this destination has {} MiB \
             ({} regions); start it with --memory {}M",
            mib(source),
            source.regions.len(),
            mib(target),
            target.regions.len(),
            mib(source)
        ));
    }
    let mut missing = Vec::new();
    for f in &source.cpu_features {
        let have = target
            .cpu_features
            .iter()
            .find(|t| t.leaf == f.leaf && t.subleaf == f.subleaf);
        for (i, name) in REG_NAMES.iter().enumerate() {
            let want = f.regs[i];
            let got = have.map(|t| t.regs[i]).unwrap_or(0);
            if want & !got != 0 {
                missing.push(format!(
                    "leaf {:#x}.{} {name} bits {:#x}",
                    f.leaf,
                    f.subleaf,
                    want & !got
                ));
            }
        }
    }
    if !missing.is_empty() {
        return Err(format!(
            "this host's CPU lacks features the guest uses: {}",
            missing.join(", ")
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_proto::{CpuFeature, MemRegion};

    fn desc(vcpus: u32, mib: u64, ebx7: u32) -> VmDescription {
        VmDescription {
            vcpus,
            page_size: 4096,
            regions: vec![MemRegion {
                gpa: 0,
                size: mib << 20,
            }],
            cpu_features: vec![CpuFeature {
                leaf: 7,
                subleaf: 0,
                regs: [0, ebx7, 0, 0],
            }],
        }
    }

    #[test]
    fn accepts_equal_and_superset() {
        assert!(check(&desc(2, 512, 0b101), &desc(2, 512, 0b101)).is_ok());
        assert!(check(&desc(2, 512, 0b101), &desc(2, 512, 0b111)).is_ok());
    }

    #[test]
    fn refuses_with_what_to_change() {
        let e = check(&desc(2, 512, 0), &desc(1, 512, 0)).unwrap_err();
        assert!(e.contains("--vcpus 2"), "{e}");
        let e = check(&desc(1, 512, 0), &desc(1, 1024, 0)).unwrap_err();
        assert!(e.contains("512 MiB") && e.contains("--memory 512M"), "{e}");
        let e = check(&desc(1, 512, 0b110), &desc(1, 512, 0b010)).unwrap_err();
        assert!(e.contains("leaf 0x7.0 ebx bits 0x4"), "{e}");
    }
}
