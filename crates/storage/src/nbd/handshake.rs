//! The handshake: fixed newstyle negotiation up to transmission.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;

use super::{read_u32, read_u64, violation, Ctx, NBD_BLOCK, NBD_MAX_PAYLOAD};

/// Handshake magics.
const NBDMAGIC: u64 = 0x4e42_444d_4147_4943; // "NBDMAGIC"
const IHAVEOPT: u64 = 0x4948_4156_454f_5054; // "IHAVEOPT"
const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;

/// Handshake flags (server) and client flags.
const FLAG_FIXED_NEWSTYLE: u16 = 1;
const FLAG_NO_ZEROES: u16 = 2;
const CLIENT_FIXED_NEWSTYLE: u32 = 1;
const CLIENT_NO_ZEROES: u32 = 2;

/// Transmission flags.
const TF_HAS_FLAGS: u16 = 1;
const TF_SEND_FLUSH: u16 = 1 << 2;
const TF_SEND_FUA: u16 = 1 << 3;
const TF_SEND_TRIM: u16 = 1 << 5;
const TF_SEND_WRITE_ZEROES: u16 = 1 << 6;
/// FLUSH on any connection makes every completed write durable.
const TF_CAN_MULTI_CONN: u16 = 1 << 8;

/// Options.
const OPT_EXPORT_NAME: u32 = 1;
const OPT_ABORT: u32 = 2;
const OPT_LIST: u32 = 3;
const OPT_INFO: u32 = 6;
pub(super) const OPT_GO: u32 = 7;

/// Option replies.
const REP_ACK: u32 = 1;
const REP_SERVER: u32 = 2;
const REP_INFO: u32 = 3;
const REP_ERR_UNSUP: u32 = (1 << 31) | 1;
const REP_ERR_INVALID: u32 = (1 << 31) | 3;
const REP_ERR_UNKNOWN: u32 = (1 << 31) | 6;

/// Information types.
const INFO_EXPORT: u16 = 0;
const INFO_NAME: u16 = 1;
const INFO_BLOCK_SIZE: u16 = 3;

/// Option data longer than this closes the connection.
const MAX_OPTION_BYTES: u32 = 16 << 10;
/// Options a client may send before transmission.
const MAX_OPTIONS: usize = 256;

fn option_reply(w: &mut impl Write, opt: u32, kind: u32, data: &[u8]) -> io::Result<()> {
    let len = u32::try_from(data.len()).map_err(|_| violation("option reply too long"))?;
    let mut head = Vec::with_capacity(20 + data.len());
    head.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    head.extend_from_slice(&opt.to_be_bytes());
    head.extend_from_slice(&kind.to_be_bytes());
    head.extend_from_slice(&len.to_be_bytes());
    head.extend_from_slice(data);
    w.write_all(&head)
}

/// The export's transmission flags.
fn transmission_flags() -> u16 {
    TF_HAS_FLAGS
        | TF_SEND_FLUSH
        | TF_SEND_FUA
        | TF_SEND_TRIM
        | TF_SEND_WRITE_ZEROES
        | TF_CAN_MULTI_CONN
}

/// Parsed `NBD_OPT_INFO`/`NBD_OPT_GO` data: export name and requested
/// information types.
fn parse_info_request(data: &[u8]) -> Option<(&[u8], Vec<u16>)> {
    let nlen = usize::try_from(u32::from_be_bytes(data.get(..4)?.try_into().ok()?)).ok()?;
    let name = data.get(4..4usize.checked_add(nlen)?)?;
    let rest = &data[4 + nlen..];
    let n = usize::from(u16::from_be_bytes(rest.get(..2)?.try_into().ok()?));
    let reqs = rest.get(2..)?;
    if reqs.len() != 2 * n {
        return None;
    }
    Some((
        name,
        reqs.chunks_exact(2)
            .map(|c| u16::from_be_bytes([c[0], c[1]]))
            .collect(),
    ))
}

/// Whether a client's export name means this volume: its name, or the
/// empty default name.
fn names_us(ctx: &Ctx, name: &[u8]) -> bool {
    name.is_empty() || name == ctx.target.name.as_bytes()
}

