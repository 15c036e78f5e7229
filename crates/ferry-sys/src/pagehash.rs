//! xxh3-64 (seed 0, default secret) of one 4 KiB page, read through raw pointers only.
//!
//! Page checksums are hashed where the page lies in guest memory, which a running vCPU or
//! the kernel (a socket read placing a page) may write at the same time. Hashing crates
//! take a `&[u8]`, and a shared reference promises the compiler that the bytes do not
//! change while it lives; guest memory makes no such promise. Here every load is a plain
//! load through a raw pointer, as vm-memory's own copies out of guest memory are, and no
//! reference to the page exists: a concurrent write can only change the value returned.
//! The value is the same as [`twox_hash::XxHash3_64::oneshot`] of the page's bytes (tested),
//! so the wire format does not depend on which side hashed how.
//!
//! The algorithm is xxHash's XXH3 long-input loop specialised to 4096 bytes: three blocks
//! of 16 stripes, each followed by a scramble, 15 stripes of the last block, the last
//! stripe at the end, then the accumulators merged. AVX2 where the CPU has it (as fast as
//! the crate's own, 40 GB/s in cache here); elsewhere the page is copied into a local buffer
//! first and hashed by the crate.

/// The page size this hashes.
pub const PAGE: usize = 4096;

/// XXH3's default secret (`kSecret` in the xxHash specification).
const SECRET: [u8; 192] = [
    0xb8, 0xfe, 0x6c, 0x39, 0x23, 0xa4, 0x4b, 0xbe, 0x7c, 0x01, 0x81, 0x2c, 0xf7, 0x21, 0xad, 0x1c,
    0xde, 0xd4, 0x6d, 0xe9, 0x83, 0x90, 0x97, 0xdb, 0x72, 0x40, 0xa4, 0xa4, 0xb7, 0xb3, 0x67, 0x1f,
    0xcb, 0x79, 0xe6, 0x4e, 0xcc, 0xc0, 0xe5, 0x78, 0x82, 0x5a, 0xd0, 0x7d, 0xcc, 0xff, 0x72, 0x21,
    0xb8, 0x08, 0x46, 0x74, 0xf7, 0x43, 0x24, 0x8e, 0xe0, 0x35, 0x90, 0xe6, 0x81, 0x3a, 0x26, 0x4c,
    0x3c, 0x28, 0x52, 0xbb, 0x91, 0xc3, 0x00, 0xcb, 0x88, 0xd0, 0x65, 0x8b, 0x1b, 0x53, 0x2e, 0xa3,
    0x71, 0x64, 0x48, 0x97, 0xa2, 0x0d, 0xf9, 0x4e, 0x38, 0x19, 0xef, 0x46, 0xa9, 0xde, 0xac, 0xd8,
    0xa8, 0xfa, 0x76, 0x3f, 0xe3, 0x9c, 0x34, 0x3f, 0xf9, 0xdc, 0xbb, 0xc7, 0xc7, 0x0b, 0x4f, 0x1d,
    0x8a, 0x51, 0xe0, 0x4b, 0xcd, 0xb4, 0x59, 0x31, 0xc8, 0x9f, 0x7e, 0xc9, 0xd9, 0x78, 0x73, 0x64,
    0xea, 0xc5, 0xac, 0x83, 0x34, 0xd3, 0xeb, 0xc3, 0xc5, 0x81, 0xa0, 0xff, 0xfa, 0x13, 0x63, 0xeb,
    0x17, 0x0d, 0xdd, 0x51, 0xb7, 0xf0, 0xda, 0x49, 0xd3, 0x16, 0x55, 0x26, 0x29, 0xd4, 0x68, 0x9e,
    0x2b, 0x16, 0xbe, 0x58, 0x7d, 0x47, 0xa1, 0xfc, 0x8f, 0xf8, 0xb8, 0xd1, 0x7a, 0xd0, 0x31, 0xce,
    0x45, 0xcb, 0x3a, 0x8f, 0x95, 0x16, 0x04, 0x28, 0xaf, 0xd7, 0xfb, 0xca, 0xbb, 0x4b, 0x40, 0x7e,
];

const PRIME32_1: u64 = 0x9E37_79B1;
const PRIME32_2: u64 = 0x85EB_CA77;
const PRIME32_3: u64 = 0xC2B2_AE3D;
const PRIME64_1: u64 = 0x9E37_79B1_85EB_CA87;
const PRIME64_2: u64 = 0xC2B2_AE3D_27D4_EB4F;
const PRIME64_3: u64 = 0x1656_67B1_9E37_79F9;
const PRIME64_4: u64 = 0x85EB_CA77_C2B2_AE63;
const PRIME64_5: u64 = 0x27D4_EB2F_1656_67C5;
const PRIME_MX1: u64 = 0x1656_6791_9E37_79F9;

