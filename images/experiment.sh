#!/bin/bash
# experiment.sh [CACHE_DIR]  — reproduces the measurements in images/NOTES.md.
# Builds kernel + rootfs (idempotent), an experiment initramfs (busybox init, optional python3
# vport test run as PID 1 in the rootfs), then: (a) boot timing, (b/c/e) template snapshot and
# restore variants, (d) virtio-serial disconnect/reconnect semantics, restore benchmark, and the
# cost of pausing a share=off sandbox. Every QEMU it starts is quit via QMP (or killed) by the harness.
set -euo pipefail
CACHE_DIR=${1:-/var/cache/cove}
HERE=$(cd "$(dirname "$0")" && pwd)
export CACHE_DIR
"$HERE/kernel.sh" "$CACHE_DIR"
"$HERE/rootfs.sh" "$CACHE_DIR"
mkdir -p "$CACHE_DIR/exp"
"$HERE/experiment/build-initramfs.sh" "$CACHE_DIR" "$CACHE_DIR/exp/initramfs.cpio.gz"
qemu-system-x86_64 --version | head -1
cd "$HERE/experiment"
STRICT=on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny
echo "### (a) boot";                     python3 boot_test.py
echo "### (b,c) snapshot/restore, exec: URI, -sandbox on"; python3 snapshot_test.py q35 exec on
echo "### (e) strict sandbox, fd: URI";  python3 snapshot_test.py q35 fd "$STRICT"
echo "### (e) strict sandbox, exec: URI (expected: QEMU killed by seccomp)"
python3 snapshot_test.py q35 exec "$STRICT" 2>&1 | tail -2 || true
echo "### microvm";                      python3 snapshot_test.py microvm fd "$STRICT"
echo "### (d) vport semantics";          python3 vport_test.py q35
echo "### restore benchmark";            python3 bench_restore.py microvm 8; python3 bench_restore.py q35 8  # q35 last: pause_private.py reuses its template
echo "### pause cost of a share=off sandbox"; python3 pause_private.py
rm -f /dev/shm/cove-* "$CACHE_DIR"/exp/*.qcow2 "$CACHE_DIR"/exp/*.state
