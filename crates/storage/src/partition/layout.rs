//! Byte layout of the partition map (version 1). All integers little-endian.
//!
//! ```text
//! device offset 0          slot A (1 MiB)
//! device offset 1 MiB      slot B (1 MiB)
//! device offset 2 MiB      first byte a volume may use
//!
//! slot = header (512 B) + MAX_VOLUMES entries of 256 B (unused ones zero)
//! header:  0 magic "SCPMAP01" | 8 version u32 = 1 | 12 entry_size u32 = 256
//!         16 generation u64   | 24 device uuid [16] | 40 device bytes u64
//!         48 data start u64   | 56 entry count u32  | 60 entries crc32c u32
//!         64..508 zero        | 508 header crc32c u32 (over bytes 0..508)
//! entry:   0 name [64] (UTF-8, zero padded) | 64 uuid [16] | 80 offset u64
//!         88 size u64 | 96 created unix u64 | 104 flags u32 (bit 0: encrypted)
//!        108..256 extension bytes, zero in version 1, kept verbatim
//! ```
//! The entries checksum covers the `entry count` used entries only.

use std::fmt;

/// Bytes reserved at the start of every device for the two map copies.
pub const METADATA_AREA_BYTES: u64 = 2 * SLOT_BYTES;
/// Bytes of one copy.
pub const SLOT_BYTES: u64 = 1 << 20;
/// Volumes start on multiples of this.
pub const ALLOC_ALIGN_BYTES: u64 = 1 << 20;
/// Most volumes one device holds: (1 MiB - 512 B header) / 256 B rounded
/// down to a power of two, leaving room for a larger header later.
pub const MAX_VOLUMES: usize = 2048;

/// Entry flag: the volume is encrypted; the extension bytes start with its
/// wrapped-key record (`crate::crypto::WrappedKey`).
pub const FLAG_ENCRYPTED: u32 = 1;
/// Flags this version understands; an entry with others is refused rather
/// than served wrongly.
const KNOWN_FLAGS: u32 = FLAG_ENCRYPTED;

const MAGIC: &[u8; 8] = b"SCPMAP01";
const VERSION: u32 = 1;
const HEADER_BYTES: usize = 512;
const ENTRY_BYTES: usize = 256;
const NAME_BYTES: usize = 64;
/// Extension bytes at the end of each entry (for later features, such as
/// a wrapped encryption key).
pub const ENTRY_EXT_BYTES: usize = ENTRY_BYTES - 108;

const _: () = assert!(HEADER_BYTES + MAX_VOLUMES * ENTRY_BYTES <= SLOT_BYTES as usize);

/// Why a copy of the map was rejected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecodeError {
    /// Wrong magic bytes.
    Magic,
    /// Unknown version.
    Version(u32),
    /// Header checksum mismatch.
    HeaderChecksum,
    /// Entries checksum mismatch.
    EntriesChecksum,
    /// A field holds an impossible value.
    Invalid(String),
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecodeError::Magic => f.write_str("no partition-map magic"),
            DecodeError::Version(v) => write!(f, "unsupported version {v}"),
            DecodeError::HeaderChecksum => f.write_str("header checksum mismatch"),
            DecodeError::EntriesChecksum => f.write_str("entries checksum mismatch"),
            DecodeError::Invalid(s) => write!(f, "invalid content: {s}"),
        }
    }
}

/// One volume's record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeEntry {
    /// Name.
    pub name: String,
    /// Random identifier.
    pub uuid: [u8; 16],
    /// First byte on the device.
    pub offset: u64,
    /// Size in bytes.
    pub size: u64,
    /// Creation time.
    pub created_unix: u64,
    /// Feature flags; zero in version 1.
    pub flags: u32,
    /// Extension bytes, kept verbatim.
    pub ext: [u8; ENTRY_EXT_BYTES],
}

/// A decoded copy of the map.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapImage {
    /// Incremented by every commit.
    pub generation: u64,
    /// Identifier of the device, chosen when the map was first written.
    pub device_uuid: [u8; 16],
    /// Device capacity when the map was first written.
    pub device_bytes: u64,
    /// Volumes sorted by offset.
    pub volumes: Vec<VolumeEntry>,
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}
fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// Sixteen random bytes from the kernel.
pub fn random_uuid() -> [u8; 16] {
    let mut u = [0u8; 16];
    let mut filled = 0;
    while filled < u.len() {
        // SAFETY: writes at most `16 - filled` bytes into `u[filled..]`.
        let n = unsafe { libc::getrandom(u[filled..].as_mut_ptr().cast(), u.len() - filled, 0) };
        if n > 0 {
            filled += n.unsigned_abs();
        }
    }
    u[6] = (u[6] & 0x0f) | 0x40; // version 4
    u[8] = (u[8] & 0x3f) | 0x80; // RFC 4122 variant
    u
}

