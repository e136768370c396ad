//! System V shared memory, as UCX's huge-page memory pools and perftest's
//! `--use_hugepages` use it, is registered in place: the card opens the
//! segment itself, the application's attach stays a System V attach (a
//! second attach of the segment sees what the card wrote, and `shmdt`
//! works), and a segment attached read-only is refused with `EACCES`.
//! Through the real card service (in a network namespace the test
//! creates, on its loopback; needs root) and the library's C entry points.

use std::ffi::c_void;
use std::ptr::null_mut;

mod common;

use ibverbs::sys;

/// A System V segment of `len` bytes, attached twice (read-only the
/// second time when asked) and marked for removal, as UCX makes them.
fn segment(len: usize, second_read_only: bool) -> (*mut u8, *mut u8) {
    // SAFETY: plain System V calls; the attaches stay until the test
    // detaches them.
    unsafe {
        let id = libc::shmget(libc::IPC_PRIVATE, len, libc::IPC_CREAT | 0o600);
        assert!(id >= 0, "shmget: {}", std::io::Error::last_os_error());
        let first = libc::shmat(id, std::ptr::null(), 0);
        let flags = if second_read_only {
            libc::SHM_RDONLY
        } else {
            0
        };
        let second = libc::shmat(id, std::ptr::null(), flags);
        assert!(first as isize != -1 && second as isize != -1);
        assert_eq!(libc::shmctl(id, libc::IPC_RMID, null_mut()), 0);
        (first.cast(), second.cast())
    }
}

#[test]
fn system_v_segments_are_registered_in_place() {
    let _card = common::service("sysvmem");
    let page = 4096usize;
    // SAFETY: the library's C API, called as verbs documents; every
    // pointer passed is live for the call, every object is destroyed
    // before the segments are detached.
    unsafe {
        let (list, ctx, pd) = common::open_pd();
        let (buf, view) = segment(4 * page, false);
        let bytes = std::slice::from_raw_parts_mut(buf, 4 * page);
        bytes[..11].copy_from_slice(b"from page 0");
        let access = (sys::ibv_access_flags_IBV_ACCESS_LOCAL_WRITE
            | sys::ibv_access_flags_IBV_ACCESS_REMOTE_WRITE)
            .cast_signed();
        let mr = ibverbs::ibv_reg_mr(pd, buf.cast(), 4 * page, access);
        assert!(
            !mr.is_null(),
            "ibv_reg_mr: {}",
            std::io::Error::last_os_error()
        );
        // A part of the segment, not starting on a page, registers too.
        let part = ibverbs::ibv_reg_mr(pd, buf.add(page + 10).cast(), page, access);
        assert!(!part.is_null(), "{}", std::io::Error::last_os_error());
        assert_eq!(&bytes[..11], b"from page 0");

        let cq = ibverbs::ibv_create_cq(ctx, 16, null_mut(), null_mut(), 0);
        let qp = common::looped_rc_qp(pd, cq, 4);
        bytes[page + 500..page + 511].copy_from_slice(b"part, too!!");
        common::post_recv(qp, 1, buf.add(3 * page + 100), 64, (*mr).lkey);
        common::post_recv(qp, 3, buf.add(page + 20), 64, (*part).lkey);
        common::post_send(qp, 2, buf, 11, (*mr).lkey);
        common::post_send(qp, 4, buf.add(page + 500), 11, (*part).lkey);
        let got: Vec<_> = common::poll_all(cq, 4).iter().map(|w| (w.0, w.1)).collect();
        let ok = sys::ibv_wc_status_IBV_WC_SUCCESS;
        assert_eq!(got, [(1, ok), (2, ok), (3, ok), (4, ok)]);
        // The card wrote into the segment itself, where each region puts
        // it: both attaches see it.
        let seen = std::slice::from_raw_parts(view, 4 * page);
        assert_eq!(&bytes[3 * page + 100..3 * page + 111], b"from page 0");
        assert_eq!(&seen[3 * page + 100..3 * page + 111], b"from page 0");
        assert_eq!(&seen[page + 20..page + 31], b"part, too!!");

        assert_eq!(ibverbs::ibv_destroy_qp(qp), 0);
        assert_eq!(ibverbs::ibv_dereg_mr(part), 0);
        assert_eq!(ibverbs::ibv_dereg_mr(mr), 0);
        // Still System V attaches: shmdt works on both.
        assert_eq!(libc::shmdt(buf.cast::<c_void>()), 0);
        assert_eq!(libc::shmdt(view.cast::<c_void>()), 0);

        // A segment attached read-only is refused, with or without write
        // rights asked for; the read-write attach of it registers.
        let (rw, ro) = segment(2 * page, true);
        for a in [access, 0] {
            let mr = ibverbs::ibv_reg_mr(pd, ro.cast(), 2 * page, a);
            assert!(mr.is_null());
            assert_eq!(
                std::io::Error::last_os_error().raw_os_error(),
                Some(libc::EACCES)
            );
        }
        let mr = ibverbs::ibv_reg_mr(pd, rw.cast(), 2 * page, access);
        assert!(!mr.is_null(), "{}", std::io::Error::last_os_error());
        assert_eq!(ibverbs::ibv_dereg_mr(mr), 0);
        assert_eq!(libc::shmdt(rw.cast::<c_void>()), 0);
        assert_eq!(libc::shmdt(ro.cast::<c_void>()), 0);

        assert_eq!(ibverbs::ibv_destroy_cq(cq), 0);
        common::close(list, ctx, pd);
    }
}
