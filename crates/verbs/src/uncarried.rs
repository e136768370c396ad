//! The rest of rdma-core's public verbs API: every function an application
//! may link against is here, so that an application loads and gets the
//! error verbs documents (`EOPNOTSUPP`: a null object with `errno` set, or
//! the error number) for what the card does not carry yet, rather than an
//! undefined symbol at load time or a crash. The string and rate helpers
//! are whole.

use std::ffi::{c_char, c_int, c_void};

use crate::set_errno;

type P = *mut c_void;

/// Functions returning an object: null, `errno` = `EOPNOTSUPP`.
macro_rules! null {
    ($($name:ident($($a:ident: $t:ty),*);)*) => {$(
        #[doc = concat!("`", stringify!($name), "`: not carried yet (null, `EOPNOTSUPP`).")]
        #[no_mangle]
        pub unsafe extern "C" fn $name($($a: $t),*) -> P {
            $(let _ = $a;)*
            set_errno(libc::EOPNOTSUPP);
            std::ptr::null_mut()
        }
    )*};
}

/// Functions returning an error number: `EOPNOTSUPP`.
macro_rules! errno {
    ($($name:ident($($a:ident: $t:ty),*);)*) => {$(
        #[doc = concat!("`", stringify!($name), "`: not carried yet (`EOPNOTSUPP`).")]
        #[no_mangle]
        pub unsafe extern "C" fn $name($($a: $t),*) -> c_int {
            $(let _ = $a;)*
            set_errno(libc::EOPNOTSUPP);
            libc::EOPNOTSUPP
        }
    )*};
}

/// Functions returning -1 with `errno` on failure.
macro_rules! minus_one {
    ($($name:ident($($a:ident: $t:ty),*);)*) => {$(
        #[doc = concat!("`", stringify!($name), "`: not carried yet (-1, `EOPNOTSUPP`).")]
        #[no_mangle]
        pub unsafe extern "C" fn $name($($a: $t),*) -> c_int {
            $(let _ = $a;)*
            set_errno(libc::EOPNOTSUPP);
            -1
        }
    )*};
}

/// Functions with nothing to return: nothing to do.
macro_rules! nothing {
    ($($name:ident($($a:ident: $t:ty),*);)*) => {$(
        #[doc = concat!("`", stringify!($name), "`: nothing to release yet.")]
        #[no_mangle]
        pub unsafe extern "C" fn $name($($a: $t),*) {
            $(let _ = $a;)*
        }
    )*};
}

null! {
    ibv_reg_dmabuf_mr(pd: P, offset: u64, len: usize, iova: u64, fd: c_int, access: c_int);
    ibv_create_ah_from_wc(pd: P, wc: P, grh: P, port: u8);
    ibv_qp_to_qp_ex(qp: P);
    ibv_import_device(fd: c_int);
    ibv_import_pd(ctx: P, handle: u32);
    ibv_import_mr(pd: P, handle: u32);
    ibv_import_dm(ctx: P, handle: u32);
    ibv_get_sysfs_path();
}

errno! {
    ibv_rereg_mr(mr: P, flags: c_int, pd: P, addr: P, len: usize, access: c_int);
    ibv_resize_cq(cq: P, cqe: c_int);
    ibv_init_ah_from_wc(ctx: P, port: u8, wc: P, grh: P, attr: P);
    ibv_attach_mcast(qp: P, gid: P, lid: u16);
    ibv_detach_mcast(qp: P, gid: P, lid: u16);
    ibv_resolve_eth_l2_from_gid(ctx: P, attr: P, mac: P, vid: P);
    ibv_query_ece(qp: P, ece: P);
    ibv_set_ece(qp: P, ece: P);
    ibv_query_qp_data_in_order(qp: P, op: c_int, flags: u32);
    _ibv_query_gid_ex(ctx: P, port: u32, index: u32, entry: P, flags: u32, size: usize);
}

minus_one! {
    ibv_query_pkey(ctx: P, port: u8, index: c_int, pkey: P);
    ibv_get_pkey_index(ctx: P, port: u8, pkey: u16);
}

nothing! {
    // rdma-core's historical converters of kernel structures, which
    // librdmacm (and so perftest) links against.
    ibv_copy_ah_attr_from_kern(dst: P, src: P);
    ibv_copy_qp_attr_from_kern(dst: P, src: P);
    ibv_copy_path_rec_from_kern(dst: P, src: P);
    ibv_copy_path_rec_to_kern(dst: P, src: P);
    ibv_ack_async_event(event: P);
    ibv_unimport_pd(pd: P);
    ibv_unimport_mr(mr: P);
    ibv_unimport_dm(dm: P);
}

/// `_ibv_query_gid_table`: not carried yet (-`EOPNOTSUPP`).
#[no_mangle]
pub unsafe extern "C" fn _ibv_query_gid_table(
    _ctx: P,
    _entries: P,
    _max: usize,
    _flags: u32,
    _size: usize,
) -> isize {
    -(libc::EOPNOTSUPP as isize)
}

/// `ibv_fork_init`: nothing to prepare (no memory is pinned by the card).
#[no_mangle]
pub unsafe extern "C" fn ibv_fork_init() -> c_int {
    0
}

/// `ibv_is_fork_initialized`: `IBV_FORK_DISABLED`.
#[no_mangle]
pub unsafe extern "C" fn ibv_is_fork_initialized() -> c_int {
    0
}

/// `ibv_dontfork_range`: nothing is pinned.
#[no_mangle]
pub unsafe extern "C" fn ibv_dontfork_range(_base: P, _size: usize) -> c_int {
    0
}

