//! XTS-AES-256 with VAES and AVX-512 (x86-64): four AES blocks per
//! instruction, the 32 blocks of a sector in eight independent streams.
//! Used when the CPU has `vaes`, `vpclmulqdq` and `avx512f`; [`super::xts`] falls back to
//! the `aes` crate otherwise. Checked against that path and the IEEE 1619
//! vector in the tests.

use std::arch::x86_64::{
    __m128i, __m512i, _mm512_add_epi64, _mm512_aesdec_epi128, _mm512_aesdeclast_epi128,
    _mm512_aesenc_epi128, _mm512_aesenclast_epi128, _mm512_broadcast_i32x4, _mm512_bslli_epi128,
    _mm512_clmulepi64_epi128, _mm512_loadu_si512, _mm512_maskz_mov_epi64, _mm512_permutexvar_epi64,
    _mm512_set1_epi64, _mm512_set_epi64, _mm512_slli_epi64, _mm512_sllv_epi64, _mm512_srli_epi64,
    _mm512_srlv_epi64, _mm512_storeu_si512, _mm512_sub_epi64, _mm512_ternarylogic_epi64,
    _mm512_xor_si512, _mm_aesimc_si128, _mm_aeskeygenassist_si128, _mm_loadu_si128,
    _mm_shuffle_epi32, _mm_slli_si128, _mm_xor_si128,
};

const ROUNDS: usize = 14;
const SECTOR: usize = 512;
const STREAMS: usize = SECTOR / 64;
/// Sectors whose tweaks are worked out together.
const GROUP: usize = 4;

/// Whether this CPU can run this module's code.
pub(super) fn available() -> bool {
    std::arch::is_x86_feature_detected!("vaes")
        && std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx512bw")
        && std::arch::is_x86_feature_detected!("aes")
        && std::arch::is_x86_feature_detected!("vpclmulqdq")
}

/// Multiplies four 128-bit XTS tweaks (one per lane, little-endian) by
/// alpha^4 in GF(2^128): shift left by 4 across the lane, and fold the 4
/// bits shifted out of the top back in as a carry-less product with
/// x^7 + x^2 + x + 1 (0x87). Five instructions.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,vpclmulqdq")]
fn mul_alpha4(x: __m512i) -> __m512i {
    let top = _mm512_srli_epi64::<60>(x); // the top 4 bits of each qword
    let into_hi = _mm512_bslli_epi128::<8>(top); // low qword's carry → high
                                                 // The high qword's 4 overflow bits (selector 0x01: high qword of
                                                 // `top`, low qword of the polynomial) times 0x87.
    let red = _mm512_clmulepi64_epi128::<0x01>(top, _mm512_set1_epi64(0x87));
    // a ^ b ^ c
    _mm512_ternarylogic_epi64::<0x96>(_mm512_slli_epi64::<4>(x), into_hi, red)
}

/// Multiplies a tweak held in all four lanes by alpha^0, alpha^1, alpha^2
/// and alpha^3 (lane i by alpha^i): the same shift-and-fold as
/// [`mul_alpha4`] with a per-lane shift count.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,vpclmulqdq")]
fn mul_alpha_0123(x: __m512i) -> __m512i {
    let k = _mm512_set_epi64(3, 3, 2, 2, 1, 1, 0, 0);
    // Bits shifted out of each qword (a count of 64 gives 0, as lane 0
    // needs).
    let top = _mm512_srlv_epi64(x, _mm512_sub_epi64(_mm512_set1_epi64(64), k));
    let into_hi = _mm512_bslli_epi128::<8>(top);
    let red = _mm512_clmulepi64_epi128::<0x01>(top, _mm512_set1_epi64(0x87));
    _mm512_ternarylogic_epi64::<0x96>(_mm512_sllv_epi64(x, k), into_hi, red)
}

