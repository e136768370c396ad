//! softcard's drop-in `libibverbs.so.1`: rdma-core's verbs ABI, served by
//! the card daemon's RDMA devices, for applications that were built
//! against rdma-core and are not changed (`softcard rdma exec -- CMD`, or
//! `LD_LIBRARY_PATH`).
//!
//! Every struct an application sees is rdma-core's own, generated from
//! `<infiniband/verbs.h>` by bindgen ([`sys`]), so its layout is the one the
//! application was compiled with. The library reaches the card daemon on
//! its RDMA control socket (`SOFTCARD_RDMA_SOCKET`, default
//! `/run/softcard/rdma.sock`; see `softcard_rdma::service`).
//!
//! Carried today: the device list, opening and closing a device, and
//! querying the device, its port and its RoCE v2 GID (what `ibv_devices`
//! and `ibv_devinfo` use). Protection domains, memory regions, completion
//! queues and queue pairs over shared-memory rings are the next step
//! (docs/rdma.md); every other function of rdma-core's public API is
//! exported too ([`uncarried`]) and answers `EOPNOTSUPP` as verbs
//! documents, so an application loads and says what failed.

#![allow(clippy::missing_safety_doc)]

pub mod sys {
    //! rdma-core's verbs types, generated from its headers.
    #![allow(
        non_camel_case_types,
        non_snake_case,
        non_upper_case_globals,
        dead_code,
        missing_debug_implementations,
        clippy::all,
        clippy::pedantic,
        clippy::restriction,
        unsafe_op_in_unsafe_fn
    )]
    include!(concat!(env!("OUT_DIR"), "/sys.rs"));
}

mod conn;
mod cq_ex;
mod datapath;
mod memory;
mod objects;
mod private;
mod uncarried;

// The C entry points are reachable from Rust too (the crate's tests call
// them as an application does).
pub use datapath::{ibv_ack_cq_events, ibv_get_cq_event};
pub use objects::{
    ibv_alloc_pd, ibv_create_ah, ibv_create_comp_channel, ibv_create_cq, ibv_create_qp,
    ibv_create_srq, ibv_dealloc_pd, ibv_dereg_mr, ibv_destroy_ah, ibv_destroy_comp_channel,
    ibv_destroy_cq, ibv_destroy_qp, ibv_destroy_srq, ibv_modify_qp, ibv_modify_srq, ibv_query_qp,
    ibv_query_srq, ibv_reg_mr, ibv_reg_mr_iova, ibv_reg_mr_iova2,
};

use std::ffi::{c_char, c_int, c_uint, c_void};
use std::path::PathBuf;
use std::sync::OnceLock;

use softcard_rdma::service::{query_devices, DeviceInfo, DEFAULT_SOCKET};

/// A device as an application holds it: rdma-core's `struct ibv_device`
/// first, so that a pointer to one is a pointer to the other.
#[repr(C)]
struct Device {
    dev: sys::ibv_device,
    info: DeviceInfo,
}

/// An open device: rdma-core's `struct verbs_context` first, whose last
/// member is the `ibv_context` applications hold (`abi_compat` says it is
/// extended). Of the extended operations only `create_cq_ex` is set, so
/// the header's inline calls find it, and take their legacy paths into
/// this library's functions for every other (`query_port`,
/// `query_device_ex`), or answer `EOPNOTSUPP`.
#[repr(C)]
struct Context {
    vctx: sys::verbs_context,
    device: &'static Device,
    /// The session with the card daemon.
    conn: conn::Conn,
    /// The device's doorbell.
    doorbell: std::os::fd::OwnedFd,
    /// The context's `async_fd`: the card raises no asynchronous events
    /// yet, so nothing is ever written to it; applications (UCX) poll it
    /// and set it non-blocking, which needs a real descriptor.
    events: std::os::fd::OwnedFd,
}

/// Where the card daemon's RDMA control socket is.
fn socket() -> PathBuf {
    std::env::var_os("SOFTCARD_RDMA_SOCKET")
        .filter(|s| !s.is_empty())
        .map_or_else(|| PathBuf::from(DEFAULT_SOCKET), PathBuf::from)
}

/// The card's devices, asked for once per process; they live as long as
/// the process (an application may keep a device after it frees the
/// list, as rdma-core allows).
fn devices() -> &'static [Device] {
    static DEVICES: OnceLock<Vec<Device>> = OnceLock::new();
    DEVICES.get_or_init(|| {
        let path = socket();
        match query_devices(&path) {
            Ok(list) => list.into_iter().map(device).collect(),
            Err(e) => {
                eprintln!(
                    "softcard verbs: no RDMA devices: cannot reach the card at {}: {e}",
                    path.display()
                );
                Vec::new()
            }
        }
    })
}

