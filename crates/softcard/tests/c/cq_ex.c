/* An application of the extended CQ API, built against rdma-core's own
 * header (Debian's libibverbs-dev) and run through softcard's library:
 * ibv_create_cq_ex, ibv_start_poll / ibv_next_poll / ibv_end_poll and the
 * ibv_wc_read_* accessors, on a queue pair connected to itself. Prints
 * one line per completion and "OK" when every check held. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <infiniband/verbs.h>

#define FAIL(...) do { fprintf(stderr, __VA_ARGS__); fputc('\n', stderr); return 1; } while (0)

int main(void)
{
	int n;
	struct ibv_device **list = ibv_get_device_list(&n);
	if (!list || n < 1)
		FAIL("no device");
	struct ibv_context *ctx = ibv_open_device(list[0]);
	if (!ctx)
		FAIL("open: %s", strerror(errno));

	/* What is not carried says so. */
	struct ibv_cq_init_attr_ex ts = {
		.cqe = 4, .wc_flags = IBV_WC_EX_WITH_COMPLETION_TIMESTAMP,
	};
	if (ibv_create_cq_ex(ctx, &ts) || errno != EOPNOTSUPP)
		FAIL("a timestamp CQ was not refused with EOPNOTSUPP");

	struct ibv_cq_init_attr_ex ca = {
		.cqe = 16,
		.wc_flags = IBV_WC_EX_WITH_BYTE_LEN | IBV_WC_EX_WITH_QP_NUM,
	};
	struct ibv_cq_ex *cq = ibv_create_cq_ex(ctx, &ca);
	if (!cq)
		FAIL("create_cq_ex: %s", strerror(errno));
	struct ibv_pd *pd = ibv_alloc_pd(ctx);
	char *buf = calloc(1, 8192);
	struct ibv_mr *mr = ibv_reg_mr(pd, buf, 8192, IBV_ACCESS_LOCAL_WRITE);
	if (!pd || !mr)
		FAIL("pd/mr: %s", strerror(errno));
	struct ibv_qp_init_attr qa = {
		.send_cq = ibv_cq_ex_to_cq(cq), .recv_cq = ibv_cq_ex_to_cq(cq),
		.cap = { .max_send_wr = 4, .max_recv_wr = 4, .max_send_sge = 1, .max_recv_sge = 1 },
		.qp_type = IBV_QPT_RC,
	};
	struct ibv_qp *qp = ibv_create_qp(pd, &qa);
	if (!qp)
		FAIL("qp: %s", strerror(errno));
	union ibv_gid gid;
	if (ibv_query_gid(ctx, 1, 0, &gid))
		FAIL("gid");
	struct ibv_qp_attr a = { .qp_state = IBV_QPS_INIT, .port_num = 1 };
	if (ibv_modify_qp(qp, &a, IBV_QP_STATE | IBV_QP_PKEY_INDEX | IBV_QP_PORT | IBV_QP_ACCESS_FLAGS))
		FAIL("init");
	memset(&a, 0, sizeof a);
	a.qp_state = IBV_QPS_RTR;
	a.path_mtu = IBV_MTU_1024;
	a.dest_qp_num = qp->qp_num;
	a.ah_attr.is_global = 1;
	a.ah_attr.grh.dgid = gid;
	a.ah_attr.port_num = 1;
	if (ibv_modify_qp(qp, &a, IBV_QP_STATE | IBV_QP_AV | IBV_QP_PATH_MTU | IBV_QP_DEST_QPN |
			  IBV_QP_RQ_PSN | IBV_QP_MAX_DEST_RD_ATOMIC | IBV_QP_MIN_RNR_TIMER))
		FAIL("rtr");
	memset(&a, 0, sizeof a);
	a.qp_state = IBV_QPS_RTS;
	if (ibv_modify_qp(qp, &a, IBV_QP_STATE | IBV_QP_SQ_PSN))
		FAIL("rts");

	strcpy(buf, "first");
	strcpy(buf + 100, "second!");
	for (int i = 0; i < 2; i++) {
		struct ibv_sge s = { .addr = (uintptr_t)buf + 4096 + 1024 * i, .length = 64, .lkey = mr->lkey };
		struct ibv_recv_wr w = { .wr_id = 10 + i, .sg_list = &s, .num_sge = 1 }, *bad;
		if (ibv_post_recv(qp, &w, &bad))
			FAIL("post_recv");
	}
	for (int i = 0; i < 2; i++) {
		struct ibv_sge s = { .addr = (uintptr_t)buf + 100 * i, .length = i ? 8 : 6, .lkey = mr->lkey };
		struct ibv_send_wr w = { .wr_id = 20 + i, .sg_list = &s, .num_sge = 1,
			.opcode = IBV_WR_SEND, .send_flags = IBV_SEND_SIGNALED }, *bad;
		if (ibv_post_send(qp, &w, &bad))
			FAIL("post_send");
	}

	int got = 0, recv_bytes = 0;
	for (long spins = 0; got < 4 && spins < 200000000L; spins++) {
		struct ibv_poll_cq_attr pa = {};
		if (ibv_start_poll(cq, &pa))
			continue;
		do {
			if (cq->status != IBV_WC_SUCCESS)
				FAIL("wr %lu: status %d", (unsigned long)cq->wr_id, cq->status);
			enum ibv_wc_opcode op = ibv_wc_read_opcode(cq);
			uint32_t len = ibv_wc_read_byte_len(cq);
			if (ibv_wc_read_qp_num(cq) != qp->qp_num)
				FAIL("wrong qp_num");
			printf("wr %lu opcode %d len %u\n", (unsigned long)cq->wr_id, op, len);
			if (op == IBV_WC_RECV)
				recv_bytes += len;
			got++;
		} while (ibv_next_poll(cq) == 0);
		ibv_end_poll(cq);
	}
	if (got != 4)
		FAIL("%d completions of 4", got);
	if (recv_bytes != 14 || strcmp(buf + 4096, "first") || strcmp(buf + 5120, "second!"))
		FAIL("received %d bytes: '%s' '%s'", recv_bytes, buf + 4096, buf + 5120);
	/* Nothing more: the ring is drained. */
	struct ibv_poll_cq_attr pa = {};
	if (ibv_start_poll(cq, &pa) != ENOENT)
		FAIL("a completion too many");

	if (ibv_destroy_qp(qp) || ibv_dereg_mr(mr) || ibv_destroy_cq(ibv_cq_ex_to_cq(cq)) ||
	    ibv_dealloc_pd(pd) || ibv_close_device(ctx))
		FAIL("teardown");
	ibv_free_device_list(list);
	puts("OK");
	return 0;
}
