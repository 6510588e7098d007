#!/bin/bash
# build-initramfs.sh CACHE_DIR OUT.cpio.gz : busybox + CACHE_DIR/kernel/modules + experiment init
set -euo pipefail
CACHE_DIR=$1; OUT=$2; HERE=$(cd "$(dirname "$0")" && pwd)
T=$(mktemp -d); trap 'rm -rf "$T"' EXIT
mkdir -p "$T"/{bin,dev,proc,sys,newroot,tmp,lib/modules}
cp /bin/busybox "$T/bin/busybox"
cp "$CACHE_DIR"/kernel/modules/*.ko "$CACHE_DIR"/kernel/modules/load-order "$T/lib/modules/"
install -m 755 "$HERE/init" "$T/init"
cp "$HERE/vporttest.py" "$T/vporttest.py"
( cd "$T" && find . | cpio -o -H newc --quiet | gzip -1 ) > "$OUT"
