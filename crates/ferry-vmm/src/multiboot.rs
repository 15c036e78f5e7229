//! Multiboot v1 loading, the way `qemu-system-x86_64 -kernel` does it: ELF32 images by their
//! program headers, other images by the header's load-address fields (flag bit 16). Builds
//! the multiboot information structure (memory sizes, memory map, command line, loader name)
//! right after the loaded image, as QEMU does.

/// Value in EAX at entry.
pub const BOOTLOADER_MAGIC: u32 = 0x2BAD_B002;
const HEADER_MAGIC: u32 = 0x1BAD_B002;
const SEARCH_LEN: usize = 8192;
const FLAG_AOUT_KLUDGE: u32 = 1 << 16;
/// Header flag bits 0-15 a loader must understand: page-align modules, memory info, video.
const KNOWN_REQUIRED_FLAGS: u32 = 0b111;

/// Errors loading an image; each says what is wrong with it.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MultibootError {
    /// No header in the first 8 KiB.
    #[error("not a multiboot image: no multiboot v1 header (magic 0x1BADB002 with a valid checksum) in the first 8 KiB")]
    NoHeader,
    /// The header asks for something unsupported.
    #[error("multiboot header requires unsupported features (flags {0:#x})")]
    UnsupportedFlags(u32),
    /// A 64-bit ELF.
    #[error("64-bit ELF images cannot be booted with multiboot v1; build a 32-bit (ELF32) image")]
    Elf64,
    /// The ELF is malformed or not for x86.
    #[error("bad ELF image: {0}")]
    BadElf(String),
    /// The image is shorter than its headers say.
    #[error("truncated image: {0}")]
    Truncated(String),
    /// The header's address fields are inconsistent.
    #[error("bad multiboot load addresses: {0}")]
    BadAddresses(String),
    /// Something would be loaded outside guest RAM.
    #[error("{what} at {start:#x}..{end:#x} does not fit in guest RAM ({ram}); give the VM more memory or relink the image")]
    OutsideRam {
        /// What.
        what: String,
        /// First byte.
        start: u64,
        /// One past the last byte.
        end: u64,
        /// Description of the RAM layout.
        ram: String,
    },
}

/// A piece of the image to place in guest memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment {
    /// Guest physical address.
    pub gpa: u64,
    /// Bytes from the image.
    pub data: Vec<u8>,
    /// Zero bytes after `data` (bss).
    pub zero: u64,
}

impl Segment {
    /// One past the last byte.
    pub fn end(&self) -> u64 {
        self.gpa + self.data.len() as u64 + self.zero
    }
}

/// What the loader will do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadPlan {
    /// Pieces to copy.
    pub segments: Vec<Segment>,
    /// Entry point (physical).
    pub entry: u32,
    /// Multiboot information structure and everything it points to.
    pub info: Segment,
    /// Address of the information structure (EBX at entry).
    pub info_addr: u32,
}

fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    b.get(off..off + 4)
        .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
}

fn u16_at(b: &[u8], off: usize) -> Option<u16> {
    b.get(off..off + 2)
        .map(|s| u16::from_le_bytes([s[0], s[1]]))
}

/// The multiboot header: offset in the file and flags.
fn find_header(image: &[u8]) -> Option<(usize, u32)> {
    let limit = image.len().min(SEARCH_LEN);
    (0..limit.saturating_sub(11)).step_by(4).find_map(|off| {
        let magic = u32_at(image, off)?;
        let flags = u32_at(image, off + 4)?;
        let sum = u32_at(image, off + 8)?;
        (magic == HEADER_MAGIC && magic.wrapping_add(flags).wrapping_add(sum) == 0)
            .then_some((off, flags))
    })
}

/// A region of guest RAM (guest address, size) for the fit checks and the memory map.
pub type RamRange = (u64, u64);

fn describe_ram(ram: &[RamRange]) -> String {
    let total: u64 = ram.iter().map(|r| r.1).sum();
    format!("{} MiB", total >> 20)
}

fn check_fits(what: &str, start: u64, end: u64, ram: &[RamRange]) -> Result<(), MultibootError> {
    if end <= start || ram.iter().any(|&(g, s)| start >= g && end <= g + s) {
        return Ok(());
    }
    Err(MultibootError::OutsideRam {
        what: what.to_string(),
        start,
        end,
        ram: describe_ram(ram),
    })
}