const STRIPE: usize = 64;
/// Secret bytes each stripe moves on by.
const SECRET_STEP: usize = 8;
const STRIPES_PER_BLOCK: usize = (SECRET.len() - STRIPE) / SECRET_STEP;
const BLOCK: usize = STRIPE * STRIPES_PER_BLOCK;
const FULL_BLOCKS: usize = (PAGE - 1) / BLOCK;
const LAST_STRIPES: usize = ((PAGE - 1) - BLOCK * FULL_BLOCKS) / STRIPE;
/// Where the scramble's key starts in the secret.
const SCRAMBLE_KEY: usize = SECRET.len() - STRIPE;
/// Where the last stripe's key starts.
const LAST_KEY: usize = SECRET.len() - STRIPE - 7;
/// Where the merge's key starts.
const MERGE_KEY: usize = 11;

/// Little-endian word of the secret at `off`.
const fn secret_word(off: usize) -> u64 {
    let s = &SECRET;
    u64::from_le_bytes([
        s[off],
        s[off + 1],
        s[off + 2],
        s[off + 3],
        s[off + 4],
        s[off + 5],
        s[off + 6],
        s[off + 7],
    ])
}

/// Folds the accumulators into the hash.
fn merge(acc: &[u64; 8]) -> u64 {
    let mut h = (PAGE as u64).wrapping_mul(PRIME64_1);
    for i in 0..4 {
        let lo = acc[2 * i] ^ secret_word(MERGE_KEY + 16 * i);
        let hi = acc[2 * i + 1] ^ secret_word(MERGE_KEY + 16 * i + 8);
        let p = u128::from(lo) * u128::from(hi);
        h = h.wrapping_add((p as u64) ^ ((p >> 64) as u64));
    }
    h ^= h >> 37;
    h = h.wrapping_mul(PRIME_MX1);
    h ^ (h >> 32)
}

const INITIAL: [u64; 8] = [
    PRIME32_3, PRIME64_1, PRIME64_2, PRIME64_3, PRIME64_4, PRIME32_2, PRIME64_5, PRIME32_1,
];

