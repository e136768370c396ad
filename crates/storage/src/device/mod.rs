//! Physical devices owned by the card, behind two small traits.
//!
//! [`PhysicalDevice`] is the device as the control plane sees it: a capacity
//! and synchronous access for the partition map. [`DeviceQueue`] is one
//! submission context for one virtqueue worker: the data path pushes
//! requests whose buffers point straight into guest memory, submits them in
//! a batch and reaps completions. The virtio-blk device never knows whether
//! it talks to a file, a block device, `null` or `ram`.

mod aligned;
mod file;
mod huge_map;
mod mem;
mod memfs;
mod volatile;

use std::fmt;

use crate::crypto::Xts256;
use std::io;
use std::os::fd::RawFd;
use std::path::PathBuf;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

pub use aligned::AlignedBuf;
pub use file::FileDevice;
pub use mem::{NullDevice, RamDevice};
pub use volatile::{VolatileCache, VolatileCacheConfig};

/// Most segments one request may carry into a [`DeviceQueue`].
///
/// The virtio-blk device advertises `seg_max` = 126 (a 128-entry queue less
/// the header and status descriptors); guest memory split across regions can
/// add a few more, so the cap leaves room to spare.
pub const MAX_SEGMENTS: usize = 256;

/// What kind of physical device a configuration entry names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceKind {
    /// A regular file; created sparse at the configured size when missing.
    File,
    /// A block device node such as `/dev/nvme0n1`.
    Block,
    /// Discards writes and reads zeroes.
    Null,
    /// Anonymous memory, lost when the daemon stops.
    Ram,
}

impl fmt::Display for DeviceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DeviceKind::File => "file",
            DeviceKind::Block => "block",
            DeviceKind::Null => "null",
            DeviceKind::Ram => "ram",
        })
    }
}

/// How to open one physical device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceConfig {
    /// Name that volumes and the CLI refer to.
    pub name: String,
    /// Device kind.
    pub kind: DeviceKind,
    /// Path of the file or block device (file and block kinds).
    #[serde(default)]
    pub path: Option<PathBuf>,
    /// Capacity in bytes: required for null and ram, and for a file that
    /// does not exist yet.
    #[serde(default)]
    pub size_bytes: Option<u64>,
    /// Requests in flight that the volumes of a file or block device share
    /// while more than one of them is active (default
    /// [`crate::card::DEVICE_SHARE_DEPTH`]; 0 turns sharing off). Memory
    /// devices have no queue and ignore it.
    #[serde(default)]
    pub share_depth: Option<u32>,
    /// `null` devices only: `Some(false)` makes reads of volume data leave
    /// the reader's buffer as it was instead of zero-filling it, as SPDK's
    /// null bdev does. For benchmarks only: a guest then reads back
    /// whatever its own buffer held. Default: zero-fill.
    #[serde(default)]
    pub read_zeroes: Option<bool>,
    /// File and block devices, crash tests only: keep writes in the card's
    /// memory until a flush, so that killing the card loses what was not
    /// flushed, as power loss does to a disk's volatile cache
    /// ([`VolatileCache`]).
    #[serde(default)]
    pub volatile_write_cache: Option<VolatileCacheConfig>,
}

/// Errors opening a physical device.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// The configuration entry is incomplete or inconsistent.
    #[error("device {name}: {reason}")]
    Config {
        /// Device name.
        name: String,
        /// What is wrong.
        reason: String,
    },
    /// The operating system refused an operation.
    #[error("device {name}: {op} {path}: {source}")]
    Io {
        /// Device name.
        name: String,
        /// What was attempted.
        op: &'static str,
        /// Path involved.
        path: String,
        /// The error.
        source: io::Error,
    },
}

/// A physical device as the control plane sees it.
pub trait PhysicalDevice: Send + Sync + fmt::Debug {
    /// Configured name.
    fn name(&self) -> &str;
    /// Kind of device.
    fn kind(&self) -> DeviceKind;
    /// Usable capacity in bytes.
    fn capacity_bytes(&self) -> u64;
    /// Human-readable notes on how the device is driven (e.g. O_DIRECT).
    fn describe(&self) -> String;
    /// Reads `buf.len()` bytes at `offset` (control plane, synchronous).
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Writes `buf` at `offset` (control plane, synchronous).
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Makes every completed write durable.
    fn sync(&self) -> io::Result<()>;
    /// Opens a submission context able to hold `depth` requests in flight.
    fn open_queue(&self, depth: u16) -> io::Result<Box<dyn DeviceQueue>>;
}

/// The operation of one physical request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoOp {
    /// Read into the segments.
    Read,
    /// Write from the segments.
    Write,
    /// Make completed writes durable.
    Flush,
    /// Deallocate `len` bytes at `offset`; contents become unspecified.
    Discard,
    /// Make `len` bytes at `offset` read as zeroes.
    WriteZeroes,
}