/// Canonical text form of a UUID.
pub fn uuid_string(u: &[u8; 16]) -> String {
    let h: Vec<String> = u.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        h[0..4].concat(),
        h[4..6].concat(),
        h[6..8].concat(),
        h[8..10].concat(),
        h[10..16].concat()
    )
}

impl MapImage {
    /// A map with no volumes for a device of `device_bytes`.
    pub fn fresh(device_bytes: u64) -> Self {
        MapImage {
            generation: 0,
            device_uuid: random_uuid(),
            device_bytes,
            volumes: Vec::new(),
        }
    }

    /// Serialises into a full slot.
    pub fn encode(&self) -> Vec<u8> {
        assert!(self.volumes.len() <= MAX_VOLUMES);
        let mut b = vec![0u8; SLOT_BYTES as usize];
        for (i, v) in self.volumes.iter().enumerate() {
            let e = &mut b[HEADER_BYTES + i * ENTRY_BYTES..HEADER_BYTES + (i + 1) * ENTRY_BYTES];
            let name = v.name.as_bytes();
            assert!(name.len() < NAME_BYTES);
            e[..name.len()].copy_from_slice(name);
            e[64..80].copy_from_slice(&v.uuid);
            e[80..88].copy_from_slice(&v.offset.to_le_bytes());
            e[88..96].copy_from_slice(&v.size.to_le_bytes());
            e[96..104].copy_from_slice(&v.created_unix.to_le_bytes());
            e[104..108].copy_from_slice(&v.flags.to_le_bytes());
            e[108..].copy_from_slice(&v.ext);
        }
        let used = HEADER_BYTES + self.volumes.len() * ENTRY_BYTES;
        let entries_crc = crc32c::crc32c(&b[HEADER_BYTES..used]);
        let h = &mut b[..HEADER_BYTES];
        h[0..8].copy_from_slice(MAGIC);
        h[8..12].copy_from_slice(&VERSION.to_le_bytes());
        h[12..16].copy_from_slice(&(ENTRY_BYTES as u32).to_le_bytes());
        h[16..24].copy_from_slice(&self.generation.to_le_bytes());
        h[24..40].copy_from_slice(&self.device_uuid);
        h[40..48].copy_from_slice(&self.device_bytes.to_le_bytes());
        h[48..56].copy_from_slice(&METADATA_AREA_BYTES.to_le_bytes());
        h[56..60].copy_from_slice(&(self.volumes.len() as u32).to_le_bytes());
        h[60..64].copy_from_slice(&entries_crc.to_le_bytes());
        let hcrc = crc32c::crc32c(&h[..508]);
        h[508..512].copy_from_slice(&hcrc.to_le_bytes());
        b
    }

