//! The partition map: which ranges of a device belong to which volume.
//!
//! The map lives on the device itself, in a metadata area at its start
//! (see [`layout`] and `docs/partition-map.md`). Two copies, each with a
//! generation number and checksums; an update writes the new map into the
//! copy that is not current and syncs it, so a crash at any point leaves
//! at least one valid copy and the newest valid copy wins on load.

pub mod layout;

use std::io;

use serde::Serialize;

use crate::crypto::WrappedKey;

use crate::device::PhysicalDevice;
use layout::{DecodeError, MapImage, VolumeEntry};

pub use layout::{ALLOC_ALIGN_BYTES, MAX_VOLUMES, METADATA_AREA_BYTES, SLOT_BYTES};

/// Errors of partition-map operations. Nothing is written when one occurs.
#[derive(Debug, thiserror::Error)]
pub enum PartitionError {
    /// Reading or writing the metadata area failed.
    #[error("metadata I/O on device {device}: {source}")]
    Io {
        /// Device name.
        device: String,
        /// The error.
        source: io::Error,
    },
    /// Neither copy of the map is valid and the area is not blank.
    #[error("device {device}: metadata area is corrupt (copy A: {a}; copy B: {b}); refusing to use or overwrite it")]
    Corrupt {
        /// Device name.
        device: String,
        /// Why copy A was rejected.
        a: DecodeError,
        /// Why copy B was rejected.
        b: DecodeError,
    },
    /// The device is smaller than the map says it was.
    #[error("device {device}: capacity {now} B is smaller than the {recorded} B the partition map records")]
    DeviceShrunk {
        /// Device name.
        device: String,
        /// Current capacity.
        now: u64,
        /// Recorded capacity.
        recorded: u64,
    },
    /// The device cannot hold the metadata area and one volume.
    #[error("device {device}: capacity {capacity} B is too small for a partition map")]
    TooSmall {
        /// Device name.
        device: String,
        /// Capacity.
        capacity: u64,
    },
    /// A volume of that name exists.
    #[error("a volume named {0:?} already exists")]
    NameTaken(String),
    /// The name breaks the naming rules.
    #[error("invalid volume name {0:?}: use 1-63 characters from A-Z a-z 0-9 . _ -, not starting with . or -")]
    InvalidName(String),
    /// The size is zero or not a multiple of 4096 bytes.
    #[error("invalid volume size {0} B: must be a positive multiple of 4096")]
    InvalidSize(u64),
    /// No free extent is large enough.
    #[error(
        "device {device}: not enough free space for {requested} B (largest free extent: {largest_free} B)"
    )]
    NoSpace {
        /// Device name.
        device: String,
        /// Requested size.
        requested: u64,
        /// Largest free extent.
        largest_free: u64,
    },
    /// The map is full.
    #[error("device {0}: the partition map is full ({MAX_VOLUMES} volumes)")]
    Full(String),
    /// No volume of that name on this device.
    #[error("no volume named {0:?}")]
    NotFound(String),
}

/// One volume: a named range of a device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Volume {
    /// Name, unique on the card.
    pub name: String,
    /// Random identifier given at creation.
    pub uuid: String,
    /// Byte offset of the first byte on the device.
    pub offset_bytes: u64,
    /// Size in bytes.
    pub size_bytes: u64,
    /// Creation time, seconds since the Unix epoch.
    pub created_unix: u64,
    /// Whether the volume is encrypted (AES-256-XTS).
    pub encrypted: bool,
    /// Tenant whose key-encryption key wraps the volume's data key.
    pub tenant: Option<String>,
}

impl From<&VolumeEntry> for Volume {
    fn from(e: &VolumeEntry) -> Self {
        let encrypted = e.flags & layout::FLAG_ENCRYPTED != 0;
        Volume {
            name: e.name.clone(),
            uuid: layout::uuid_string(&e.uuid),
            offset_bytes: e.offset,
            size_bytes: e.size,
            created_unix: e.created_unix,
            encrypted,
            tenant: encrypted
                .then(|| WrappedKey::decode(&e.ext).ok().map(|w| w.tenant))
                .flatten(),
        }
    }
}

/// The in-memory copy of one device's partition map.
#[derive(Debug)]
pub struct PartitionMap {
    device: String,
    image: MapImage,
    /// Slot holding `image` on the device.
    current_slot: usize,
}

/// Checks the naming rules for volumes.
pub fn validate_name(name: &str) -> Result<(), PartitionError> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && !name.starts_with(['.', '-'])
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(PartitionError::InvalidName(name.to_owned()))
    }
}