/// The xxh3-64 of the 4096 bytes at `page`.
///
/// # Safety
/// `page` must be valid for reads of [`PAGE`] bytes for the whole call. The bytes may
/// change meanwhile (see the module documentation).
pub unsafe fn page_xxh3(page: *const u8) -> u64 {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: AVX2 is present (checked just above); `page` is valid for PAGE bytes
        // (this function's contract).
        return unsafe { avx2::page_xxh3(page) };
    }
    let mut buf = [0u8; PAGE];
    // SAFETY: `page` is valid for PAGE bytes (this function's contract), `buf` is a local
    // array of that size, so the two do not overlap; raw-pointer loads, no reference.
    unsafe { std::ptr::copy_nonoverlapping(page, buf.as_mut_ptr(), PAGE) };
    twox_hash::XxHash3_64::oneshot(&buf)
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::{
        __m256i, _mm256_add_epi64, _mm256_loadu_si256, _mm256_mul_epu32, _mm256_set1_epi32,
        _mm256_shuffle_epi32, _mm256_slli_epi64, _mm256_srli_epi64, _mm256_storeu_si256,
        _mm256_xor_si256,
    };

    use super::{
        merge, BLOCK, FULL_BLOCKS, INITIAL, LAST_KEY, LAST_STRIPES, PAGE, PRIME32_1, SCRAMBLE_KEY,
        SECRET, SECRET_STEP, STRIPE, STRIPES_PER_BLOCK,
    };

    /// One stripe of 64 bytes at `data` into the accumulators, with the secret at `key`.
    ///
    /// # Safety
    /// The CPU must have AVX2; `data` and `key` must be valid for reads of 64 bytes.
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn stripe(acc: &mut [__m256i; 2], data: *const u8, key: *const u8) {
        for (i, a) in acc.iter_mut().enumerate() {
            // SAFETY: AVX2 is present and `data`, `key` are valid for 64 bytes (this
            // function's contract). Unaligned loads through raw pointers.
            unsafe {
                let d = _mm256_loadu_si256(data.add(32 * i).cast());
                let k = _mm256_loadu_si256(key.add(32 * i).cast());
                let dk = _mm256_xor_si256(d, k);
                // Each lane: low 32 bits times high 32 bits of data ^ key.
                let product = _mm256_mul_epu32(dk, _mm256_shuffle_epi32::<0x31>(dk));
                // The data goes to the neighbouring lane.
                let swapped = _mm256_shuffle_epi32::<0x4E>(d);
                *a = _mm256_add_epi64(product, _mm256_add_epi64(*a, swapped));
            }
        }
    }

    /// The scramble after each full block.
    ///
    /// # Safety
    /// The CPU must have AVX2.
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn scramble(acc: &mut [__m256i; 2]) {
        for (i, a) in acc.iter_mut().enumerate() {
            // SAFETY: AVX2 is present (this function's contract); the key is 32 bytes
            // inside SECRET (SCRAMBLE_KEY + 64 is its length).
            unsafe {
                let prime = _mm256_set1_epi32(PRIME32_1 as i32);
                let k = _mm256_loadu_si256(SECRET.as_ptr().add(SCRAMBLE_KEY + 32 * i).cast());
                let x = _mm256_xor_si256(_mm256_xor_si256(*a, _mm256_srli_epi64::<47>(*a)), k);
                // x * PRIME32_1, 64-bit, from two 32x32 multiplies.
                let lo = _mm256_mul_epu32(x, prime);
                let hi = _mm256_mul_epu32(_mm256_shuffle_epi32::<0x31>(x), prime);
                *a = _mm256_add_epi64(lo, _mm256_slli_epi64::<32>(hi));
            }
        }
    }

    /// [`super::page_xxh3`] with AVX2.
    ///
    /// # Safety
    /// The CPU must have AVX2, and `page` must be valid for reads of PAGE bytes.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn page_xxh3(page: *const u8) -> u64 {
        let key = SECRET.as_ptr();
        // SAFETY: INITIAL is 8 words, read as two unaligned 32-byte vectors.
        let mut acc = unsafe {
            [
                _mm256_loadu_si256(INITIAL.as_ptr().cast()),
                _mm256_loadu_si256(INITIAL.as_ptr().add(4).cast()),
            ]
        };
        // SAFETY: AVX2 is present (this function's contract); every offset below stays
        // inside the page (at most PAGE - 64 for a 64-byte stripe) and inside SECRET (at
        // most its length - 64).
        unsafe {
            for b in 0..FULL_BLOCKS {
                for s in 0..STRIPES_PER_BLOCK {
                    stripe(
                        &mut acc,
                        page.add(b * BLOCK + s * STRIPE),
                        key.add(s * SECRET_STEP),
                    );
                }
                scramble(&mut acc);
            }
            for s in 0..LAST_STRIPES {
                stripe(
                    &mut acc,
                    page.add(FULL_BLOCKS * BLOCK + s * STRIPE),
                    key.add(s * SECRET_STEP),
                );
            }
            stripe(&mut acc, page.add(PAGE - STRIPE), key.add(LAST_KEY));
        }
        let mut out = [0u64; 8];
        // SAFETY: `out` is 8 words, written as two unaligned 32-byte vectors.
        unsafe {
            _mm256_storeu_si256(out.as_mut_ptr().cast(), acc[0]);
            _mm256_storeu_si256(out.as_mut_ptr().add(4).cast(), acc[1]);
        }
        merge(&out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ours(page: &[u8]) -> u64 {
        assert_eq!(page.len(), PAGE);
        // SAFETY: the slice is PAGE bytes and nothing writes it meanwhile.
        unsafe { page_xxh3(page.as_ptr()) }
    }

    #[test]
    fn equals_the_crates_xxh3_on_every_kind_of_page() {
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        let mut random = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut pages: Vec<Vec<u8>> = vec![vec![0; PAGE], vec![0xFF; PAGE]];
        for _ in 0..200 {
            pages.push((0..PAGE).map(|_| random() as u8).collect());
        }
        // One bit set at every position a stripe, block or the last stripe starts.
        for bit in [
            0,
            7,
            63 * 8,
            1024 * 8,
            3071 * 8 + 7,
            3072 * 8,
            4032 * 8,
            PAGE * 8 - 1,
        ] {
            let mut p = vec![0u8; PAGE];
            p[bit / 8] |= 1 << (bit % 8);
            pages.push(p);
        }
        for p in &pages {
            assert_eq!(ours(p), twox_hash::XxHash3_64::oneshot(p));
        }
        // Unaligned pages too (the loads are unaligned).
        let buf: Vec<u8> = (0..PAGE + 1).map(|i| (i * 31) as u8).collect();
        // SAFETY: PAGE bytes from offset 1 of a PAGE + 1 byte buffer.
        let odd = unsafe { page_xxh3(buf.as_ptr().add(1)) };
        assert_eq!(odd, twox_hash::XxHash3_64::oneshot(&buf[1..]));
    }
}
