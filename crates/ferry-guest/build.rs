//! Assembles the workload guest with binutils (`as`, `ld`, `objcopy`), which every build
//! machine has, into an ELF32 multiboot image and a flat image using the a.out kludge.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

fn run(cmd: &mut Command) {
    let status = cmd
        .status()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e} (binutils is required)"));
    assert!(status.success(), "{cmd:?} failed with {status}");
}

fn build(src: &Path, ld_script: &Path, out: &Path, kludge: bool) {
    let tag = if kludge { "flat" } else { "elf" };
    let obj = out.join(format!("workload-{tag}.o"));
    let elf64 = out.join(format!("workload-{tag}.elf64"));
    run(Command::new("as")
        .arg("--64")
        .arg("--defsym")
        .arg(format!("KLUDGE={}", u8::from(kludge)))
        .arg("-o")
        .arg(&obj)
        .arg(src));
    run(Command::new("ld")
        .args([
            "-m",
            "elf_x86_64",
            "-nostdlib",
            "--no-warn-rwx-segments",
            "-T",
        ])
        .arg(ld_script)
        .arg("-o")
        .arg(&elf64)
        .arg(&obj));
    if kludge {
        run(Command::new("objcopy")
            .args(["-O", "binary"])
            .arg(&elf64)
            .arg(out.join("workload.bin")));
    } else {
        run(Command::new("objcopy")
            .args(["-O", "elf32-i386"])
            .arg(&elf64)
            .arg(out.join("workload.elf")));
    }
}

fn main() {
    let dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let out = PathBuf::from(env::var("OUT_DIR").expect("OUT_DIR"));
    let src = dir.join("asm/workload.S");
    let ld_script = dir.join("asm/link.ld");
    println!("cargo:rerun-if-changed={}", src.display());
    println!("cargo:rerun-if-changed={}", ld_script.display());
    build(&src, &ld_script, &out, false);
    build(&src, &ld_script, &out, true);
}
