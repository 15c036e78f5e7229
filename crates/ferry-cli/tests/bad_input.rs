//! Bad input to `ferry run`: every case ends with a clear error on stderr and a non-zero
//! exit code, never a panic (and never a guest that boots anyway: each run has
//! `--serial null` and must end by itself).

mod common;

use std::path::{Path, PathBuf};

use common::*;
use ferry_guest::ImageKind;

/// `ferry run ARGS --serial null`, which must fail cleanly with every phrase on stderr.
fn run_fails(what: &str, run_args: &[&str], phrases: &[&str]) -> String {
    let mut a = vec!["run"];
    a.extend_from_slice(run_args);
    a.extend_from_slice(&["--serial", "null"]);
    let out = ferry(&a);
    let stderr = assert_clean_failure(what, &out, phrases);
    assert!(
        out.stdout.is_empty(),
        "{what}: unexpected stdout: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    stderr
}

fn path_str(p: &Path) -> String {
    p.display().to_string()
}

#[test]
fn image_that_is_not_multiboot() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("notes.txt");
    std::fs::write(&img, "just some text, certainly not a kernel\n".repeat(100)).unwrap();
    run_fails(
        "text file as kernel",
        &["--kernel", &path_str(&img), "--memory", "64M"],
        &["ferry: error: not a multiboot image", "0x1BADB002"],
    );
}

#[test]
fn truncated_image() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("half.elf");
    let elf = ferry_guest::WORKLOAD_ELF;
    std::fs::write(&img, &elf[..elf.len() / 2]).unwrap();
    run_fails(
        "first half of the ELF image",
        &["--kernel", &path_str(&img), "--memory", "64M"],
        &[
            "truncated image",
            &format!("the file has {}", elf.len() / 2),
        ],
    );
}

/// A flat multiboot image with the a.out-kludge header (flag bit 16) loading 4 KiB of
/// code at `load_addr`.
fn kludge_image(load_addr: u32) -> Vec<u8> {
    const MAGIC: u32 = 0x1BAD_B002;
    let flags = 0x0001_0003u32;
    let mut img = vec![0x90u8; 4096];
    let words = [
        MAGIC,
        flags,
        0u32.wrapping_sub(MAGIC.wrapping_add(flags)),
        load_addr,          // header_addr (the header is the first thing loaded)
        load_addr,          // load_addr
        load_addr + 0x1000, // load_end_addr
        0,                  // bss_end_addr
        load_addr + 0x20,   // entry_addr
    ];
    for (i, w) in words.iter().enumerate() {
        img[i * 4..i * 4 + 4].copy_from_slice(&w.to_le_bytes());
    }
    img
}

#[test]
fn load_address_outside_guest_ram() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("high.bin");
    std::fs::write(&img, kludge_image(0x7000_0000)).unwrap();
    run_fails(
        "image loaded at 0x70000000 in 64 MiB",
        &["--kernel", &path_str(&img), "--memory", "64M"],
        &[
            "ferry: error: image segment 0 at 0x70000000..0x70001000",
            "does not fit in guest RAM (64 MiB)",
        ],
    );
}

#[test]
fn memory_too_small_for_the_image() {
    let dir = tempfile::tempdir().unwrap();
    let img = ferry_guest::write_image(ImageKind::Elf, dir.path()).unwrap();
    run_fails(
        "the workload in 2 MiB",
        &["--kernel", &path_str(&img), "--memory", "2M"],
        &[
            "does not fit in guest RAM (2 MiB)",
            "give the VM more memory",
        ],
    );
}

#[test]
fn nonexistent_image() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("no-such-image.elf");
    run_fails(
        "missing image",
        &["--kernel", &path_str(&img), "--memory", "64M"],
        &[
            "ferry: error: cannot read image",
            &path_str(&img),
            "No such file or directory",
        ],
    );
}

#[test]
fn bad_memory_values() {
    let dir = tempfile::tempdir().unwrap();
    let img = path_str(&ferry_guest::write_image(ImageKind::Elf, dir.path()).unwrap());
    // Rejected by the argument parser (exit code 2, with the accepted forms).
    for bad in ["12Q", "lots", "-1M", "99999999999T"] {
        let memory = format!("--memory={bad}");
        let out = ferry(&["run", "--kernel", &img, &memory, "--serial", "null"]);
        assert_clean_failure(
            &format!("--memory {bad}"),
            &out,
            &[&format!("bad size '{bad}'"), "examples: 512M"],
        );
        assert_eq!(out.status.code(), Some(2), "--memory {bad}");
    }
    // Parsed, but not a usable RAM size.
    for bad in ["0", "4097"] {
        run_fails(
            &format!("--memory {bad}"),
            &["--kernel", &img, "--memory", bad],
            &[&format!("size {bad} is not a non-zero multiple of 4 KiB")],
        );
    }
}

#[test]
fn zero_vcpus() {
    let dir = tempfile::tempdir().unwrap();
    let img = path_str(&ferry_guest::write_image(ImageKind::Elf, dir.path()).unwrap());
    run_fails(
        "--vcpus 0",
        &["--kernel", &img, "--memory", "64M", "--vcpus", "0"],
        &["--vcpus 0 is out of range (1..="],
    );
}

