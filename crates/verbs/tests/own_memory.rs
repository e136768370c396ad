//! The library's memory regions are the application's own pages: two
//! overlapping registrations of one buffer (as libraries that cache
//! registrations make) both reach the same bytes, a SEND from one lands
//! through the other, and the application reads it in its own buffer
//! without a copy. Through the real card service (in a network namespace
//! the test creates, on its loopback; needs root) and the library's C
//! entry points, as an application calls them.

use std::ffi::c_void;
use std::ptr::null_mut;

mod common;

use ibverbs::sys;

#[test]
fn overlapping_registrations_share_the_applications_pages() {
    let _card = common::service("ownmem");
    let page = 4096usize;
    // SAFETY: the library's C API, called as verbs documents; every
    // pointer passed is live for the call, every object is destroyed
    // before the buffer is freed.
    unsafe {
        let (list, ctx, pd) = common::open_pd();
        // Three pages of heap-like memory with something already in them.
        let buf = libc::mmap(
            null_mut(),
            3 * page,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
        .cast::<u8>();
        assert_ne!(buf.cast::<c_void>(), libc::MAP_FAILED);
        let bytes = std::slice::from_raw_parts_mut(buf, 3 * page);
        bytes[..11].copy_from_slice(b"from page 0");
        bytes[2 * page + 5] = 0x5a;
        // Pages 0-1 (send from), then pages 1-2 (receive into): page 1 is
        // in both, already moved by the first.
        let access = (sys::ibv_access_flags_IBV_ACCESS_LOCAL_WRITE
            | sys::ibv_access_flags_IBV_ACCESS_REMOTE_WRITE)
            .cast_signed();
        let mr1 = ibverbs::ibv_reg_mr(pd, buf.cast(), 2 * page, access);
        let mr2 = ibverbs::ibv_reg_mr(pd, buf.add(page + 100).cast(), 2 * page - 100, access);
        assert!(!mr1.is_null() && !mr2.is_null());
        // What was there stays there.
        assert_eq!(&bytes[..11], b"from page 0");
        assert_eq!(bytes[2 * page + 5], 0x5a);

        let cq = ibverbs::ibv_create_cq(ctx, 16, null_mut(), null_mut(), 0);
        let qp = common::looped_rc_qp(pd, cq, 4);

        // Written after both registrations, in the page they share: the
        // card must read it where the application wrote it, through the
        // first region (had the second registration moved page 1 again,
        // the first would still see the old page).
        bytes[page + 200..page + 211].copy_from_slice(b"from page 1");
        // Receive into page 1 through the second region, and into page 2;
        // send from page 1 and page 0 through the first.
        for (wr_id, at) in [(1u64, page + 1000), (3, 2 * page + 64)] {
            common::post_recv(qp, wr_id, buf.add(at), 64, (*mr2).lkey);
        }
        for (wr_id, at) in [(2u64, page + 200), (4, 0)] {
            common::post_send(qp, wr_id, buf.add(at), 11, (*mr1).lkey);
        }
        let got = common::poll_all(cq, 4);
        // The receive with its length (verbs defines byte_len for
        // receives), and the send.
        assert_eq!(got.len(), 4, "{got:?}");
        for (i, w) in got.iter().enumerate() {
            let recv = i % 2 == 0;
            assert_eq!(w.0, i as u64 + 1, "{got:?}");
            assert_eq!(w.1, 0, "status: {got:?}");
            if recv {
                assert_eq!((w.2, w.3), (sys::ibv_wc_opcode_IBV_WC_RECV, 11), "{got:?}");
            } else {
                assert_eq!(w.2, sys::ibv_wc_opcode_IBV_WC_SEND, "{got:?}");
            }
        }
        // The card wrote into the application's own page: it reads the
        // message where it posted the receive.
        assert_eq!(&bytes[page + 1000..page + 1011], b"from page 1");
        assert_eq!(&bytes[2 * page + 64..2 * page + 75], b"from page 0");
        assert_eq!(bytes[2 * page + 5], 0x5a);

        assert_eq!(ibverbs::ibv_destroy_qp(qp), 0);
        assert_eq!(ibverbs::ibv_dereg_mr(mr2), 0);
        assert_eq!(ibverbs::ibv_dereg_mr(mr1), 0);
        assert_eq!(ibverbs::ibv_destroy_cq(cq), 0);
        common::close(list, ctx, pd);
        libc::munmap(buf.cast(), 3 * page);
    }
}
