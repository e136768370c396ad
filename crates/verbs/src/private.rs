//! rdma-core's private interface between libibverbs and its provider
//! libraries (`IBVERBS_PRIVATE_34`). Only a provider calls these, for its
//! own devices, which the card's are not; they are here so that
//! applications that link providers directly still load (perftest links
//! libmlx5 and libefa, whose constructors register their drivers). Every
//! call is refused with `EOPNOTSUPP` (or a null object); registering a
//! driver is accepted and ignored.

use std::ffi::c_int;

use crate::set_errno;

/// Commands a provider would send to the kernel: refused.
macro_rules! refused {
    ($($name:ident),* $(,)?) => {$(
        #[doc = concat!("`", stringify!($name), "`: a provider's call; refused (`EOPNOTSUPP`).")]
        #[no_mangle]
        pub unsafe extern "C" fn $name() -> c_int {
            set_errno(libc::EOPNOTSUPP);
            libc::EOPNOTSUPP
        }
    )*};
}

/// A provider's object constructors: null.
macro_rules! null {
    ($($name:ident),* $(,)?) => {$(
        #[doc = concat!("`", stringify!($name), "`: a provider's call; null (`EOPNOTSUPP`).")]
        #[no_mangle]
        pub unsafe extern "C" fn $name() -> *mut std::ffi::c_void {
            set_errno(libc::EOPNOTSUPP);
            std::ptr::null_mut()
        }
    )*};
}

/// A provider's bookkeeping: nothing to do.
macro_rules! ignored {
    ($($name:ident),* $(,)?) => {$(
        #[doc = concat!("`", stringify!($name), "`: a provider's call; ignored.")]
        #[no_mangle]
        pub unsafe extern "C" fn $name() {}
    )*};
}

ignored!(
    verbs_register_driver_34,
    __verbs_log,
    verbs_set_ops,
    verbs_uninit_context,
    verbs_init_cq,
);

null!(_verbs_init_and_alloc_context, verbs_open_device);

/// `verbs_allow_disassociate_destroy`: false.
#[no_mangle]
pub unsafe extern "C" fn verbs_allow_disassociate_destroy() -> bool {
    false
}

refused!(
    execute_ioctl,
    __ioctl_final_num_attrs,
    ibv_cmd_advise_mr,
    ibv_cmd_alloc_dm,
    ibv_cmd_alloc_mw,
    ibv_cmd_alloc_pd,
    ibv_cmd_attach_mcast,
    ibv_cmd_close_xrcd,
    ibv_cmd_create_ah,
    ibv_cmd_create_counters,
    ibv_cmd_create_cq,
    ibv_cmd_create_cq_ex,
    ibv_cmd_create_flow,
    ibv_cmd_create_flow_action_esp,
    ibv_cmd_create_qp,
    ibv_cmd_create_qp_ex,
    ibv_cmd_create_qp_ex2,
    ibv_cmd_create_rwq_ind_table,
    ibv_cmd_create_srq,
    ibv_cmd_create_srq_ex,
    ibv_cmd_create_wq,
    ibv_cmd_dealloc_mw,
    ibv_cmd_dealloc_pd,
    ibv_cmd_dereg_mr,
    ibv_cmd_destroy_ah,
    ibv_cmd_destroy_counters,
    ibv_cmd_destroy_cq,
    ibv_cmd_destroy_flow,
    ibv_cmd_destroy_flow_action,
    ibv_cmd_destroy_qp,
    ibv_cmd_destroy_rwq_ind_table,
    ibv_cmd_destroy_srq,
    ibv_cmd_destroy_wq,
    ibv_cmd_detach_mcast,
    ibv_cmd_free_dm,
    ibv_cmd_get_context,
    ibv_cmd_modify_cq,
    ibv_cmd_modify_flow_action_esp,
    ibv_cmd_modify_qp,
    ibv_cmd_modify_qp_ex,
    ibv_cmd_modify_srq,
    ibv_cmd_modify_wq,
    ibv_cmd_open_qp,
    ibv_cmd_open_xrcd,
    ibv_cmd_poll_cq,
    ibv_cmd_post_recv,
    ibv_cmd_post_send,
    ibv_cmd_post_srq_recv,
    ibv_cmd_query_context,
    ibv_cmd_query_device,
    ibv_cmd_query_device_any,
    ibv_cmd_query_mr,
    ibv_cmd_query_port,
    ibv_cmd_query_qp,
    ibv_cmd_query_srq,
    ibv_cmd_read_counters,
    ibv_cmd_reg_dm_mr,
    ibv_cmd_reg_dmabuf_mr,
    ibv_cmd_reg_mr,
    ibv_cmd_req_notify_cq,
    ibv_cmd_rereg_mr,
    ibv_cmd_resize_cq,
    ibv_read_ibdev_sysfs_file,
);
