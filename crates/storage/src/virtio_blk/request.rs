//! Parsing a virtio-blk request out of a descriptor chain.
//!
//! Everything here comes from the guest and is hostile: the chain may loop,
//! be too long, point outside guest memory, put readable descriptors after
//! writable ones, or ask for sectors beyond the volume. [`parse`] checks all
//! of it before any byte moves, and tells the caller where the status byte
//! is (when it can) so that a bad request still completes with
//! `VIRTIO_BLK_S_IOERR`.

use virtio_bindings::bindings::virtio_blk::{
    VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
};
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Address, GuestAddress};

use super::hot_mem::HotMem;

/// Bytes in a virtio-blk sector.
pub const SECTOR_BYTES: u64 = 512;
/// Most descriptors one chain may have: the advertised `seg_max` data
/// segments plus header and status, with slack for split headers.
pub const MAX_DESCRIPTORS: usize = 256;
/// Most data bytes one read or write may move (bounds the work a single
/// request can cause; Linux never exceeds `seg_max` x 1 MiB... in practice
/// far less).
pub const MAX_DATA_BYTES: u64 = 64 << 20;
/// Length of the `GET_ID` answer.
pub const ID_BYTES: usize = 20;
/// Bytes of one discard / write-zeroes range descriptor.
const RANGE_BYTES: u64 = 16;
/// Ranges one discard / write-zeroes request may carry (`max_discard_seg`).
pub const MAX_RANGES: usize = 1;
const HEADER_BYTES: u32 = 16;

/// What a request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestKind {
    /// `VIRTIO_BLK_T_IN`.
    Read,
    /// `VIRTIO_BLK_T_OUT`.
    Write,
    /// `VIRTIO_BLK_T_FLUSH`.
    Flush,
    /// `VIRTIO_BLK_T_GET_ID`.
    GetId,
    /// `VIRTIO_BLK_T_DISCARD`.
    Discard,
    /// `VIRTIO_BLK_T_WRITE_ZEROES`.
    WriteZeroes,
}

/// A guest memory range from the chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// Guest physical address.
    pub addr: GuestAddress,
    /// Length in bytes.
    pub len: u32,
    /// Device-writable (the device may write into it).
    pub writable: bool,
}

/// A validated request. Its data segments are in the caller's scratch
/// vector, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// Operation.
    pub kind: RequestKind,
    /// Byte offset inside the volume.
    pub offset: u64,
    /// Data bytes for reads and writes; range bytes for discard and
    /// write-zeroes.
    pub len: u64,
    /// Where the status byte goes.
    pub status: GuestAddress,
    /// Head descriptor index, to return in the used ring.
    pub head: u16,
}

/// Why a request was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// The chain has no writable last byte for the status.
    #[error("no device-writable status byte at the end of the chain")]
    NoStatus,
    /// The chain has more than [`MAX_DESCRIPTORS`] descriptors (or loops).
    #[error("descriptor chain longer than {MAX_DESCRIPTORS}")]
    TooLong,
    /// A readable descriptor follows a writable one, or the header is short.
    #[error("bad descriptor layout: {0}")]
    Layout(&'static str),
    /// A descriptor points outside guest memory.
    #[error("descriptor points outside guest memory")]
    BadAddress,
    /// Data direction does not match the request type.
    #[error("data buffers have the wrong direction for the request type")]
    Direction,
    /// Data length is not a whole number of sectors, or too large.
    #[error("bad data length {0}")]
    Length(u64),
    /// The request reaches beyond the end of the volume.
    #[error("sectors {sector}+{len} B beyond the end of the volume")]
    OutOfRange {
        /// First sector.
        sector: u64,
        /// Bytes.
        len: u64,
    },
    /// The request type is not supported.
    #[error("unsupported request type {0}")]
    Unsupported(u32),
}

/// A refused request, with what is needed to complete it anyway.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    /// Head descriptor index.
    pub head: u16,
    /// Status byte address, when the chain has one.
    pub status: Option<GuestAddress>,
    /// Why.
    pub error: RequestError,
}

