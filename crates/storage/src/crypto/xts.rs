//! XTS-AES-256 (IEEE 1619) over 512-byte sectors with the `plain64` tweak
//! that dm-crypt's `aes-xts-plain64` uses: the little-endian sector number,
//! zero-padded to 16 bytes, encrypted with the second key half.
//!
//! Whole sectors only (requests are multiples of 512 bytes), so ciphertext
//! stealing is never needed. The block cipher is the `aes` crate (AES-NI
//! when the CPU has it); the 32 blocks of a sector go through it together
//! so that it can pipeline them.

use aes::cipher::{BlockDecrypt, BlockEncrypt, KeyInit};
use aes::{Aes256, Block};

use super::keys::DataKey;

/// Bytes per XTS data unit (a sector).
pub const SECTOR: usize = 512;
const BLOCKS: usize = SECTOR / 16;

/// An XTS-AES-256 cipher for one volume.
pub struct Xts256 {
    data: Aes256,
    tweak: Aes256,
    /// VAES/AVX-512 schedules, when the CPU has them.
    #[cfg(target_arch = "x86_64")]
    fast: Option<Box<super::vaes::Keys>>,
}

impl std::fmt::Debug for Xts256 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Xts256 { .. }")
    }
}

/// Multiplies a tweak by x in GF(2^128), little-endian as XTS defines it.
#[inline]
fn mul_x(t: u128) -> u128 {
    (t << 1) ^ if t >> 127 == 1 { 0x87 } else { 0 }
}

fn as_blocks(sector: &mut [u8]) -> &mut [Block] {
    debug_assert_eq!(sector.len() % 16, 0);
    // SAFETY: `Block` is `GenericArray<u8, U16>`, a `#[repr(transparent)]`
    // wrapper of `[u8; 16]` with alignment 1, so a byte slice whose length
    // is a multiple of 16 is a valid slice of blocks over the same memory,
    // borrowed for the same lifetime.
    unsafe {
        std::slice::from_raw_parts_mut(sector.as_mut_ptr().cast::<Block>(), sector.len() / 16)
    }
}

impl Xts256 {
    /// A cipher from a 64-byte key: data key half first, tweak key second
    /// (the order dm-crypt, OpenSSL and `cryptography` use).
    pub fn new(key: &DataKey) -> Self {
        Self::with_fast_path(key, true)
    }

    /// Like [`Xts256::new`]; `fast` false forces the portable path (tests
    /// compare the two).
    pub fn with_fast_path(key: &DataKey, fast: bool) -> Self {
        let (k1, k2) = key.bytes().split_at(32);
        Xts256 {
            data: Aes256::new_from_slice(k1).expect("32-byte key"),
            tweak: Aes256::new_from_slice(k2).expect("32-byte key"),
            #[cfg(target_arch = "x86_64")]
            // SAFETY: only when `available()` confirmed the CPU features.
            fast: (fast && super::vaes::available())
                .then(|| unsafe { super::vaes::Keys::new(key.bytes()) }),
        }
    }