/// One physical request.
#[derive(Debug, Clone, Copy)]
pub struct IoRequest<'a> {
    /// Operation.
    pub op: IoOp,
    /// Absolute byte offset on the device.
    pub offset: u64,
    /// Length in bytes (sum of the segments for reads and writes).
    pub len: u64,
    /// Host memory segments for reads and writes; empty otherwise.
    pub segments: &'a [libc::iovec],
    /// Caller's tag, below the queue depth; unique among requests in flight.
    pub tag: u16,
    /// Encrypt on the way in and decrypt on the way out, for queues that
    /// can do it in line ([`DeviceQueue::inline_crypto`]).
    pub crypt: Option<Crypt<'a>>,
}

/// In-line encryption of one request.
#[derive(Debug, Clone, Copy)]
pub struct Crypt<'a> {
    /// The volume's cipher.
    pub cipher: &'a Xts256,
    /// Volume-relative number of the request's first sector.
    pub first_sector: u64,
}

/// One completed physical request.
#[derive(Debug)]
pub struct IoCompletion {
    /// Tag given at push time.
    pub tag: u16,
    /// Bytes transferred, or the error.
    pub result: io::Result<u32>,
}

/// A submission context owned by one queue worker.
pub trait DeviceQueue: Send + fmt::Debug {
    /// Whether this queue applies [`IoRequest::crypt`] itself (memory
    /// devices: straight between their memory and the caller's buffers).
    /// Others get ciphertext buffers from the caller and ignore it.
    fn inline_crypto(&self) -> bool {
        false
    }

    /// Whether this queue is done with a request's segments when
    /// [`DeviceQueue::push`] returns (it copies in `push`): the caller then
    /// need not keep them mapped until the completion is reaped.
    fn done_in_push(&self) -> bool {
        false
    }

    /// Queues one request; it is started by the next [`DeviceQueue::submit`].
    ///
    /// # Safety
    ///
    /// Every segment must stay valid for the access the operation makes (the
    /// device writes into them for a read) until the completion for `tag` has
    /// been returned by [`DeviceQueue::reap`], or, for a queue that is
    /// [`DeviceQueue::done_in_push`], until this call returns.
    unsafe fn push(&mut self, req: IoRequest<'_>);
    /// Starts every queued request.
    fn submit(&mut self) -> io::Result<()>;
    /// Moves finished requests into `out`.
    fn reap(&mut self, out: &mut Vec<IoCompletion>);
    /// An eventfd that becomes readable when completions are ready, for
    /// devices that complete asynchronously.
    fn completion_fd(&self) -> Option<RawFd>;
    /// Blocks until at least one request in flight has completed.
    fn wait(&mut self) -> io::Result<()>;
}

/// Opens the device that `config` describes.
pub fn open(config: &DeviceConfig) -> Result<Arc<dyn PhysicalDevice>, DeviceError> {
    let need_size = || {
        config.size_bytes.ok_or_else(|| DeviceError::Config {
            name: config.name.clone(),
            reason: format!("a {} device needs size_bytes", config.kind),
        })
    };
    if config.volatile_write_cache.is_some()
        && !matches!(config.kind, DeviceKind::File | DeviceKind::Block)
    {
        return Err(DeviceError::Config {
            name: config.name.clone(),
            reason: format!(
                "volatile_write_cache is for file and block devices, not {}",
                config.kind
            ),
        });
    }
    if config.read_zeroes.is_some() && config.kind != DeviceKind::Null {
        return Err(DeviceError::Config {
            name: config.name.clone(),
            reason: format!("read_zeroes is for null devices, not {}", config.kind),
        });
    }
    Ok(match config.kind {
        DeviceKind::Null => Arc::new(
            NullDevice::new(&config.name, need_size()?)
                .reading_zeroes(config.read_zeroes.unwrap_or(true)),
        ),
        DeviceKind::Ram => {
            Arc::new(
                RamDevice::new(&config.name, need_size()?).map_err(|e| DeviceError::Io {
                    name: config.name.clone(),
                    op: "allocate",
                    path: "(anonymous memory)".into(),
                    source: e,
                })?,
            )
        }
        DeviceKind::File | DeviceKind::Block => {
            let path = config.path.clone().ok_or_else(|| DeviceError::Config {
                name: config.name.clone(),
                reason: format!("a {} device needs a path", config.kind),
            })?;
            let file: Arc<dyn PhysicalDevice> = Arc::new(FileDevice::open(
                &config.name,
                config.kind,
                &path,
                config.size_bytes,
            )?);
            match config.volatile_write_cache {
                Some(c) => {
                    log::warn!(
                        "device {}: volatile write cache for crash tests; unflushed writes \
                         are lost when the card stops",
                        config.name
                    );
                    Arc::new(VolatileCache::new(file, c))
                }
                None => file,
            }
        }
    })
}

/// What the devices' unit tests share.
#[cfg(test)]
pub(crate) mod test_iov {
    /// An iovec over `buf`.
    pub(crate) fn iov(buf: &mut [u8]) -> libc::iovec {
        libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        }
    }
}