/// `ibv_dofork_range`: nothing is pinned.
#[no_mangle]
pub unsafe extern "C" fn ibv_dofork_range(_base: P, _size: usize) -> c_int {
    0
}

/// A static C string.
macro_rules! cstr {
    ($s:expr) => {
        concat!($s, "\0").as_ptr().cast::<c_char>()
    };
}

/// `ibv_wc_status_str`.
#[no_mangle]
pub unsafe extern "C" fn ibv_wc_status_str(status: c_int) -> *const c_char {
    match status {
        0 => cstr!("success"),
        1 => cstr!("local length error"),
        2 => cstr!("local QP operation error"),
        3 => cstr!("local EE context operation error"),
        4 => cstr!("local protection error"),
        5 => cstr!("Work Request Flushed Error"),
        6 => cstr!("memory management operation error"),
        7 => cstr!("bad response error"),
        8 => cstr!("local access error"),
        9 => cstr!("remote invalid request error"),
        10 => cstr!("remote access error"),
        11 => cstr!("remote operation error"),
        12 => cstr!("transport retry counter exceeded"),
        13 => cstr!("RNR retry counter exceeded"),
        14 => cstr!("local RDD violation error"),
        15 => cstr!("remote invalid RD request"),
        16 => cstr!("aborted error"),
        17 => cstr!("invalid EE context number"),
        18 => cstr!("invalid EE context state"),
        19 => cstr!("fatal error"),
        20 => cstr!("response timeout error"),
        21 => cstr!("general error"),
        22 => cstr!("TM error"),
        23 => cstr!("TM rendezvous error"),
        _ => cstr!("unknown"),
    }
}

/// `ibv_node_type_str`.
#[no_mangle]
pub unsafe extern "C" fn ibv_node_type_str(t: c_int) -> *const c_char {
    match t {
        1 => cstr!("InfiniBand channel adapter"),
        2 => cstr!("InfiniBand switch"),
        3 => cstr!("InfiniBand router"),
        4 => cstr!("iWARP NIC"),
        5 => cstr!("usNIC"),
        6 => cstr!("usNIC UDP"),
        7 => cstr!("unspecified"),
        _ => cstr!("unknown"),
    }
}

/// `ibv_port_state_str`.
#[no_mangle]
pub unsafe extern "C" fn ibv_port_state_str(s: c_int) -> *const c_char {
    match s {
        0 => cstr!("no state change (NOP)"),
        1 => cstr!("down"),
        2 => cstr!("init"),
        3 => cstr!("armed"),
        4 => cstr!("active"),
        5 => cstr!("active defer"),
        _ => cstr!("unknown"),
    }
}

/// `ibv_event_type_str`.
#[no_mangle]
pub unsafe extern "C" fn ibv_event_type_str(e: c_int) -> *const c_char {
    match e {
        0 => cstr!("CQ error"),
        1 => cstr!("local work queue catastrophic error"),
        2 => cstr!("invalid request local work queue error"),
        3 => cstr!("local access violation work queue error"),
        4 => cstr!("communication established"),
        5 => cstr!("send queue drained"),
        6 => cstr!("path migrated"),
        7 => cstr!("path migration request error"),
        8 => cstr!("local catastrophic error"),
        9 => cstr!("port active"),
        10 => cstr!("port error"),
        11 => cstr!("LID change"),
        12 => cstr!("P_Key change"),
        13 => cstr!("SM change"),
        14 => cstr!("SRQ catastrophic error"),
        15 => cstr!("SRQ limit reached"),
        16 => cstr!("last WQE reached"),
        17 => cstr!("client reregistration"),
        18 => cstr!("GID table change"),
        19 => cstr!("WQ fatal"),
        _ => cstr!("unknown"),
    }
}

/// `enum ibv_rate` and its rate in Mb/s (the IBTA's values).
const RATES: [(c_int, c_int); 24] = [
    (2, 2500),
    (5, 5000),
    (3, 10000),
    (6, 20000),
    (4, 30000),
    (7, 40000),
    (8, 60000),
    (9, 80000),
    (10, 120000),
    (11, 14062),
    (12, 56250),
    (13, 112500),
    (14, 168750),
    (15, 25781),
    (16, 103125),
    (17, 206250),
    (18, 309375),
    (19, 28125),
    (20, 53125),
    (21, 425000),
    (22, 637500),
    (23, 850000),
    (24, 1275000),
    (25, 1700000),
];

/// `ibv_rate_to_mbps`: -1 for an unknown rate.
#[no_mangle]
pub unsafe extern "C" fn ibv_rate_to_mbps(rate: c_int) -> c_int {
    RATES.iter().find(|r| r.0 == rate).map_or(-1, |r| r.1)
}

/// `mbps_to_ibv_rate`: `IBV_RATE_MAX` (0) for an unknown rate.
#[no_mangle]
pub unsafe extern "C" fn mbps_to_ibv_rate(mbps: c_int) -> c_int {
    RATES.iter().find(|r| r.1 == mbps).map_or(0, |r| r.0)
}

/// `ibv_rate_to_mult`: multiples of 2.5 Gb/s, -1 for other rates.
#[no_mangle]
pub unsafe extern "C" fn ibv_rate_to_mult(rate: c_int) -> c_int {
    RATES
        .iter()
        .find(|r| r.0 == rate && r.0 <= 10)
        .map_or(-1, |r| r.1 / 2500)
}

/// `mult_to_ibv_rate`: `IBV_RATE_MAX` (0) for other multiples.
#[no_mangle]
pub unsafe extern "C" fn mult_to_ibv_rate(mult: c_int) -> c_int {
    RATES
        .iter()
        .find(|r| r.0 <= 10 && r.1 == mult.saturating_mul(2500))
        .map_or(0, |r| r.0)
}