/// Copies `s` into a C string field (truncated, always terminated).
fn put(dst: &mut [c_char], s: &str) {
    let n = s.len().min(dst.len() - 1);
    for (d, b) in dst.iter_mut().zip(s.as_bytes()[..n].iter()) {
        *d = c_char::from_ne_bytes([*b]);
    }
    dst[n] = 0;
}

fn device(info: DeviceInfo) -> Device {
    let mut dev = sys::ibv_device {
        node_type: sys::ibv_node_type_IBV_NODE_CA,
        transport_type: sys::ibv_transport_type_IBV_TRANSPORT_IB,
        ..Default::default()
    };
    put(&mut dev.name, &info.name);
    put(
        &mut dev.dev_name,
        &softcard_rdma::service::dev_name(&info.name),
    );
    Device { dev, info }
}

pub(crate) fn set_errno(e: c_int) {
    // SAFETY: errno is this thread's; writing it is what C callers expect.
    unsafe { *libc::__errno_location() = e };
}

/// `ibv_get_device_list`: a null-terminated array of the card's devices.
#[no_mangle]
pub unsafe extern "C" fn ibv_get_device_list(num: *mut c_int) -> *mut *mut sys::ibv_device {
    let mut list: Vec<*mut sys::ibv_device> = devices()
        .iter()
        .map(|d| std::ptr::from_ref(&d.dev).cast_mut())
        .collect();
    let n = list.len();
    list.push(std::ptr::null_mut());
    if !num.is_null() {
        // SAFETY: the caller passes a valid int or null (checked).
        unsafe { *num = c_int::try_from(n).unwrap_or(c_int::MAX) };
    }
    Box::into_raw(list.into_boxed_slice()).cast()
}

/// `ibv_free_device_list`: frees an array from `ibv_get_device_list`.
#[no_mangle]
pub unsafe extern "C" fn ibv_free_device_list(list: *mut *mut sys::ibv_device) {
    if list.is_null() {
        return;
    }
    let mut n = 0;
    // SAFETY: `list` came from ibv_get_device_list: null-terminated.
    while !unsafe { *list.add(n) }.is_null() {
        n += 1;
    }
    // SAFETY: the same allocation, rebuilt with its length (n + 1).
    drop(unsafe { Box::from_raw(std::ptr::slice_from_raw_parts_mut(list, n + 1)) });
}

/// The card device behind an `ibv_device` pointer this library gave out.
///
/// # Safety
/// `dev` is null or came from [`ibv_get_device_list`].
unsafe fn ours(dev: *mut sys::ibv_device) -> Option<&'static Device> {
    devices()
        .iter()
        .find(|d| std::ptr::eq(&d.dev, dev.cast_const()))
}

/// `ibv_get_device_name`.
#[no_mangle]
pub unsafe extern "C" fn ibv_get_device_name(dev: *mut sys::ibv_device) -> *const c_char {
    // SAFETY: per the verbs contract, dev is a listed device.
    match unsafe { ours(dev) } {
        Some(d) => d.dev.name.as_ptr(),
        None => std::ptr::null(),
    }
}

/// `ibv_get_device_index`: the device's place in the list.
#[no_mangle]
pub unsafe extern "C" fn ibv_get_device_index(dev: *mut sys::ibv_device) -> c_int {
    devices()
        .iter()
        .position(|d| std::ptr::eq(&d.dev, dev.cast_const()))
        .and_then(|i| c_int::try_from(i).ok())
        .unwrap_or(-1)
}

/// `ibv_get_device_guid`: the node GUID, big-endian.
#[no_mangle]
pub unsafe extern "C" fn ibv_get_device_guid(dev: *mut sys::ibv_device) -> u64 {
    // SAFETY: per the verbs contract, dev is a listed device.
    unsafe { ours(dev) }.map_or(0, |d| d.info.guid.to_be())
}

