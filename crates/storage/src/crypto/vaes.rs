//! XTS-AES-256 with VAES and AVX-512 (x86-64): four AES blocks per
//! instruction, the 32 blocks of a sector in eight independent streams.
//! Used when the CPU has `vaes` and `avx512f`; [`super::xts`] falls back to
//! the `aes` crate otherwise. Checked against that path and the IEEE 1619
//! vector in the tests.

use std::arch::x86_64::{
    __m128i, __m512i, _mm512_aesdec_epi128, _mm512_aesdeclast_epi128, _mm512_aesenc_epi128,
    _mm512_aesenclast_epi128, _mm512_broadcast_i32x4, _mm512_bslli_epi128, _mm512_bsrli_epi128,
    _mm512_loadu_si512, _mm512_slli_epi64, _mm512_srli_epi64, _mm512_storeu_si512,
    _mm512_xor_si512, _mm_aesenc_si128, _mm_aesenclast_si128, _mm_aesimc_si128,
    _mm_aeskeygenassist_si128, _mm_loadu_si128, _mm_shuffle_epi32, _mm_slli_si128,
    _mm_storeu_si128, _mm_xor_si128,
};

const ROUNDS: usize = 14;
const SECTOR: usize = 512;
const STREAMS: usize = SECTOR / 64;

/// Whether this CPU can run this module's code.
pub(super) fn available() -> bool {
    std::arch::is_x86_feature_detected!("vaes")
        && std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx512bw")
        && std::arch::is_x86_feature_detected!("aes")
}

/// Multiplies four 128-bit XTS tweaks (one per lane, little-endian) by
/// alpha^4 in GF(2^128): shift left by 4 across the lane, and fold the 4
/// bits shifted out back in through x^7 + x^2 + x + 1.
#[inline]
#[target_feature(enable = "avx512f,avx512bw")]
fn mul_alpha4(x: __m512i) -> __m512i {
    let top = _mm512_srli_epi64::<60>(x); // the top 4 bits of each qword
    let into_hi = _mm512_bslli_epi128::<8>(top); // low qword's carry → high
    let out = _mm512_bsrli_epi128::<8>(top); // high qword's overflow → low
    let red = _mm512_xor_si512(
        _mm512_xor_si512(out, _mm512_slli_epi64::<1>(out)),
        _mm512_xor_si512(_mm512_slli_epi64::<2>(out), _mm512_slli_epi64::<7>(out)),
    );
    _mm512_xor_si512(_mm512_xor_si512(_mm512_slli_epi64::<4>(x), into_hi), red)
}

/// Round keys of both XTS halves.
pub(super) struct Keys {
    /// Data key, encryption schedule, broadcast to four lanes.
    enc: [__m512i; ROUNDS + 1],
    /// Data key, decryption (equivalent inverse) schedule.
    dec: [__m512i; ROUNDS + 1],
    /// Tweak key, encryption schedule.
    tweak: [__m128i; ROUNDS + 1],
}

impl Drop for Keys {
    fn drop(&mut self) {
        // Key schedules are key material: wipe them.
        let bytes = std::mem::size_of::<Keys>();
        let p = (self as *mut Keys).cast::<u8>();
        for i in 0..bytes {
            // SAFETY: `p..p+bytes` is this value's own memory; volatile so
            // the wipe is not optimised away.
            unsafe { p.add(i).write_volatile(0) };
        }
    }
}

macro_rules! expand_step {
    ($k0:ident, $k1:ident, $rk:ident, $i:expr, $rcon:expr, $last:expr) => {{
        let t = _mm_shuffle_epi32::<0xff>(_mm_aeskeygenassist_si128::<$rcon>($k1));
        $k0 = _mm_xor_si128($k0, _mm_slli_si128::<4>($k0));
        $k0 = _mm_xor_si128($k0, _mm_slli_si128::<4>($k0));
        $k0 = _mm_xor_si128($k0, _mm_slli_si128::<4>($k0));
        $k0 = _mm_xor_si128($k0, t);
        $rk[2 * $i] = $k0;
        if !$last {
            let t = _mm_shuffle_epi32::<0xaa>(_mm_aeskeygenassist_si128::<0>($k0));
            $k1 = _mm_xor_si128($k1, _mm_slli_si128::<4>($k1));
            $k1 = _mm_xor_si128($k1, _mm_slli_si128::<4>($k1));
            $k1 = _mm_xor_si128($k1, _mm_slli_si128::<4>($k1));
            $k1 = _mm_xor_si128($k1, t);
            $rk[2 * $i + 1] = $k1;
        }
    }};
}

/// AES-256 key expansion (FIPS 197) with AES-NI.
#[target_feature(enable = "aes,sse2")]
fn expand(key: &[u8; 32]) -> [__m128i; ROUNDS + 1] {
    // SAFETY: unaligned loads of 16 bytes from a 32-byte array.
    let (mut k0, mut k1) = unsafe {
        (
            _mm_loadu_si128(key.as_ptr().cast()),
            _mm_loadu_si128(key.as_ptr().add(16).cast()),
        )
    };
    let mut rk = [k0; ROUNDS + 1];
    rk[1] = k1;
    expand_step!(k0, k1, rk, 1, 0x01, false);
    expand_step!(k0, k1, rk, 2, 0x02, false);
    expand_step!(k0, k1, rk, 3, 0x04, false);
    expand_step!(k0, k1, rk, 4, 0x08, false);
    expand_step!(k0, k1, rk, 5, 0x10, false);
    expand_step!(k0, k1, rk, 6, 0x20, false);
    expand_step!(k0, k1, rk, 7, 0x40, true);
    rk
}

