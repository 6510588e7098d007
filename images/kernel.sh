#!/bin/bash
# kernel.sh CACHE_DIR
# Fetch Debian's linux-image-cloud-amd64 kernel (without installing it on the host) and
# extract vmlinuz + the minimal set of modules Cove's guest needs, with dependencies
# resolved from the modules' own depends= fields, into CACHE_DIR/kernel/. Idempotent.
set -euo pipefail

CACHE_DIR=${1:?usage: kernel.sh CACHE_DIR}
OUT="$CACHE_DIR/kernel"
# Modules the guest needs (those built in are skipped automatically).
# virtio_mmio is for the microvm machine type.
WANTED=(virtio_pci virtio_mmio virtio_blk virtio_net virtio_console virtio_rng fuse ext4)

log() { echo "[kernel.sh] $*" >&2; }

# Resolve the concrete package behind the metapackage.
resolve() { apt-cache depends linux-image-cloud-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/{print $2; exit}'; }
PKG=$(resolve)
if [ -z "$PKG" ]; then
    log "package lists do not know linux-image-cloud-amd64 yet: apt-get update"
    apt-get update -qq >&2 || true
    PKG=$(resolve)
fi
if [ -z "$PKG" ]; then
    log "cannot resolve linux-image-cloud-amd64 (run apt-get update?)"; exit 1
fi
KVER=${PKG#linux-image-}
log "kernel package: $PKG (version $KVER)"

if [ -f "$OUT/.done" ] && [ "$(cat "$OUT/.done")" = "$KVER" ]; then
    log "already present in $OUT (kernel $KVER), nothing to do"
    exit 0
fi

TMP=$(mktemp -d)
chmod 777 "$TMP"   # lets apt's _apt user write the download (else a warning)
trap 'rm -rf "$TMP"' EXIT
log "downloading $PKG"
( cd "$TMP" && apt-get download "$PKG" >/dev/null )
log "extracting"
dpkg-deb -x "$TMP"/"$PKG"_*.deb "$TMP/x"

MODDIR="$TMP/x/lib/modules/$KVER"
[ -d "$MODDIR" ] || { log "no module dir $MODDIR"; exit 1; }
# The .deb ships no modules.dep (depmod runs at install time, and kmod may not be installed
# on the host), so dependencies are read from each module's own .modinfo "depends=" field.
declare -A PATH_OF=()
while IFS= read -r p; do
    b=$(basename "$p"); b=${b%%.ko*}; PATH_OF[${b//-/_}]=$p
done < <(cd "$MODDIR" && find kernel -name '*.ko*')
COMPRESSION=$(cd "$MODDIR" && find kernel -name '*.ko*' | sed 's/.*\.ko/.ko/' | sort | uniq -c | tr -s ' \n' ' ')
log "module files: ${COMPRESSION:-plain .ko}"
deps_of() {  # path relative to MODDIR -> dependency module names
    local f="$MODDIR/$1"
    case "$f" in
        *.xz) xz -dc "$f" ;; *.zst) zstd -qdc "$f" ;; *.gz) gzip -dc "$f" ;; *) cat "$f" ;;
    esac | tr '\0' '\n' | sed -n 's/^depends=//p' | head -1 | tr ',' ' '
}

STAGE="$TMP/out"
mkdir -p "$STAGE/modules"
cp "$TMP/x/boot/vmlinuz-$KVER" "$STAGE/vmlinuz"
cp "$TMP/x/boot/config-$KVER" "$STAGE/config"
echo "$KVER" > "$STAGE/version"

# Resolve dependencies (dependencies first), depth-first.
declare -A SEEN=()
ORDER=()
visit() {  # module name
    local n=${1//-/_} p d
    [ -n "${SEEN[$n]:-}" ] && return
    SEEN[$n]=1
    p=${PATH_OF[$n]:-}
    [ -n "$p" ] || { log "dependency $n not found"; exit 1; }
    for d in $(deps_of "$p"); do visit "$d"; done
    ORDER+=("$p")
}
for m in "${WANTED[@]}"; do
    n=${m//-/_}
    if grep -qE "/${n}\.ko$|/${m}\.ko$" "$MODDIR/modules.builtin" 2>/dev/null; then
        log "$m: built into the kernel"
        continue
    fi
    if [ -z "${PATH_OF[$n]:-}" ]; then log "$m: not found (neither builtin nor module), skipped"; continue; fi
    visit "$n"
done

: > "$STAGE/modules/load-order"
for p in "${ORDER[@]}"; do
    f=$(basename "$p")
    case "$f" in
        *.ko.xz)  xz -dc "$MODDIR/$p" > "$STAGE/modules/${f%.xz}"; f=${f%.xz} ;;
        *.ko.zst) zstd -qdc "$MODDIR/$p" > "$STAGE/modules/${f%.zst}"; f=${f%.zst} ;;
        *.ko.gz)  gzip -dc "$MODDIR/$p" > "$STAGE/modules/${f%.gz}"; f=${f%.gz} ;;
        *)        cp "$MODDIR/$p" "$STAGE/modules/$f" ;;
    esac
    echo "$f" >> "$STAGE/modules/load-order"
done
log "modules (load order): $(tr '\n' ' ' < "$STAGE/modules/load-order")"

echo "$KVER" > "$STAGE/.done"
rm -rf "$OUT.new"; mkdir -p "$CACHE_DIR"
mv "$STAGE" "$OUT.new"
rm -rf "$OUT"; mv "$OUT.new" "$OUT"
log "done: $OUT"