/// `ibv_open_device`.
#[no_mangle]
pub unsafe extern "C" fn ibv_open_device(dev: *mut sys::ibv_device) -> *mut sys::ibv_context {
    // SAFETY: per the verbs contract, dev is a listed device.
    let Some(device) = (unsafe { ours(dev) }) else {
        set_errno(libc::ENODEV);
        return std::ptr::null_mut();
    };
    let path = socket();
    let (conn, doorbell) = match conn::Conn::open(&path, &device.info.name) {
        Ok(c) => c,
        Err(e) => {
            eprintln!(
                "softcard verbs: cannot open {} at {}: {e}",
                device.info.name,
                path.display()
            );
            set_errno(e.raw_os_error().unwrap_or(libc::EIO));
            return std::ptr::null_mut();
        }
    };
    // SAFETY: eventfd takes no pointers; a descriptor it returns is ours.
    let events = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
    if events < 0 {
        return std::ptr::null_mut();
    }
    // SAFETY: `events` is a descriptor just opened and owned by nobody else.
    let events = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(events) };
    let mut ctx = sys::ibv_context {
        device: dev,
        cmd_fd: -1,
        async_fd: std::os::fd::AsRawFd::as_raw_fd(&events),
        num_comp_vectors: 1,
        // verbs.h's __VERBS_ABI_IS_EXTENDED: a verbs_context.
        abi_compat: std::ptr::without_provenance_mut(usize::MAX),
        ..Default::default()
    };
    // The calls verbs.h makes inline through the context.
    ctx.ops.poll_cq = Some(datapath::poll_cq);
    ctx.ops.req_notify_cq = Some(datapath::req_notify_cq);
    ctx.ops.post_send = Some(datapath::post_send);
    ctx.ops.post_recv = Some(datapath::post_recv);
    ctx.ops.post_srq_recv = Some(datapath::post_srq_recv);
    let vctx = sys::verbs_context {
        create_cq_ex: Some(cq_ex::create_cq_ex),
        sz: size_of::<sys::verbs_context>(),
        context: ctx,
        ..Default::default()
    };
    let c = Box::into_raw(Box::new(Context {
        vctx,
        device,
        conn,
        doorbell,
        events,
    }));
    // SAFETY: `c` is the live allocation just made; the application holds
    // the ibv_context inside it until ibv_close_device.
    unsafe { &raw mut (*c).vctx.context }
}

/// The context behind an `ibv_context` pointer this library gave out.
///
/// # Safety
/// `ctx` came from [`ibv_open_device`] and is not closed.
unsafe fn context<'a>(ctx: *mut sys::ibv_context) -> Option<&'a Context> {
    // SAFETY: per the caller, `ctx` is the ibv_context inside a Context's
    // verbs_context (repr(C), first field): stepping back by its offset
    // gives the Context.
    unsafe { container(ctx)?.as_ref() }
}

/// The Context an `ibv_context` this library gave out lives in.
///
/// # Safety
/// `ctx` is null or came from [`ibv_open_device`].
unsafe fn container(ctx: *mut sys::ibv_context) -> Option<*mut Context> {
    if ctx.is_null() {
        return None;
    }
    let at = std::mem::offset_of!(sys::verbs_context, context);
    // SAFETY: per the caller, the verbs_context (and so the Context)
    // starts `at` bytes before `ctx`, inside the same allocation.
    Some(unsafe { ctx.byte_sub(at) }.cast::<Context>())
}

/// `ibv_close_device`.
#[no_mangle]
pub unsafe extern "C" fn ibv_close_device(ctx: *mut sys::ibv_context) -> c_int {
    // SAFETY: per the verbs contract, ctx came from ibv_open_device.
    let Some(c) = (unsafe { container(ctx) }) else {
        return libc::EINVAL;
    };
    // SAFETY: a Box<Context> from ibv_open_device, freed once.
    drop(unsafe { Box::from_raw(c) });
    0
}

/// `ibv_get_async_event`: waits on the context's `async_fd` as verbs
/// prescribes (or fails with `EAGAIN` when the application made it
/// non-blocking). The card raises no asynchronous events yet, so a wait
/// ends only in an error.
#[no_mangle]
pub unsafe extern "C" fn ibv_get_async_event(
    ctx: *mut sys::ibv_context,
    event: *mut sys::ibv_async_event,
) -> c_int {
    // SAFETY: per the verbs contract, ctx came from ibv_open_device.
    let Some(c) = (unsafe { context(ctx) }) else {
        set_errno(libc::EINVAL);
        return -1;
    };
    let _ = event;
    let mut word = [0_u8; 8];
    match rustix::io::read(&c.events, &mut word) {
        Err(e) => set_errno(e.raw_os_error()),
        Ok(_) => set_errno(libc::EIO),
    }
    -1
}

/// `ibv_query_device`.
#[no_mangle]
pub unsafe extern "C" fn ibv_query_device(
    ctx: *mut sys::ibv_context,
    attr: *mut sys::ibv_device_attr,
) -> c_int {
    // SAFETY: per the verbs contract.
    let (Some(c), Some(attr)) = (unsafe { context(ctx) }, unsafe { attr.as_mut() }) else {
        return libc::EINVAL;
    };
    let mut a = sys::ibv_device_attr {
        node_guid: c.device.info.guid.to_be(),
        sys_image_guid: c.device.info.guid.to_be(),
        max_mr_size: 1 << 32,
        page_size_cap: 4096,
        hw_ver: 1,
        max_qp: 4096,
        max_qp_wr: 16384,
        max_sge: 32,
        max_cq: 4096,
        max_cqe: 65536,
        max_mr: 65536,
        max_pd: 1024,
        max_qp_rd_atom: 16,
        max_qp_init_rd_atom: 16,
        atomic_cap: sys::ibv_atomic_cap_IBV_ATOMIC_HCA,
        max_pkeys: 1,
        phys_port_cnt: 1,
        ..Default::default()
    };
    put(
        &mut a.fw_ver,
        concat!("softcard ", env!("CARGO_PKG_VERSION")),
    );
    *attr = a;
    0
}