impl PartitionMap {
    /// Loads the newest valid copy of the map from `dev`; writes a fresh
    /// map when the whole metadata area is blank (all zeroes). A corrupt
    /// area is reported and left untouched.
    pub fn load(dev: &dyn PhysicalDevice) -> Result<Self, PartitionError> {
        let device = dev.name().to_owned();
        let io_err = |source| PartitionError::Io {
            device: device.clone(),
            source,
        };
        let capacity = dev.capacity_bytes();
        if capacity < METADATA_AREA_BYTES + ALLOC_ALIGN_BYTES {
            return Err(PartitionError::TooSmall { device, capacity });
        }
        let mut slots = Vec::with_capacity(2);
        let mut blank = true;
        for i in 0..2u64 {
            let mut buf = vec![0u8; SLOT_BYTES as usize];
            dev.read_exact_at(&mut buf, i * SLOT_BYTES)
                .map_err(io_err)?;
            blank &= buf.iter().all(|&b| b == 0);
            slots.push(MapImage::decode(&buf));
        }
        let b = slots.pop().expect("two slots");
        let a = slots.pop().expect("two slots");
        let (image, current_slot) = match (a, b) {
            (Ok(a), Ok(b)) if b.generation > a.generation => (b, 1),
            (Ok(a), _) => (a, 0),
            (Err(_), Ok(b)) => (b, 1),
            (Err(a), Err(b)) => {
                if !blank {
                    return Err(PartitionError::Corrupt { device, a, b });
                }
                let image = MapImage::fresh(capacity);
                let mut map = PartitionMap {
                    device,
                    image,
                    current_slot: 1,
                };
                map.commit(dev, map.image.volumes.clone())?;
                log::info!(
                    "device {}: blank metadata area, wrote a new partition map",
                    dev.name()
                );
                return Ok(map);
            }
        };
        if capacity < image.device_bytes {
            return Err(PartitionError::DeviceShrunk {
                device,
                now: capacity,
                recorded: image.device_bytes,
            });
        }
        Ok(PartitionMap {
            device,
            image,
            current_slot,
        })
    }

    /// Volumes on the device, ordered by offset.
    pub fn volumes(&self) -> Vec<Volume> {
        self.image.volumes.iter().map(Volume::from).collect()
    }

    /// Looks a volume up by name.
    pub fn get(&self, name: &str) -> Option<Volume> {
        self.image
            .volumes
            .iter()
            .find(|v| v.name == name)
            .map(Volume::from)
    }

    /// Generation of the current copy.
    pub fn generation(&self) -> u64 {
        self.image.generation
    }

    /// The device identifier recorded in the map.
    pub fn device_uuid(&self) -> String {
        layout::uuid_string(&self.image.device_uuid)
    }