impl Keys {
    /// Schedules for a 64-byte XTS key (data half, tweak half).
    ///
    /// # Safety
    ///
    /// The CPU must have the features [`available`] checks.
    pub(super) unsafe fn new(key: &[u8; 64]) -> Box<Keys> {
        let data: &[u8; 32] = key[..32].try_into().expect("32 bytes");
        let tweak: &[u8; 32] = key[32..].try_into().expect("32 bytes");
        // SAFETY: the caller promises AES-NI, VAES and AVX-512F.
        unsafe {
            let e = expand(data);
            let mut d = [e[0]; ROUNDS + 1];
            d[0] = e[ROUNDS];
            for i in 1..ROUNDS {
                d[i] = _mm_aesimc_si128(e[ROUNDS - i]);
            }
            d[ROUNDS] = e[0];
            Box::new(Keys {
                enc: e.map(|k| _mm512_broadcast_i32x4(k)),
                dec: d.map(|k| _mm512_broadcast_i32x4(k)),
                tweak: expand(tweak),
            })
        }
    }

    /// Encrypts the 16-byte tweak block with the tweak key.
    #[target_feature(enable = "aes,sse2")]
    fn tweak0(&self, sector: u64) -> u128 {
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&sector.to_le_bytes());
        // SAFETY: 16-byte unaligned load/store on a local array.
        unsafe {
            let mut x = _mm_xor_si128(_mm_loadu_si128(b.as_ptr().cast()), self.tweak[0]);
            for k in &self.tweak[1..ROUNDS] {
                x = _mm_aesenc_si128(x, *k);
            }
            x = _mm_aesenclast_si128(x, self.tweak[ROUNDS]);
            _mm_storeu_si128(b.as_mut_ptr().cast(), x);
        }
        u128::from_le_bytes(b)
    }

    /// Encrypts (or decrypts) whole sectors in place.
    ///
    /// # Safety
    ///
    /// The CPU must have the features [`available`] checks.
    pub(super) unsafe fn process(&self, buf: &mut [u8], first_sector: u64, encrypt: bool) {
        assert!(buf.len().is_multiple_of(SECTOR));
        let p = buf.as_mut_ptr();
        // SAFETY: source and destination are the same valid buffer; the
        // caller vouches for the CPU features.
        unsafe { self.process_raw(p, p, buf.len(), first_sector, encrypt) }
    }

    /// Encrypts (or decrypts) `len` bytes of whole sectors from `src` to
    /// `dst`, which may be the same memory. Memory is only read and written
    /// through unaligned vector loads and stores, never referenced, so
    /// either side may be guest memory.
    ///
    /// # Safety
    ///
    /// The CPU must have the features [`available`] checks; `src` must be
    /// readable and `dst` writable for `len` bytes; they either coincide or
    /// do not overlap.
    #[target_feature(enable = "avx512f,avx512bw,vaes,aes,sse2")]
    pub(super) unsafe fn process_raw(
        &self,
        src: *const u8,
        dst: *mut u8,
        len: usize,
        first_sector: u64,
        encrypt: bool,
    ) {
        assert!(len.is_multiple_of(SECTOR));
        let keys = if encrypt { &self.enc } else { &self.dec };
        for n in 0..len / SECTOR {
            // The first four tweaks in scalar code, the other 28 four at a
            // time: each 64-byte chunk's tweaks are the previous chunk's
            // times alpha^4.
            let mut t = self.tweak0(first_sector.wrapping_add(n as u64));
            let mut first = [0u128; 4];
            for w in &mut first {
                *w = t;
                t = (t << 1) ^ if t >> 127 == 1 { 0x87 } else { 0 };
            }
            // SAFETY: all loads and stores are unaligned 64-byte accesses
            // inside sector `n` of `src`/`dst` (per the contract) or inside
            // `first` (64 bytes).
            unsafe {
                let sp = src.add(n * SECTOR);
                let dp = dst.add(n * SECTOR);
                let mut tw = [_mm512_loadu_si512(first.as_ptr().cast()); STREAMS];
                for j in 1..STREAMS {
                    tw[j] = mul_alpha4(tw[j - 1]);
                }
                let mut x: [__m512i; STREAMS] = std::array::from_fn(|j| {
                    let v = _mm512_loadu_si512(sp.add(64 * j).cast());
                    _mm512_xor_si512(_mm512_xor_si512(v, tw[j]), keys[0])
                });
                if encrypt {
                    for k in &keys[1..ROUNDS] {
                        for v in &mut x {
                            *v = _mm512_aesenc_epi128(*v, *k);
                        }
                    }
                    for v in &mut x {
                        *v = _mm512_aesenclast_epi128(*v, keys[ROUNDS]);
                    }
                } else {
                    for k in &keys[1..ROUNDS] {
                        for v in &mut x {
                            *v = _mm512_aesdec_epi128(*v, *k);
                        }
                    }
                    for v in &mut x {
                        *v = _mm512_aesdeclast_epi128(*v, keys[ROUNDS]);
                    }
                }
                for (j, v) in x.iter().enumerate() {
                    _mm512_storeu_si512(dp.add(64 * j).cast(), _mm512_xor_si512(*v, tw[j]));
                }
            }
        }
    }
}