#[test]
fn hugetlb_backend_without_enough_free_huge_pages() {
    // More than are free, whatever this machine has reserved: refused before any is taken.
    let free: u64 =
        std::fs::read_to_string("/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages")
            .ok()
            .and_then(|t| t.trim().parse().ok())
            .unwrap_or(0);
    let pages = free + 32;
    let memory = format!("{}M", pages * 2);
    let needs = format!("needs {pages} free 2 MiB huge pages");
    let dir = tempfile::tempdir().unwrap();
    let img = path_str(&ferry_guest::write_image(ImageKind::Elf, dir.path()).unwrap());
    run_fails(
        "hugetlb without huge pages",
        &[
            "--kernel",
            &img,
            "--memory",
            &memory,
            "--memory-backend",
            "hugetlb",
        ],
        &["hugetlb", &needs, "/proc/sys/vm/nr_hugepages"],
    );
}

/// A real snapshot of a small running workload guest; the guest process is gone after.
fn real_snapshot(dir: &Path) -> PathBuf {
    let _heavy = heavy();
    let image = ferry_guest::write_image(ImageKind::Elf, dir).unwrap();
    let mut g = Guest::ferry(
        "snap-source",
        dir,
        &kernel_args(&image, "ws=1M hb=1", "16M", 1),
        true,
    );
    g.wait_ready();
    g.wait_api();
    let snap = dir.join("good.snap");
    g.remote_ok(&["snapshot", &path_str(&snap)]);
    assert!(snap.exists());
    snap
}

/// Region 0's (file offset, size) from a snapshot header.
fn region0(snap: &[u8]) -> (usize, usize) {
    let u64_at = |o: usize| u64::from_le_bytes(snap[o..o + 8].try_into().unwrap()) as usize;
    // Fixed part: magic, version, count, state offset, state len, state crc, reserved
    // (40 bytes); then gpa, size, file offset, crc, reserved per region.
    (u64_at(40 + 16), u64_at(40 + 8))
}

#[test]
fn damaged_snapshots_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let snap = real_snapshot(dir.path());
    let good = std::fs::read(&snap).unwrap();
    let (mem_off, mem_len) = region0(&good);
    assert_eq!(mem_len, 16 << 20, "snapshot layout not as expected");
    assert!(mem_off + mem_len <= good.len());
    let restore = |what: &str, bytes: &[u8], phrases: &[&str]| {
        let p = dir.path().join(format!("{}.snap", what.replace(' ', "-")));
        std::fs::write(&p, bytes).unwrap();
        run_fails(what, &["--restore", &path_str(&p)], phrases)
    };

    let mut flipped = good.clone();
    flipped[mem_off + mem_len / 2] ^= 0x5A;
    restore(
        "flipped memory byte",
        &flipped,
        &[
            "ferry: error: snapshot: corrupt file",
            "memory at 0x0 (16777216 bytes) fails its checksum",
        ],
    );

    restore(
        "truncated snapshot",
        &good[..mem_off + mem_len / 2],
        &["snapshot: corrupt file", "truncated"],
    );

    let mut other_version = good.clone();
    other_version[8..12].copy_from_slice(&2u32.to_le_bytes());
    restore(
        "version 2 snapshot",
        &other_version,
        &["file format version 2 is not supported", "reads version 1"],
    );

    let mut header = good.clone();
    header[16] ^= 1; // state offset: the header checksum catches it
    restore(
        "damaged header",
        &header,
        &["snapshot: corrupt file", "header checksum mismatch"],
    );
}

#[test]
fn files_that_are_not_snapshots() {
    let dir = tempfile::tempdir().unwrap();
    // Long enough to hold a header: refused by its magic.
    let img = ferry_guest::write_image(ImageKind::Elf, dir.path()).unwrap();
    run_fails(
        "ELF image as snapshot",
        &["--restore", &path_str(&img)],
        &["ferry: error: snapshot: not a Ferry snapshot file (bad magic)"],
    );
    // Shorter than a header.
    let short = dir.path().join("short.txt");
    std::fs::write(&short, "hello\n").unwrap();
    run_fails(
        "short text file as snapshot",
        &["--restore", &path_str(&short)],
        &["ferry: error: snapshot:"],
    );
    // Missing.
    let missing = dir.path().join("missing.snap");
    run_fails(
        "missing snapshot",
        &["--restore", &path_str(&missing)],
        &[
            "ferry: error: snapshot ",
            "missing.snap: opening the snapshot file",
            "No such file or directory",
        ],
    );
}

/// An I/O error names the file and prints its cause once (errors carry their cause in their
/// own message and as `source()`; the CLI must not print it twice).
#[test]
fn snapshot_io_errors_are_printed_once() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.snap");
    let stderr = run_fails(
        "missing snapshot",
        &["--restore", &path_str(&missing)],
        &["No such file or directory"],
    );
    assert_eq!(
        stderr.matches("No such file or directory").count(),
        1,
        "{stderr}"
    );
}