    /// Free extents `(offset, len)` between and after volumes.
    pub fn free_extents(&self) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        let mut at = METADATA_AREA_BYTES;
        for v in &self.image.volumes {
            if v.offset > at {
                out.push((at, v.offset - at));
            }
            at = v.offset + v.size;
        }
        let end = self.image.device_bytes;
        if end > at {
            out.push((at, end - at));
        }
        out
    }

    /// Total free bytes.
    pub fn free_bytes(&self) -> u64 {
        self.free_extents().iter().map(|e| e.1).sum()
    }

    /// Carves a volume of `size` bytes out of the first free extent that
    /// holds it (offsets aligned to 1 MiB) and commits the map.
    pub fn create(
        &mut self,
        dev: &dyn PhysicalDevice,
        name: &str,
        size: u64,
        taken: impl Fn(&str) -> bool,
    ) -> Result<Volume, PartitionError> {
        self.create_with(dev, name, size, taken, None)
    }

    /// Like [`PartitionMap::create`], recording the volume's wrapped data
    /// key when it is encrypted.
    pub fn create_with(
        &mut self,
        dev: &dyn PhysicalDevice,
        name: &str,
        size: u64,
        taken: impl Fn(&str) -> bool,
        key: Option<&WrappedKey>,
    ) -> Result<Volume, PartitionError> {
        validate_name(name)?;
        if size == 0 || !size.is_multiple_of(4096) {
            return Err(PartitionError::InvalidSize(size));
        }
        if taken(name) || self.image.volumes.iter().any(|v| v.name == name) {
            return Err(PartitionError::NameTaken(name.to_owned()));
        }
        if self.image.volumes.len() >= MAX_VOLUMES {
            return Err(PartitionError::Full(self.device.clone()));
        }
        let extents = self.free_extents();
        let offset = extents.iter().find_map(|&(start, len)| {
            let aligned = start.next_multiple_of(ALLOC_ALIGN_BYTES);
            let waste = aligned - start;
            (len >= waste && len - waste >= size).then_some(aligned)
        });
        let Some(offset) = offset else {
            let largest_free = extents
                .iter()
                .map(|&(s, l)| l.saturating_sub(s.next_multiple_of(ALLOC_ALIGN_BYTES) - s))
                .max()
                .unwrap_or(0);
            return Err(PartitionError::NoSpace {
                device: self.device.clone(),
                requested: size,
                largest_free,
            });
        };
        let entry = VolumeEntry {
            name: name.to_owned(),
            uuid: layout::random_uuid(),
            offset,
            size,
            created_unix: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            flags: 0,
            ext: [0; layout::ENTRY_EXT_BYTES],
        };
        let mut entry = entry;
        if let Some(k) = key {
            entry.flags |= layout::FLAG_ENCRYPTED;
            k.encode(&mut entry.ext);
        }
        let mut volumes = self.image.volumes.clone();
        volumes.push(entry.clone());
        volumes.sort_by_key(|v| v.offset);
        self.commit(dev, volumes)?;
        Ok(Volume::from(&entry))
    }

    /// The wrapped data key of an encrypted volume.
    pub fn wrapped_key(&self, name: &str) -> Option<WrappedKey> {
        let e = self.image.volumes.iter().find(|v| v.name == name)?;
        if e.flags & layout::FLAG_ENCRYPTED == 0 {
            return None;
        }
        WrappedKey::decode(&e.ext).ok()
    }

    /// Replaces the wrapped keys of several volumes in one commit (key
    /// rotation). Volumes not named keep theirs.
    pub fn rewrap(
        &mut self,
        dev: &dyn PhysicalDevice,
        keys: &[(String, WrappedKey)],
    ) -> Result<(), PartitionError> {
        let mut volumes = self.image.volumes.clone();
        for (name, k) in keys {
            let v = volumes
                .iter_mut()
                .find(|v| &v.name == name && v.flags & layout::FLAG_ENCRYPTED != 0)
                .ok_or_else(|| PartitionError::NotFound(name.clone()))?;
            k.encode(&mut v.ext);
        }
        self.commit(dev, volumes)
    }

    /// Removes a volume and commits the map; its space becomes free.
    pub fn delete(
        &mut self,
        dev: &dyn PhysicalDevice,
        name: &str,
    ) -> Result<Volume, PartitionError> {
        let Some(pos) = self.image.volumes.iter().position(|v| v.name == name) else {
            return Err(PartitionError::NotFound(name.to_owned()));
        };
        let mut volumes = self.image.volumes.clone();
        let gone = volumes.remove(pos);
        self.commit(dev, volumes)?;
        Ok(Volume::from(&gone))
    }

    /// Writes `volumes` as the next generation into the slot that is not
    /// current, syncs, and only then makes it the in-memory map.
    fn commit(
        &mut self,
        dev: &dyn PhysicalDevice,
        volumes: Vec<VolumeEntry>,
    ) -> Result<(), PartitionError> {
        let next = MapImage {
            generation: self.image.generation + 1,
            volumes,
            ..self.image.clone()
        };
        let bytes = next.encode();
        debug_assert!(MapImage::decode(&bytes).is_ok());
        let slot = 1 - self.current_slot;
        let io_err = |source| PartitionError::Io {
            device: self.device.clone(),
            source,
        };
        dev.write_all_at(&bytes, slot as u64 * SLOT_BYTES)
            .map_err(io_err)?;
        dev.sync().map_err(io_err)?;
        self.image = next;
        self.current_slot = slot;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::RamDevice;

    fn dev() -> RamDevice {
        RamDevice::new("ram0", 64 << 20).unwrap()
    }

    #[test]
    fn blank_device_gets_a_map_and_volumes_persist() {
        let d = dev();
        let mut m = PartitionMap::load(&d).unwrap();
        assert_eq!(m.generation(), 1);
        let a = m.create(&d, "a", 8 << 20, |_| false).unwrap();
        let b = m.create(&d, "b", 4 << 20, |_| false).unwrap();
        assert_eq!(a.offset_bytes, METADATA_AREA_BYTES);
        assert_eq!(b.offset_bytes, a.offset_bytes + a.size_bytes);
        let again = PartitionMap::load(&d).unwrap();
        assert_eq!(again.volumes(), m.volumes());
        assert_eq!(again.generation(), 3);
        assert_eq!(again.device_uuid(), m.device_uuid());
    }

    #[test]
    fn delete_frees_space_for_reuse() {
        let d = dev();
        let mut m = PartitionMap::load(&d).unwrap();
        let a = m.create(&d, "a", 8 << 20, |_| false).unwrap();
        m.create(&d, "b", 8 << 20, |_| false).unwrap();
        m.delete(&d, "a").unwrap();
        let c = m.create(&d, "c", 4 << 20, |_| false).unwrap();
        assert_eq!(c.offset_bytes, a.offset_bytes);
        assert!(matches!(
            m.delete(&d, "zz"),
            Err(PartitionError::NotFound(_))
        ));
    }

    #[test]
    fn refusals_change_nothing() {
        let d = dev();
        let mut m = PartitionMap::load(&d).unwrap();
        m.create(&d, "a", 8 << 20, |_| false).unwrap();
        let before = m.generation();
        let mut area = vec![0u8; METADATA_AREA_BYTES as usize];
        d.read_exact_at(&mut area, 0).unwrap();
        assert!(matches!(
            m.create(&d, "a", 4096, |_| false),
            Err(PartitionError::NameTaken(_))
        ));
        assert!(matches!(
            m.create(&d, "x", 1 << 30, |_| false),
            Err(PartitionError::NoSpace { .. })
        ));
        assert!(matches!(
            m.create(&d, "bad/name", 4096, |_| false),
            Err(PartitionError::InvalidName(_))
        ));
        assert!(matches!(
            m.create(&d, "y", 100, |_| false),
            Err(PartitionError::InvalidSize(_))
        ));
        assert!(matches!(
            m.create(&d, "z", 4096, |n| n == "z"),
            Err(PartitionError::NameTaken(_))
        ));
        let mut after = vec![0u8; METADATA_AREA_BYTES as usize];
        d.read_exact_at(&mut after, 0).unwrap();
        assert_eq!(m.generation(), before);
        assert!(area == after, "metadata area changed by a refused request");
    }

    #[test]
    fn one_corrupt_copy_falls_back_to_the_other() {
        let d = dev();
        let mut m = PartitionMap::load(&d).unwrap();
        // A fresh map is generation 1 in slot 0; each update flips slots.
        m.create(&d, "a", 8 << 20, |_| false).unwrap(); // gen 2, slot 1
        m.create(&d, "b", 8 << 20, |_| false).unwrap(); // gen 3, slot 0
                                                        // Tear the newest copy (slot 0): a crash mid-write.
        d.write_all_at(&[0xff; 700], 100).unwrap();
        let back = PartitionMap::load(&d).unwrap();
        assert_eq!(back.generation(), 2);
        assert_eq!(back.volumes().len(), 1);
    }

    #[test]
    fn both_copies_corrupt_is_refused_and_left_alone() {
        let d = dev();
        let mut m = PartitionMap::load(&d).unwrap();
        m.create(&d, "a", 8 << 20, |_| false).unwrap();
        d.write_all_at(&[0x42; 64], 8).unwrap();
        d.write_all_at(&[0x42; 64], SLOT_BYTES + 8).unwrap();
        let mut area = vec![0u8; METADATA_AREA_BYTES as usize];
        d.read_exact_at(&mut area, 0).unwrap();
        let err = PartitionMap::load(&d).unwrap_err();
        assert!(matches!(err, PartitionError::Corrupt { .. }), "{err}");
        let mut after = vec![0u8; METADATA_AREA_BYTES as usize];
        d.read_exact_at(&mut after, 0).unwrap();
        assert!(area == after);
    }

    #[test]
    fn foreign_data_is_not_formatted() {
        let d = dev();
        d.write_all_at(b"some other filesystem", 1024).unwrap();
        assert!(matches!(
            PartitionMap::load(&d),
            Err(PartitionError::Corrupt { .. })
        ));
    }

    #[test]
    fn device_that_shrank_is_refused() {
        let big = dev();
        let mut m = PartitionMap::load(&big).unwrap();
        m.create(&big, "a", 4 << 20, |_| false).unwrap();
        let small = RamDevice::new("ram0", 32 << 20).unwrap();
        let mut area = vec![0u8; METADATA_AREA_BYTES as usize];
        big.read_exact_at(&mut area, 0).unwrap();
        small.write_all_at(&area, 0).unwrap();
        assert!(matches!(
            PartitionMap::load(&small),
            Err(PartitionError::DeviceShrunk { .. })
        ));
    }
}