fn load_aout_kludge(
    image: &[u8],
    header_off: usize,
) -> Result<(Vec<Segment>, u32), MultibootError> {
    let f = |i: usize| {
        u32_at(image, header_off + 12 + 4 * i).ok_or_else(|| {
            MultibootError::Truncated("the multiboot header's address fields are cut off".into())
        })
    };
    let (header_addr, load_addr, load_end, bss_end, entry) = (f(0)?, f(1)?, f(2)?, f(3)?, f(4)?);
    if load_addr > header_addr {
        return Err(MultibootError::BadAddresses(format!(
            "load_addr {load_addr:#x} is above header_addr {header_addr:#x}"
        )));
    }
    let back = u64::from(header_addr - load_addr);
    let file_start = (header_off as u64).checked_sub(back).ok_or_else(|| {
        MultibootError::BadAddresses(format!(
            "header_addr {header_addr:#x} - load_addr {load_addr:#x} reaches before the start of the file"
        ))
    })?;
    let avail = image.len() as u64 - file_start;
    let size = if load_end == 0 {
        avail
    } else {
        if load_end < load_addr {
            return Err(MultibootError::BadAddresses(format!(
                "load_end_addr {load_end:#x} is below load_addr {load_addr:#x}"
            )));
        }
        u64::from(load_end - load_addr)
    };
    if size > avail {
        return Err(MultibootError::Truncated(format!(
            "the header says {size} bytes load from file offset {file_start}, but the file has only {avail}"
        )));
    }
    let data_end = u64::from(load_addr) + size;
    let zero = if bss_end == 0 {
        0
    } else {
        u64::from(bss_end).checked_sub(data_end).ok_or_else(|| {
            MultibootError::BadAddresses(format!(
                "bss_end_addr {bss_end:#x} is below the end of the loaded data {data_end:#x}"
            ))
        })?
    };
    let data = image[file_start as usize..(file_start + size) as usize].to_vec();
    Ok((
        vec![Segment {
            gpa: u64::from(load_addr),
            data,
            zero,
        }],
        entry,
    ))
}

fn load_elf32(image: &[u8]) -> Result<(Vec<Segment>, u32), MultibootError> {
    let bad = |s: &str| MultibootError::BadElf(s.to_string());
    match image.get(4) {
        Some(1) => {}
        Some(2) => return Err(MultibootError::Elf64),
        _ => return Err(bad("unknown ELF class")),
    }
    if image.get(5) != Some(&1) {
        return Err(bad("not little-endian"));
    }
    let machine =
        u16_at(image, 18).ok_or_else(|| MultibootError::Truncated("ELF header".into()))?;
    if machine != 3 {
        return Err(bad(&format!("machine {machine} is not x86 (EM_386 = 3)")));
    }
    let hdr =
        |off| u32_at(image, off).ok_or_else(|| MultibootError::Truncated("ELF header".into()));
    let entry = hdr(24)?;
    let phoff = hdr(28)? as usize;
    let phentsize =
        u16_at(image, 42).ok_or_else(|| MultibootError::Truncated("ELF header".into()))?;
    let phnum = u16_at(image, 44).ok_or_else(|| MultibootError::Truncated("ELF header".into()))?;
    if phentsize < 32 {
        return Err(bad(&format!("program header size {phentsize} < 32")));
    }
    let mut segments = Vec::new();
    let mut phys_entry = entry;
    for i in 0..usize::from(phnum) {
        let base = phoff
            .checked_add(i * usize::from(phentsize))
            .ok_or_else(|| bad("program header offset overflows"))?;
        let ph = |field: usize| {
            u32_at(image, base + field).ok_or_else(|| {
                MultibootError::Truncated(format!(
                    "program header {i} lies past the end of the file"
                ))
            })
        };
        if ph(0)? != 1 {
            continue; // not PT_LOAD
        }
        let (offset, vaddr, paddr, filesz, memsz) = (ph(4)?, ph(8)?, ph(12)?, ph(16)?, ph(20)?);
        if memsz == 0 {
            continue;
        }
        if filesz > memsz {
            return Err(bad(&format!(
                "segment {i}: file size {filesz} > memory size {memsz}"
            )));
        }
        let start = offset as usize;
        let end = start
            .checked_add(filesz as usize)
            .filter(|e| *e <= image.len())
            .ok_or_else(|| {
                MultibootError::Truncated(format!(
                    "segment {i} needs file bytes {start}..{} but the file has {}",
                    u64::from(offset) + u64::from(filesz),
                    image.len()
                ))
            })?;
        // QEMU runs the entry at its physical address when it lies in a segment's vaddr range.
        if entry >= vaddr && entry - vaddr < memsz && vaddr != paddr {
            phys_entry = entry - vaddr + paddr;
        }
        segments.push(Segment {
            gpa: u64::from(paddr),
            data: image[start..end].to_vec(),
            zero: u64::from(memsz - filesz),
        });
    }
    if segments.is_empty() {
        return Err(bad("no loadable segments"));
    }
    Ok((segments, phys_entry))
}

