#!/usr/bin/env bash
# cargo's runner for the test binaries scripts/test.sh starts: each may run
# SOFTCARD_TEST_LIMIT seconds (900 unless set), then it and everything it
# started in its process group (QEMU guests, daemons, tools) are killed, so
# a test that hangs costs minutes and names itself instead of taking the
# whole CI budget.
limit=${SOFTCARD_TEST_LIMIT:-900}
timeout -k 30 "$limit" "$@"
rc=$?
if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    echo "test-limit: $1 ran past $limit s and was killed" >&2
fi
exit "$rc"