/// Parses the chain `descs`, headed by descriptor `head`, into a request
/// over a volume of `volume_bytes`.
/// `data` receives the data segments (for GET_ID, the answer buffers; for
/// discard and write-zeroes, nothing: the range is folded into the request).
pub(crate) fn parse(
    descs: impl Iterator<Item = Descriptor>,
    head: u16,
    mem: &HotMem<'_>,
    volume_bytes: u64,
    data: &mut Vec<Segment>,
) -> Result<Request, Refused> {
    data.clear();
    let refuse = |status, error| Refused {
        head,
        status,
        error,
    };

    // Pass 1: collect descriptors (into the caller's scratch vector, which
    // ends up holding the data segments), check order and count. Loops are
    // cut by the chain iterator's TTL, and then fail the count or the
    // layout.
    let mut seen_writable = false;
    let mut misordered = false;
    for d in descs {
        if data.len() == MAX_DESCRIPTORS {
            return Err(refuse(None, RequestError::TooLong));
        }
        let w = d.is_write_only();
        if !w && seen_writable {
            misordered = true;
        }
        seen_writable |= w;
        data.push(Segment {
            addr: d.addr(),
            len: d.len(),
            writable: w,
        });
    }
    let descs = &mut data[..];

    // Status byte: the last byte of the last descriptor, device-writable.
    let status = match descs.last() {
        Some(&Segment {
            addr,
            len,
            writable: true,
        }) if len > 0 => match addr.checked_add(u64::from(len) - 1) {
            Some(s) if mem.holds(s, 1) => s,
            _ => return Err(refuse(None, RequestError::NoStatus)),
        },
        _ => return Err(refuse(None, RequestError::NoStatus)),
    };
    let status_some = Some(status);
    if misordered {
        return Err(refuse(
            status_some,
            RequestError::Layout("readable after writable"),
        ));
    }
    if let Some(last) = descs.last_mut() {
        last.len -= 1;
    }

    // Header: the first 16 bytes of the readable descriptors, possibly
    // spread over several.
    let mut header = [0u8; HEADER_BYTES as usize];
    let mut got = 0u32;
    let mut first_data = 0usize;
    for (i, d) in descs.iter_mut().enumerate() {
        if got == HEADER_BYTES {
            first_data = i;
            break;
        }
        if d.writable {
            return Err(refuse(
                status_some,
                RequestError::Layout("header shorter than 16 bytes"),
            ));
        }
        let take = (HEADER_BYTES - got).min(d.len);
        let dst = &mut header[got as usize..(got + take) as usize];
        if !mem.read_small(dst, d.addr) {
            return Err(refuse(status_some, RequestError::BadAddress));
        }
        got += take;
        d.addr = d.addr.unchecked_add(u64::from(take));
        d.len -= take;
        first_data = if d.len == 0 { i + 1 } else { i };
    }
    if got < HEADER_BYTES {
        return Err(refuse(
            status_some,
            RequestError::Layout("header shorter than 16 bytes"),
        ));
    }
    let req_type = u32::from_le_bytes(header[0..4].try_into().expect("4 bytes"));
    let sector = u64::from_le_bytes(header[8..16].try_into().expect("8 bytes"));

    // Remaining bytes are data: keep only those segments, moved to the
    // front in one pass, and check them on the way.
    let mut len = 0u64;
    let mut readable = false;
    let mut writable = false;
    let mut kept = 0usize;
    for i in first_data..data.len() {
        let s = data[i];
        if s.len == 0 {
            continue;
        }
        if !mem.holds(s.addr, s.len as usize) {
            return Err(refuse(status_some, RequestError::BadAddress));
        }
        readable |= !s.writable;
        writable |= s.writable;
        len += u64::from(s.len);
        data[kept] = s;
        kept += 1;
    }
    data.truncate(kept);

    let in_range = |offset: u64, bytes: u64| {
        offset
            .checked_add(bytes)
            .is_some_and(|end| end <= volume_bytes)
    };
    let byte_offset = |sector: u64| sector.checked_mul(SECTOR_BYTES);
    let kind = match req_type {
        VIRTIO_BLK_T_IN | VIRTIO_BLK_T_OUT => {
            let read = req_type == VIRTIO_BLK_T_IN;
            if (read && readable) || (!read && writable) {
                return Err(refuse(status_some, RequestError::Direction));
            }
            if !len.is_multiple_of(SECTOR_BYTES) || len > MAX_DATA_BYTES {
                return Err(refuse(status_some, RequestError::Length(len)));
            }
            let Some(offset) = byte_offset(sector).filter(|&o| in_range(o, len)) else {
                return Err(refuse(
                    status_some,
                    RequestError::OutOfRange { sector, len },
                ));
            };
            return Ok(Request {
                kind: if read {
                    RequestKind::Read
                } else {
                    RequestKind::Write
                },
                offset,
                len,
                status,
                head,
            });
        }
        VIRTIO_BLK_T_FLUSH => RequestKind::Flush,
        VIRTIO_BLK_T_GET_ID => {
            if readable {
                return Err(refuse(status_some, RequestError::Direction));
            }
            RequestKind::GetId
        }
        VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
            if writable {
                return Err(refuse(status_some, RequestError::Direction));
            }
            if len == 0 || !len.is_multiple_of(RANGE_BYTES) || len / RANGE_BYTES > MAX_RANGES as u64
            {
                return Err(refuse(status_some, RequestError::Length(len)));
            }
            let mut range = [0u8; RANGE_BYTES as usize];
            let mut at = 0usize;
            for s in data.iter() {
                let take = (range.len() - at).min(s.len as usize);
                if !mem.read_small(&mut range[at..at + take], s.addr) {
                    return Err(refuse(status_some, RequestError::BadAddress));
                }
                at += take;
            }
            data.clear();
            let r_sector = u64::from_le_bytes(range[0..8].try_into().expect("8 bytes"));
            let r_sectors = u32::from_le_bytes(range[8..12].try_into().expect("4 bytes"));
            let flags = u32::from_le_bytes(range[12..16].try_into().expect("4 bytes"));
            let discard = req_type == VIRTIO_BLK_T_DISCARD;
            // Discard takes no flags; write-zeroes knows only UNMAP (bit 0).
            if (discard && flags != 0) || (!discard && flags & !1 != 0) {
                return Err(refuse(status_some, RequestError::Unsupported(req_type)));
            }
            let bytes = u64::from(r_sectors) * SECTOR_BYTES;
            let Some(offset) = byte_offset(r_sector).filter(|&o| in_range(o, bytes)) else {
                return Err(refuse(
                    status_some,
                    RequestError::OutOfRange {
                        sector: r_sector,
                        len: bytes,
                    },
                ));
            };
            return Ok(Request {
                kind: if discard {
                    RequestKind::Discard
                } else {
                    RequestKind::WriteZeroes
                },
                offset,
                len: bytes,
                status,
                head,
            });
        }
        other => return Err(refuse(status_some, RequestError::Unsupported(other))),
    };
    Ok(Request {
        kind,
        offset: 0,
        len,
        status,
        head,
    })
}