/// Memory map entry types.
const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;

/// Plans loading `image` into guest RAM laid out as `ram`, with `cmdline` (QEMU passes the
/// image path, a space and the `-append` string).
pub fn plan(image: &[u8], ram: &[RamRange], cmdline: &str) -> Result<LoadPlan, MultibootError> {
    let (header_off, flags) = find_header(image).ok_or(MultibootError::NoHeader)?;
    let unknown = flags & 0xFFFF & !KNOWN_REQUIRED_FLAGS;
    if unknown != 0 {
        return Err(MultibootError::UnsupportedFlags(flags));
    }
    let is_elf = image.starts_with(b"\x7fELF");
    let (segments, entry) = if flags & FLAG_AOUT_KLUDGE != 0 && !is_elf {
        load_aout_kludge(image, header_off)?
    } else if is_elf {
        load_elf32(image)?
    } else {
        return Err(MultibootError::BadAddresses(
            "the image is not ELF and its multiboot header has no load addresses (flag bit 16)"
                .into(),
        ));
    };
    for (i, s) in segments.iter().enumerate() {
        check_fits(&format!("image segment {i}"), s.gpa, s.end(), ram)?;
    }
    let entry_in_image = segments
        .iter()
        .any(|s| u64::from(entry) >= s.gpa && u64::from(entry) < s.end());
    if !entry_in_image {
        return Err(MultibootError::BadAddresses(format!(
            "entry point {entry:#x} is not inside any loaded segment"
        )));
    }

    let image_end = segments.iter().map(Segment::end).max().unwrap_or(0);
    let info_addr = image_end.div_ceil(4096) * 4096;
    let info = build_info(info_addr, ram, cmdline);
    check_fits("multiboot information", info.gpa, info.end(), ram)?;
    let info_addr = u32::try_from(info_addr).map_err(|_| {
        MultibootError::BadAddresses(format!("the image ends above 4 GiB ({image_end:#x})"))
    })?;
    Ok(LoadPlan {
        segments,
        entry,
        info,
        info_addr,
    })
}