/// The 32 block tweaks of the sector whose tweak is lane `lane` of `t0`,
/// as eight four-lane vectors: [t, t*a, t*a^2, t*a^3], then alpha^4 per
/// 64-byte chunk.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,vpclmulqdq")]
fn block_tweaks(t0: __m512i, lane: usize) -> [__m512i; STREAMS] {
    debug_assert!(lane < GROUP);
    let lo = i64::try_from(2 * lane).expect("lane < 4");
    let hi = lo + 1;
    let b = _mm512_permutexvar_epi64(_mm512_set_epi64(hi, lo, hi, lo, hi, lo, hi, lo), t0);
    let mut tw = [mul_alpha_0123(b); STREAMS];
    for j in 1..STREAMS {
        tw[j] = mul_alpha4(tw[j - 1]);
    }
    tw
}

/// Round keys of both XTS halves.
pub(super) struct Keys {
    /// Data key, encryption schedule, broadcast to four lanes.
    enc: [__m512i; ROUNDS + 1],
    /// Data key, decryption (equivalent inverse) schedule.
    dec: [__m512i; ROUNDS + 1],
    /// Tweak key, encryption schedule, broadcast to four lanes (four
    /// sectors' first tweaks are encrypted at once).
    tweak: [__m512i; ROUNDS + 1],
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
                tweak: expand(tweak).map(|k| _mm512_broadcast_i32x4(k)),
            })
        }
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
    #[target_feature(enable = "avx512f,avx512bw,vaes,vpclmulqdq,aes,sse2")]
    pub(super) unsafe fn process_raw(
        &self,
        src: *const u8,
        dst: *mut u8,
        len: usize,
        first_sector: u64,
        encrypt: bool,
    ) {
        assert!(len.is_multiple_of(SECTOR));
        let sectors = len / SECTOR;
        let mut n = 0;
        while n < sectors {
            // Four sectors' first tweaks in one AES pass; each sector's
            // 32 block tweaks are then worked out in registers.
            let group = (sectors - n).min(GROUP);
            let t0 = self.first_tweaks(first_sector.wrapping_add(n as u64));
            for i in 0..group {
                let tw = block_tweaks(t0, i);
                // SAFETY: sector `n + i` lies inside `src`/`dst` (`len`
                // bytes, per the contract); the CPU features are vouched
                // for by the caller.
                unsafe {
                    let off = (n + i) * SECTOR;
                    self.sector(src.add(off), dst.add(off), &tw, encrypt);
                }
            }
            n += group;
        }
    }

    /// Lane i: the tweak of sector `first + i`, its number (little-endian,
    /// zero-padded to 16 bytes) under the tweak key.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,vaes")]
    fn first_tweaks(&self, first: u64) -> __m512i {
        let lo = _mm512_add_epi64(
            _mm512_set1_epi64(first.cast_signed()),
            _mm512_set_epi64(0, 3, 0, 2, 0, 1, 0, 0),
        );
        let numbers = _mm512_maskz_mov_epi64(0b0101_0101, lo);
        let mut t0 = _mm512_xor_si512(numbers, self.tweak[0]);
        for k in &self.tweak[1..ROUNDS] {
            t0 = _mm512_aesenc_epi128(t0, *k);
        }
        _mm512_aesenclast_epi128(t0, self.tweak[ROUNDS])
    }

    /// One sector through the 14 rounds, eight four-block streams.
    ///
    /// # Safety
    ///
    /// `src` readable and `dst` writable for 512 bytes, coinciding or
    /// disjoint; the CPU has the features [`available`] checks.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,vaes")]
    unsafe fn sector(&self, src: *const u8, dst: *mut u8, tw: &[__m512i; STREAMS], encrypt: bool) {
        let keys = if encrypt { &self.enc } else { &self.dec };
        // SAFETY: 64-byte unaligned loads and stores inside the 512 bytes
        // the caller vouches for.
        unsafe {
            let mut x: [__m512i; STREAMS] = std::array::from_fn(|j| {
                let v = _mm512_loadu_si512(src.add(64 * j).cast());
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
                _mm512_storeu_si512(dst.add(64 * j).cast(), _mm512_xor_si512(*v, tw[j]));
            }
        }
    }
}