/// `ibv_query_port` (rdma-core's legacy entry, which the header's inline
/// `ibv_query_port` calls for a plain context): fills the fields the
/// legacy attribute struct has, up to `link_layer`.
#[no_mangle]
pub unsafe extern "C" fn ibv_query_port(
    ctx: *mut sys::ibv_context,
    port: u8,
    attr: *mut c_void,
) -> c_int {
    // SAFETY: per the verbs contract.
    if unsafe { context(ctx) }.is_none() || attr.is_null() || port != 1 {
        return libc::EINVAL;
    }
    let attr = attr.cast::<sys::ibv_port_attr>();
    // SAFETY: the caller's struct holds at least the legacy fields, which
    // precede `flags`; each is written by raw pointer, the rest untouched.
    unsafe {
        std::ptr::addr_of_mut!((*attr).state).write(sys::ibv_port_state_IBV_PORT_ACTIVE);
        std::ptr::addr_of_mut!((*attr).max_mtu).write(sys::ibv_mtu_IBV_MTU_4096);
        std::ptr::addr_of_mut!((*attr).active_mtu).write(sys::ibv_mtu_IBV_MTU_1024);
        std::ptr::addr_of_mut!((*attr).gid_tbl_len).write(1);
        std::ptr::addr_of_mut!((*attr).port_cap_flags).write(0);
        std::ptr::addr_of_mut!((*attr).max_msg_sz).write(1 << 31);
        std::ptr::addr_of_mut!((*attr).bad_pkey_cntr).write(0);
        std::ptr::addr_of_mut!((*attr).qkey_viol_cntr).write(0);
        std::ptr::addr_of_mut!((*attr).pkey_tbl_len).write(1);
        std::ptr::addr_of_mut!((*attr).lid).write(0);
        std::ptr::addr_of_mut!((*attr).sm_lid).write(0);
        std::ptr::addr_of_mut!((*attr).lmc).write(0);
        std::ptr::addr_of_mut!((*attr).max_vl_num).write(1);
        std::ptr::addr_of_mut!((*attr).sm_sl).write(0);
        std::ptr::addr_of_mut!((*attr).subnet_timeout).write(0);
        std::ptr::addr_of_mut!((*attr).init_type_reply).write(0);
        // 4X, 25 Gb/s: what rdma_rxe reports for a fast link.
        std::ptr::addr_of_mut!((*attr).active_width).write(2);
        std::ptr::addr_of_mut!((*attr).active_speed).write(32);
        std::ptr::addr_of_mut!((*attr).phys_state).write(5);
        std::ptr::addr_of_mut!((*attr).link_layer).write(sys::IBV_LINK_LAYER_ETHERNET as u8);
    }
    0
}

/// `ibv_query_gid`: index 0 is the device's RoCE v2 GID.
#[no_mangle]
pub unsafe extern "C" fn ibv_query_gid(
    ctx: *mut sys::ibv_context,
    port: u8,
    index: c_int,
    gid: *mut sys::ibv_gid,
) -> c_int {
    // SAFETY: per the verbs contract.
    let (Some(c), Some(gid)) = (unsafe { context(ctx) }, unsafe { gid.as_mut() }) else {
        set_errno(libc::EINVAL);
        return -1;
    };
    if port != 1 || index != 0 {
        set_errno(libc::EINVAL);
        return -1;
    }
    gid.raw = c.device.info.gid;
    0
}

/// `ibv_query_gid_type` (rdma-core's private entry `ibv_devinfo` uses):
/// RoCE v2 (`IBV_GID_TYPE_SYSFS_ROCE_V2`).
#[no_mangle]
pub unsafe extern "C" fn ibv_query_gid_type(
    ctx: *mut sys::ibv_context,
    port: u8,
    index: c_uint,
    ty: *mut c_uint,
) -> c_int {
    // SAFETY: per the verbs contract.
    if unsafe { context(ctx) }.is_none() || ty.is_null() || port != 1 || index != 0 {
        set_errno(libc::EINVAL);
        return -1;
    }
    // SAFETY: checked non-null; the caller's enum is an unsigned int.
    unsafe { *ty = 1 };
    0
}

/// `ibv_read_sysfs_file`: there is no sysfs behind these devices.
#[no_mangle]
pub unsafe extern "C" fn ibv_read_sysfs_file(
    _dir: *const c_char,
    _file: *const c_char,
    _buf: *mut c_char,
    _size: usize,
) -> c_int {
    set_errno(libc::ENOENT);
    -1
}