    /// Parses and validates one slot. Every structural promise is checked:
    /// checksums, bounds, sorted non-overlapping volumes, unique names.
    pub fn decode(b: &[u8]) -> Result<Self, DecodeError> {
        if b.len() < SLOT_BYTES as usize {
            return Err(DecodeError::Invalid("slot too short".into()));
        }
        let h = &b[..HEADER_BYTES];
        if &h[0..8] != MAGIC {
            return Err(DecodeError::Magic);
        }
        if crc32c::crc32c(&h[..508]) != u32_at(h, 508) {
            return Err(DecodeError::HeaderChecksum);
        }
        let version = u32_at(h, 8);
        if version != VERSION {
            return Err(DecodeError::Version(version));
        }
        let invalid = |s: String| Err(DecodeError::Invalid(s));
        if u32_at(h, 12) as usize != ENTRY_BYTES {
            return invalid("entry size".into());
        }
        if u64_at(h, 48) != METADATA_AREA_BYTES {
            return invalid("data start".into());
        }
        let count = u32_at(h, 56) as usize;
        if count > MAX_VOLUMES {
            return invalid(format!("{count} entries"));
        }
        let used = HEADER_BYTES + count * ENTRY_BYTES;
        if crc32c::crc32c(&b[HEADER_BYTES..used]) != u32_at(h, 60) {
            return Err(DecodeError::EntriesChecksum);
        }
        let device_bytes = u64_at(h, 40);
        let mut volumes: Vec<VolumeEntry> = Vec::with_capacity(count);
        for i in 0..count {
            let e = &b[HEADER_BYTES + i * ENTRY_BYTES..HEADER_BYTES + (i + 1) * ENTRY_BYTES];
            let name_len = e[..NAME_BYTES]
                .iter()
                .position(|&c| c == 0)
                .unwrap_or(NAME_BYTES);
            let Ok(name) = std::str::from_utf8(&e[..name_len]) else {
                return invalid(format!("entry {i}: name not UTF-8"));
            };
            if super::validate_name(name).is_err()
                || e[name_len..NAME_BYTES].iter().any(|&c| c != 0)
            {
                return invalid(format!("entry {i}: bad name"));
            }
            let offset = u64_at(e, 80);
            let size = u64_at(e, 88);
            let end = offset.checked_add(size);
            if size == 0
                || offset < METADATA_AREA_BYTES
                || !offset.is_multiple_of(ALLOC_ALIGN_BYTES)
                || end.is_none_or(|end| end > device_bytes)
            {
                return invalid(format!(
                    "entry {i} ({name}): range {offset}+{size} outside the data area"
                ));
            }
            if let Some(prev) = volumes.last() {
                if prev.offset + prev.size > offset {
                    return invalid(format!("entry {i} ({name}) overlaps or is out of order"));
                }
            }
            if volumes.iter().any(|v| v.name == name) {
                return invalid(format!("entry {i}: duplicate name {name}"));
            }
            let flags = u32_at(e, 104);
            if flags & !KNOWN_FLAGS != 0 {
                return invalid(format!(
                    "entry {i} ({name}): unknown feature flags {flags:#x}"
                ));
            }
            volumes.push(VolumeEntry {
                name: name.to_owned(),
                uuid: e[64..80].try_into().expect("16 bytes"),
                offset,
                size,
                created_unix: u64_at(e, 96),
                flags: u32_at(e, 104),
                ext: e[108..].try_into().expect("ext bytes"),
            });
        }
        Ok(MapImage {
            generation: u64_at(h, 16),
            device_uuid: h[24..40].try_into().expect("16 bytes"),
            device_bytes,
            volumes,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn entry(name: &str, offset: u64, size: u64) -> VolumeEntry {
        VolumeEntry {
            name: name.into(),
            uuid: random_uuid(),
            offset,
            size,
            created_unix: 7,
            flags: 0,
            ext: [0; ENTRY_EXT_BYTES],
        }
    }

    #[test]
    fn uuid_text_form() {
        let u = [0x12u8; 16];
        assert_eq!(uuid_string(&u), "12121212-1212-1212-1212-121212121212");
        let r = random_uuid();
        assert_eq!(r[6] >> 4, 4);
    }

    #[test]
    fn overlap_is_rejected_even_with_valid_checksums() {
        let mut m = MapImage::fresh(64 << 20);
        m.volumes = vec![entry("a", 2 << 20, 4 << 20), entry("b", 5 << 20, 1 << 20)];
        assert!(matches!(
            MapImage::decode(&m.encode()),
            Err(DecodeError::Invalid(_))
        ));
        m.volumes = vec![entry("a", 2 << 20, 4 << 20), entry("a", 6 << 20, 1 << 20)];
        assert!(matches!(
            MapImage::decode(&m.encode()),
            Err(DecodeError::Invalid(_))
        ));
        m.volumes = vec![entry("a", 63 << 20, 2 << 20)];
        assert!(matches!(
            MapImage::decode(&m.encode()),
            Err(DecodeError::Invalid(_))
        ));
    }

    proptest! {
        #[test]
        fn round_trip(sizes in proptest::collection::vec(1u64..8, 0..20), generation in any::<u64>()) {
            let mut m = MapImage::fresh(1 << 30);
            m.generation = generation;
            let mut at = METADATA_AREA_BYTES;
            for (i, s) in sizes.iter().enumerate() {
                m.volumes.push(entry(&format!("v{i}"), at, s << 20));
                at += (s + 1) << 20;
            }
            let back = MapImage::decode(&m.encode()).unwrap();
            prop_assert_eq!(back, m);
        }

        #[test]
        fn any_single_byte_flip_in_used_bytes_is_detected(pos in 0usize..(HEADER_BYTES + 2 * ENTRY_BYTES), bit in 0u8..8) {
            let mut m = MapImage::fresh(1 << 30);
            m.volumes = vec![entry("a", 2 << 20, 1 << 20), entry("b", 3 << 20, 1 << 20)];
            let mut b = m.encode();
            b[pos] ^= 1 << bit;
            prop_assert!(MapImage::decode(&b).is_err());
        }
    }
}