/// Option haggling; returns whether to go on to transmission.
pub(super) fn negotiate(s: &mut UnixStream, ctx: &Ctx) -> io::Result<bool> {
    let mut hello = Vec::with_capacity(18);
    hello.extend_from_slice(&NBDMAGIC.to_be_bytes());
    hello.extend_from_slice(&IHAVEOPT.to_be_bytes());
    hello.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    s.write_all(&hello)?;
    let client = read_u32(s)?;
    if client & !(CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES) != 0
        || client & CLIENT_FIXED_NEWSTYLE == 0
    {
        return Err(violation(format!("client flags {client:#x}")));
    }
    let no_zeroes = client & CLIENT_NO_ZEROES != 0;
    let size = ctx.target.size;
    for _ in 0..MAX_OPTIONS {
        if read_u64(s)? != IHAVEOPT {
            return Err(violation("option without IHAVEOPT"));
        }
        let opt = read_u32(s)?;
        let len = read_u32(s)?;
        if len > MAX_OPTION_BYTES {
            return Err(violation(format!("option {opt} of {len} bytes")));
        }
        let mut data = vec![0u8; len as usize];
        s.read_exact(&mut data)?;
        match opt {
            OPT_EXPORT_NAME => {
                if !names_us(ctx, &data) {
                    // The protocol has no error reply here: close.
                    return Err(violation("EXPORT_NAME of an unknown export"));
                }
                let mut out = Vec::with_capacity(10 + 124);
                out.extend_from_slice(&size.to_be_bytes());
                out.extend_from_slice(&transmission_flags().to_be_bytes());
                if !no_zeroes {
                    out.extend_from_slice(&[0u8; 124]);
                }
                s.write_all(&out)?;
                return Ok(true);
            }
            OPT_ABORT => {
                let _ = option_reply(s, opt, REP_ACK, &[]);
                return Ok(false);
            }
            OPT_LIST => {
                if !data.is_empty() {
                    option_reply(s, opt, REP_ERR_INVALID, b"LIST takes no data")?;
                    continue;
                }
                let name = ctx.target.name.as_bytes();
                let mut d = Vec::with_capacity(4 + name.len());
                d.extend_from_slice(&u32::try_from(name.len()).unwrap_or(0).to_be_bytes());
                d.extend_from_slice(name);
                option_reply(s, opt, REP_SERVER, &d)?;
                option_reply(s, opt, REP_ACK, &[])?;
            }
            OPT_INFO | OPT_GO => {
                let Some((name, wanted)) = parse_info_request(&data) else {
                    option_reply(s, opt, REP_ERR_INVALID, b"malformed INFO/GO request")?;
                    continue;
                };
                if !names_us(ctx, name) {
                    option_reply(s, opt, REP_ERR_UNKNOWN, b"no such export")?;
                    continue;
                }
                let mut export = Vec::with_capacity(12);
                export.extend_from_slice(&INFO_EXPORT.to_be_bytes());
                export.extend_from_slice(&size.to_be_bytes());
                export.extend_from_slice(&transmission_flags().to_be_bytes());
                option_reply(s, opt, REP_INFO, &export)?;
                // Always sent: requests must be whole sectors.
                let mut bs = Vec::with_capacity(14);
                bs.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
                bs.extend_from_slice(&NBD_BLOCK.to_be_bytes());
                bs.extend_from_slice(&4096u32.to_be_bytes());
                bs.extend_from_slice(&NBD_MAX_PAYLOAD.to_be_bytes());
                option_reply(s, opt, REP_INFO, &bs)?;
                if wanted.contains(&INFO_NAME) {
                    let mut n = INFO_NAME.to_be_bytes().to_vec();
                    n.extend_from_slice(ctx.target.name.as_bytes());
                    option_reply(s, opt, REP_INFO, &n)?;
                }
                option_reply(s, opt, REP_ACK, &[])?;
                if opt == OPT_GO {
                    return Ok(true);
                }
            }
            _ => option_reply(s, opt, REP_ERR_UNSUP, b"option not supported")?,
        }
    }
    Err(violation(format!("more than {MAX_OPTIONS} options")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn info_requests_parse_and_refuse_bad_lengths() {
        let mut d = 3u32.to_be_bytes().to_vec();
        d.extend_from_slice(b"vol");
        d.extend_from_slice(&2u16.to_be_bytes());
        d.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        d.extend_from_slice(&INFO_NAME.to_be_bytes());
        let (name, wanted) = parse_info_request(&d).unwrap();
        assert_eq!(name, b"vol");
        assert_eq!(wanted, vec![INFO_BLOCK_SIZE, INFO_NAME]);
        // One request short, one byte long, a name past the end, empty.
        assert!(parse_info_request(&d[..d.len() - 2]).is_none());
        let mut long = d.clone();
        long.push(0);
        assert!(parse_info_request(&long).is_none());
        let mut past = d.clone();
        past[..4].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(parse_info_request(&past).is_none());
        assert!(parse_info_request(&[]).is_none());
    }
}