    /// Which implementation runs: "vaes-avx512" or "aes-ni" / "soft" via
    /// the `aes` crate.
    pub fn implementation(&self) -> &'static str {
        #[cfg(target_arch = "x86_64")]
        if self.fast.is_some() {
            return "vaes-avx512";
        }
        "aes crate"
    }

    fn tweaks(&self, sector: u64) -> [u128; BLOCKS] {
        let mut t = Block::default();
        t[..8].copy_from_slice(&sector.to_le_bytes());
        self.tweak.encrypt_block(&mut t);
        let mut x = u128::from_le_bytes(t.into());
        let mut out = [0u128; BLOCKS];
        for o in &mut out {
            *o = x;
            x = mul_x(x);
        }
        out
    }

    fn xor_tweaks(buf: &mut [u8], tweaks: &[u128; BLOCKS]) {
        for (chunk, t) in buf.chunks_exact_mut(16).zip(tweaks) {
            let v = u128::from_le_bytes(chunk.try_into().expect("16 bytes")) ^ t;
            chunk.copy_from_slice(&v.to_le_bytes());
        }
    }

    /// Encrypts whole sectors in place; `first_sector` is the volume-relative
    /// number of the first one.
    pub fn encrypt(&self, buf: &mut [u8], first_sector: u64) {
        assert!(
            buf.len().is_multiple_of(SECTOR),
            "XTS works on whole sectors"
        );
        #[cfg(target_arch = "x86_64")]
        if let Some(f) = &self.fast {
            // SAFETY: `fast` exists only on CPUs with the needed features.
            unsafe { f.process(buf, first_sector, true) };
            return;
        }
        for (i, s) in buf.chunks_exact_mut(SECTOR).enumerate() {
            let tw = self.tweaks(first_sector.wrapping_add(i as u64));
            Self::xor_tweaks(s, &tw);
            self.data.encrypt_blocks(as_blocks(s));
            Self::xor_tweaks(s, &tw);
        }
    }

    /// Encrypts `dst.len()` bytes (whole sectors) read from `src` into
    /// `dst`. `src` is read only byte-wise or with vector loads, never
    /// referenced, so it may be guest memory.
    ///
    /// # Safety
    ///
    /// `src` must be readable for `dst.len()` bytes and not overlap `dst`.
    pub unsafe fn encrypt_from(&self, src: *const u8, dst: &mut [u8], first_sector: u64) {
        assert!(
            dst.len().is_multiple_of(SECTOR),
            "XTS works on whole sectors"
        );
        #[cfg(target_arch = "x86_64")]
        if let Some(f) = &self.fast {
            // SAFETY: CPU features checked when `fast` was made; the
            // caller vouches for `src`; `dst` is a valid exclusive buffer.
            unsafe { f.process_raw(src, dst.as_mut_ptr(), dst.len(), first_sector, true) };
            return;
        }
        // SAFETY: per the contract, `src` is readable for `dst.len()`
        // bytes and does not overlap `dst`.
        unsafe { std::ptr::copy_nonoverlapping(src, dst.as_mut_ptr(), dst.len()) };
        self.encrypt(dst, first_sector);
    }

    /// Decrypts `src` (whole sectors; used as scratch, left in an
    /// unspecified state) into `dst`, which is written only with stores,
    /// never referenced, so it may be guest memory.
    ///
    /// # Safety
    ///
    /// `dst` must be writable for `src.len()` bytes and not overlap `src`.
    pub unsafe fn decrypt_into(&self, src: &mut [u8], dst: *mut u8, first_sector: u64) {
        assert!(
            src.len().is_multiple_of(SECTOR),
            "XTS works on whole sectors"
        );
        #[cfg(target_arch = "x86_64")]
        if let Some(f) = &self.fast {
            // SAFETY: CPU features checked when `fast` was made; the
            // caller vouches for `dst`.
            unsafe { f.process_raw(src.as_ptr(), dst, src.len(), first_sector, false) };
            return;
        }
        self.decrypt(src, first_sector);
        // SAFETY: per the contract.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), dst, src.len()) };
    }

    /// Encrypts (`encrypt` true) or decrypts `len` bytes of whole sectors
    /// from `src` to `dst`, both raw memory that is only copied, never
    /// referenced (either may be guest memory or a device's pages); `src`
    /// is left as it was.
    ///
    /// # Safety
    ///
    /// `src` must be readable and `dst` writable for `len` bytes, and they
    /// must not overlap.
    pub unsafe fn process_raw(
        &self,
        src: *const u8,
        dst: *mut u8,
        len: usize,
        first_sector: u64,
        encrypt: bool,
    ) {
        assert!(len.is_multiple_of(SECTOR), "XTS works on whole sectors");
        #[cfg(target_arch = "x86_64")]
        if let Some(f) = &self.fast {
            // SAFETY: CPU features checked when `fast` was made; the caller
            // vouches for both ranges.
            unsafe { f.process_raw(src, dst, len, first_sector, encrypt) };
            return;
        }
        let mut sector = [0u8; SECTOR];
        for i in 0..len / SECTOR {
            // SAFETY: sector `i` of both ranges is inside `len` bytes the
            // caller vouches for; `sector` is our own buffer.
            unsafe {
                std::ptr::copy_nonoverlapping(src.add(i * SECTOR), sector.as_mut_ptr(), SECTOR)
            };
            let n = first_sector.wrapping_add(i as u64);
            if encrypt {
                self.encrypt(&mut sector, n);
            } else {
                self.decrypt(&mut sector, n);
            }
            // SAFETY: as above.
            unsafe { std::ptr::copy_nonoverlapping(sector.as_ptr(), dst.add(i * SECTOR), SECTOR) };
        }
    }

    /// Decrypts whole sectors in place.
    pub fn decrypt(&self, buf: &mut [u8], first_sector: u64) {
        assert!(
            buf.len().is_multiple_of(SECTOR),
            "XTS works on whole sectors"
        );
        #[cfg(target_arch = "x86_64")]
        if let Some(f) = &self.fast {
            // SAFETY: `fast` exists only on CPUs with the needed features.
            unsafe { f.process(buf, first_sector, false) };
            return;
        }
        for (i, s) in buf.chunks_exact_mut(SECTOR).enumerate() {
            let tw = self.tweaks(first_sector.wrapping_add(i as u64));
            Self::xor_tweaks(s, &tw);
            self.data.decrypt_blocks(as_blocks(s));
            Self::xor_tweaks(s, &tw);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    /// IEEE 1619-2007 XTS-AES-256 vector 10: 512-byte data unit, sequence
    /// number 0xff.
    #[test]
    fn ieee_1619_vector_10() {
        let key1 = "2718281828459045235360287471352662497757247093699959574966967627";
        let key2 = "3141592653589793238462643383279502884197169399375105820974944592";
        let key = DataKey::from_bytes(&hex(&format!("{key1}{key2}"))).unwrap();
        let x = Xts256::new(&key);
        let mut buf: Vec<u8> = (0..512u32).map(|i| (i % 256) as u8).collect();
        x.encrypt(&mut buf, 0xff);
        let expect_start = hex("1c3b3a102f770386e4836c99e370cf9bea00803f5e482357a4ae12d414a3e63b");
        assert_eq!(&buf[..32], &expect_start[..]);
        x.decrypt(&mut buf, 0xff);
        assert!(buf.iter().enumerate().all(|(i, &b)| b == (i % 256) as u8));
    }

    #[test]
    fn fast_and_portable_paths_agree() {
        // Sector counts 1..=9 cover every remainder of the fast path's
        // four-sector groups; the start sectors include one whose group
        // wraps past u64::MAX (plain64 numbers wrap).
        for (round, first) in [1234567u64, 0, u64::MAX - 2, 0xffff_ffff]
            .into_iter()
            .enumerate()
        {
            let key = DataKey::generate();
            let fast = Xts256::new(&key);
            let slow = Xts256::with_fast_path(&key, false);
            for sectors in 1..=9usize {
                let plain: Vec<u8> = (0..512 * sectors as u32)
                    .map(|i| (i * 7 % 251) as u8 ^ round as u8)
                    .collect();
                let (mut a, mut b) = (plain.clone(), plain.clone());
                fast.encrypt(&mut a, first);
                slow.encrypt(&mut b, first);
                assert_eq!(
                    a,
                    b,
                    "{} differs from the portable path ({sectors} sectors from {first})",
                    fast.implementation()
                );
                fast.decrypt(&mut a, first);
                assert_eq!(a, plain);
                slow.decrypt(&mut b, first);
                assert_eq!(b, plain);
            }
        }
    }

    #[test]
    fn out_of_place_matches_in_place() {
        for fast in [true, false] {
            let x = Xts256::with_fast_path(&DataKey::generate(), fast);
            let plain: Vec<u8> = (0..2048u32).map(|i| (i * 13 % 253) as u8).collect();
            let mut inplace = plain.clone();
            x.encrypt(&mut inplace, 77);
            let mut out = vec![0u8; plain.len()];
            // SAFETY: `plain` is readable for out.len() bytes, separate.
            unsafe { x.encrypt_from(plain.as_ptr(), &mut out, 77) };
            assert_eq!(out, inplace);
            let mut back = vec![0u8; plain.len()];
            // SAFETY: `back` is writable for out.len() bytes, separate.
            unsafe { x.decrypt_into(&mut out, back.as_mut_ptr(), 77) };
            assert_eq!(back, plain);
        }
    }

    #[test]
    fn ieee_1619_vector_10_portable() {
        let key1 = "2718281828459045235360287471352662497757247093699959574966967627";
        let key2 = "3141592653589793238462643383279502884197169399375105820974944592";
        let key = DataKey::from_bytes(&hex(&format!("{key1}{key2}"))).unwrap();
        let x = Xts256::with_fast_path(&key, false);
        let mut buf: Vec<u8> = (0..512u32).map(|i| (i % 256) as u8).collect();
        x.encrypt(&mut buf, 0xff);
        assert_eq!(&buf[..16], &hex("1c3b3a102f770386e4836c99e370cf9b")[..]);
    }

    #[test]
    fn sectors_differ_and_round_trip() {
        let key = DataKey::generate();
        let x = Xts256::new(&key);
        let plain = vec![0x5au8; 4096];
        let mut a = plain.clone();
        x.encrypt(&mut a, 10);
        // Identical plaintext sectors encrypt differently.
        assert_ne!(&a[..512], &a[512..1024]);
        // Encrypting sector 11 alone matches the second sector above.
        let mut b = plain[..512].to_vec();
        x.encrypt(&mut b, 11);
        assert_eq!(&b[..], &a[512..1024]);
        x.decrypt(&mut a, 10);
        assert_eq!(a, plain);
    }
}