fn build_info(addr: u64, ram: &[RamRange], cmdline: &str) -> Segment {
    const INFO_LEN: usize = 128; // struct (116 bytes with framebuffer fields), padded
    let low_end = ram.iter().find(|r| r.0 == 0).map(|r| r.1).unwrap_or(0);
    let mem_lower: u32 = 639;
    let mem_upper = u32::try_from(low_end.saturating_sub(1 << 20) / 1024).unwrap_or(u32::MAX);

    let mut mmap: Vec<(u64, u64, u32)> = Vec::new();
    for &(gpa, size) in ram {
        if gpa == 0 {
            mmap.push((0, 0x9FC00.min(size), E820_RAM));
            mmap.push((0x9FC00, 0x400, E820_RESERVED));
            mmap.push((0xF0000, 0x10000, E820_RESERVED));
            if size > 1 << 20 {
                mmap.push((1 << 20, size - (1 << 20), E820_RAM));
            }
        } else {
            mmap.push((gpa, size, E820_RAM));
        }
    }
    mmap.push((0xFFFC_0000, 0x4_0000, E820_RESERVED));

    let mmap_off = INFO_LEN;
    let mmap_len = mmap.len() * 24;
    let cmd_off = mmap_off + mmap_len;
    let name = b"ferry\0";
    let name_off = cmd_off + cmdline.len() + 1;
    let mut buf = vec![0u8; name_off + name.len()];
    let a = |off: usize| (addr + off as u64) as u32;
    let mut put = |off: usize, v: u32| buf[off..off + 4].copy_from_slice(&v.to_le_bytes());
    put(0, 1 | 1 << 2 | 1 << 6 | 1 << 9); // mem, cmdline, mmap, loader name
    put(4, mem_lower);
    put(8, mem_upper);
    put(16, a(cmd_off));
    put(44, mmap_len as u32);
    put(48, a(mmap_off));
    put(64, a(name_off));
    for (i, (base, len, ty)) in mmap.iter().enumerate() {
        let o = mmap_off + i * 24;
        buf[o..o + 4].copy_from_slice(&20u32.to_le_bytes());
        buf[o + 4..o + 12].copy_from_slice(&base.to_le_bytes());
        buf[o + 12..o + 20].copy_from_slice(&len.to_le_bytes());
        buf[o + 20..o + 24].copy_from_slice(&ty.to_le_bytes());
    }
    buf[cmd_off..cmd_off + cmdline.len()].copy_from_slice(cmdline.as_bytes());
    buf[name_off..name_off + name.len()].copy_from_slice(name);
    Segment {
        gpa: addr,
        data: buf,
        zero: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RAM: &[RamRange] = &[(0, 64 << 20)];

    fn kludge_image(load_end_delta: i64, bss: u32) -> Vec<u8> {
        // header at offset 0, loaded at 1 MiB, 4 KiB of code
        let mut img = vec![0x90u8; 4096];
        let flags = 0x0001_0003u32;
        let words = [
            HEADER_MAGIC,
            flags,
            0u32.wrapping_sub(HEADER_MAGIC.wrapping_add(flags)),
            0x10_0000,
            0x10_0000,
            (0x10_1000i64 + load_end_delta) as u32,
            bss,
            0x10_0020,
        ];
        for (i, w) in words.iter().enumerate() {
            img[i * 4..i * 4 + 4].copy_from_slice(&w.to_le_bytes());
        }
        img
    }

    #[test]
    fn loads_both_workload_images() {
        for img in [ferry_guest::WORKLOAD_ELF, ferry_guest::WORKLOAD_FLAT] {
            let p = plan(img, RAM, "img ws=1M").unwrap();
            assert!(p.entry >= 0x10_0000);
            assert!(p.info_addr as u64 >= p.segments[0].gpa);
            let total: u64 = p
                .segments
                .iter()
                .map(|s| s.data.len() as u64 + s.zero)
                .sum();
            assert!(total > 1 << 20, "bss included");
            // cmdline is there
            let info = &p.info.data;
            let cmd = u32_at(info, 16).unwrap() - p.info_addr;
            assert!(info[cmd as usize..].starts_with(b"img ws=1M\0"));
        }
    }

    #[test]
    fn kludge_fields_and_errors() {
        let p = plan(&kludge_image(0, 0x20_0000), RAM, "").unwrap();
        assert_eq!(p.segments[0].gpa, 0x10_0000);
        assert_eq!(p.segments[0].data.len(), 4096);
        assert_eq!(p.segments[0].zero, 0x20_0000 - 0x10_1000);
        assert_eq!(p.entry, 0x10_0020);
        assert!(matches!(
            plan(&kludge_image(4096, 0), RAM, ""),
            Err(MultibootError::Truncated(_))
        ));
        assert!(matches!(
            plan(&kludge_image(0, 0x10_0800), RAM, ""),
            Err(MultibootError::BadAddresses(_))
        ));
        // bss beyond 64 MiB of RAM
        let err = plan(&kludge_image(0, 0x800_0000), RAM, "").unwrap_err();
        assert!(matches!(err, MultibootError::OutsideRam { .. }), "{err}");
        assert!(err.to_string().contains("64 MiB"));
    }

    #[test]
    fn rejects_garbage_and_truncation() {
        assert_eq!(
            plan(b"hello world, not an image", RAM, ""),
            Err(MultibootError::NoHeader)
        );
        assert_eq!(
            plan(&[0u8; 100_000], RAM, ""),
            Err(MultibootError::NoHeader)
        );
        let elf = ferry_guest::WORKLOAD_ELF;
        // Cut inside the loadable data.
        let err = plan(&elf[..elf.len() / 2], RAM, "").unwrap_err();
        assert!(matches!(err, MultibootError::Truncated(_)), "{err}");
        let mut e64 = elf.to_vec();
        e64[4] = 2;
        assert_eq!(plan(&e64, RAM, ""), Err(MultibootError::Elf64));
        // RAM too small for the image (bss reaches past 2 MiB).
        let err = plan(elf, &[(0, 2 << 20)], "").unwrap_err();
        assert!(matches!(err, MultibootError::OutsideRam { .. }), "{err}");
    }

    #[test]
    fn memory_map_covers_high_ram() {
        let ram = [(0u64, 0xC000_0000u64), (1u64 << 32, 1u64 << 30)];
        let p = plan(ferry_guest::WORKLOAD_ELF, &ram, "").unwrap();
        let info = &p.info.data;
        let mmap_len = u32_at(info, 44).unwrap() as usize;
        let mmap_off = (u32_at(info, 48).unwrap() - p.info_addr) as usize;
        let entries: Vec<(u64, u64, u32)> = (0..mmap_len / 24)
            .map(|i| {
                let o = mmap_off + i * 24;
                let b = u64::from_le_bytes(info[o + 4..o + 12].try_into().unwrap());
                let l = u64::from_le_bytes(info[o + 12..o + 20].try_into().unwrap());
                (b, l, u32_at(info, o + 20).unwrap())
            })
            .collect();
        assert!(entries.contains(&(1 << 32, 1 << 30, 1)));
        assert!(entries.contains(&(1 << 20, 0xC000_0000 - (1 << 20), 1)));
        assert_eq!(u32_at(info, 8).unwrap(), (0xC000_0000 - (1 << 20)) / 1024);
    }
}
