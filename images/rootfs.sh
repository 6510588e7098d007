#!/bin/bash
# rootfs.sh CACHE_DIR [VARIANT]
# Build a Debian 12 (bookworm) guest root filesystem with mmdebstrap and produce
#   OUT/rootfs.qcow2  (qcow2 base image converted from an ext4 image of used size + 1 GiB free,
#                      made with mke2fs -d: no loop mount; the ext4 image is scratch)
# VARIANT names the system template:
#   base              system/debian:bookworm            OUT=CACHE_DIR/rootfs
#   code-interpreter  system/code-interpreter:v0.1.0    OUT=CACHE_DIR/rootfs-code-interpreter
#     base + numpy, matplotlib, pandas (Debian) + the service in COVE_SERVICE_DIR (server.py,
#     node_worker.js, cove_inline.py), run by the agent as the template's command (/etc/cove/image.json).
#   desktop           system/desktop:v0.1.0             OUT=CACHE_DIR/rootfs-desktop
#     base + Xvfb, XFCE, x11vnc, noVNC, xdotool, wmctrl, ffmpeg, Pillow (Debian) + the service in
#     COVE_SERVICE_DIR (server.py), run by the agent as the template's command.
# Idempotent: skipped when the outputs exist for the same recipe (hash of this script, sources
# and service files).
# Env: COVE_ROOTFS_EXTRA="pkg1,pkg2"  extra packages; COVE_ROOTFS_FREE_MIB (default 1024).
set -euo pipefail

CACHE_DIR=${1:?usage: rootfs.sh CACHE_DIR [base|code-interpreter|desktop]}
VARIANT=${2:-base}
SUITE=bookworm
PACKAGES="bash,coreutils,ca-certificates,curl,git,python3,procps,iproute2,sudo,netbase,less,iputils-ping,nodejs"
SERVICE_DIR=""
SERVICE_FILES=()
case "$VARIANT" in
    base) OUT="$CACHE_DIR/rootfs" ;;
    code-interpreter)
        OUT="$CACHE_DIR/rootfs-code-interpreter"
        PACKAGES="$PACKAGES,python3-numpy,python3-matplotlib,python3-pandas"
        SERVICE_DIR=${COVE_SERVICE_DIR:?COVE_SERVICE_DIR must name the directory of the service files}
        SERVICE_FILES=("$SERVICE_DIR/server.py" "$SERVICE_DIR/node_worker.js" "$SERVICE_DIR/cove_inline.py")
        ;;
    desktop)
        OUT="$CACHE_DIR/rootfs-desktop"
        # No recommends (mmdebstrap's default): each piece the service runs is named here.
        PACKAGES="$PACKAGES,xvfb,xauth,xfonts-base,fonts-dejavu-core,x11-utils,x11-xserver-utils"
        PACKAGES="$PACKAGES,xfce4-session,xfwm4,xfdesktop4,xfce4-panel,xfce4-terminal,xfconf,dbus-x11"
        PACKAGES="$PACKAGES,x11vnc,novnc,python3-websockify,xdotool,wmctrl,ffmpeg,python3-pil"
        SERVICE_DIR=${COVE_SERVICE_DIR:?COVE_SERVICE_DIR must name the directory of the service files}
        SERVICE_FILES=("$SERVICE_DIR/server.py")
        ;;
    *) echo "rootfs.sh: unknown variant $VARIANT (base, code-interpreter, desktop)" >&2; exit 1 ;;
esac
# Language servers the LSP endpoints start (`python`: pyright; `typescript`/`javascript`:
# typescript-language-server over typescript's tsserver), from the npm registry: name, version,
# the registry's sha512 integrity. None has runtime dependencies, so each is its tarball.
NPM_PACKAGES=(
    "pyright 1.1.414 sha512-FPZZb51jepDX4eP7TEYDeNFtmE3WgwkkEcJpvH3/QmUSsj0EAy3LXu+xB4T/FWDejtsXlCfFr/rbWFjwuwuXww=="
    "typescript 5.9.3 sha512-jl1vZzPDinLr9eUt3J/t7V6FgNEw9QjvBPdysz9KfQDD41fQrC2Y4vKQdiaUpFT4bXlb1RHhLpp8wtm6M5TgSw=="
    "typescript-language-server 4.4.1 sha512-vEvDw+cjY75afMN2rhx0z8sQtFDAUHoBniksBmB6NUZlDt0rEIwQq01VMiqyXFm9uZwcED2475cmDeXxoDHleg=="
)
NPM_REGISTRY=${COVE_NPM_REGISTRY:-https://registry.npmjs.org}
[ -n "${COVE_ROOTFS_EXTRA:-}" ] && PACKAGES="$PACKAGES,$COVE_ROOTFS_EXTRA"
FREE_MIB=${COVE_ROOTFS_FREE_MIB:-1024}

step() { echo "[rootfs.sh $VARIANT] $(date +%T) $*" >&2; }

for t in mmdebstrap mke2fs qemu-img curl python3; do
    command -v "$t" >/dev/null || { step "missing $t (apt-get install mmdebstrap e2fsprogs qemu-utils curl python3)"; exit 1; }
done

# Reuse the host's apt sources (only the Debian registry is reachable): every enabled
# .list/.sources file that names the suite. mmdebstrap pastes files given as MIRROR verbatim.
MIRRORS=()
for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
    [ -f "$f" ] || continue
    grep -Eq "^[^#]*\b$SUITE\b" "$f" || continue
    grep -Eq '^[^#]*(deb |URIs:)' "$f" || continue
    MIRRORS+=("$f")
done
[ ${#MIRRORS[@]} -gt 0 ] || { step "no host apt source for $SUITE found"; exit 1; }
# Reuse the host's apt options that matter for reaching the mirror (proxy, snapshot validity).
APTOPTS=()
for f in /etc/apt/apt.conf /etc/apt/apt.conf.d/*; do
    [ -f "$f" ] && grep -Eqi 'Proxy|Check-Valid-Until|Check-Date' "$f" && APTOPTS+=(--aptopt="$f")
done

RECIPE=$( { cat "$0"; echo "$PACKAGES $FREE_MIB"; cat "${MIRRORS[@]}"; [ ${#SERVICE_FILES[@]} -eq 0 ] || cat "${SERVICE_FILES[@]}"; } | sha256sum | cut -c1-16)
if [ -f "$OUT/.done" ] && [ "$(cat "$OUT/.done")" = "$RECIPE" ] && [ -f "$OUT/rootfs.qcow2" ]; then
    step "already built ($OUT, recipe $RECIPE), nothing to do"
    exit 0
fi

mkdir -p "$CACHE_DIR"
WORK=$(mktemp -d "$CACHE_DIR/.rootfs-build.XXXXXX")
chmod 755 "$WORK"   # apt's _apt user must reach the chroot's lists/partial
trap 'rm -rf "$WORK"' EXIT
ROOT="$WORK/root"
mkdir "$ROOT"

# The npm tarballs, fetched once into the cache and checked against their pinned integrity.
mkdir -p "$CACHE_DIR/npm"
for entry in "${NPM_PACKAGES[@]}"; do
    read -r name version integrity <<<"$entry"
    tgz="$CACHE_DIR/npm/$name-$version.tgz"
    if [ ! -f "$tgz" ]; then
        step "fetching $name $version from $NPM_REGISTRY"
        curl -fsSL --retry 3 -o "$tgz.part" "$NPM_REGISTRY/$name/-/$name-$version.tgz"
        mv "$tgz.part" "$tgz"
    fi
    got=$(python3 -c 'import base64, hashlib, sys; print("sha512-" + base64.b64encode(hashlib.sha512(open(sys.argv[1], "rb").read()).digest()).decode())' "$tgz")
    [ "$got" = "$integrity" ] || { step "$tgz: integrity $got, expected $integrity"; rm -f "$tgz"; exit 1; }
done

step "1/4 mmdebstrap $SUITE (sources: ${MIRRORS[*]}) packages: $PACKAGES"
mmdebstrap --mode=root --variant=minbase --include="$PACKAGES" \
    "${APTOPTS[@]}" \
    --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/info/*' \
    --dpkgopt='path-exclude=/usr/share/doc/*' \
    --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    --dpkgopt='path-exclude=/usr/share/locale/*' \
    --dpkgopt='path-include=/usr/share/locale/locale.alias' \
    --customize-hook='chroot "$1" useradd --create-home --uid 1000 --user-group --shell /bin/bash user' \
    --customize-hook='echo "user ALL=(ALL) NOPASSWD:ALL" > "$1/etc/sudoers.d/user" && chmod 0440 "$1/etc/sudoers.d/user"' \
    --customize-hook='echo cove > "$1/etc/hostname"' \
    --customize-hook='printf "127.0.0.1\tlocalhost\n127.0.1.1\tcove\n::1\tlocalhost ip6-localhost ip6-loopback\n" > "$1/etc/hosts"' \
    --customize-hook='rm -f "$1/etc/resolv.conf"; : > "$1/etc/resolv.conf"' \
    --customize-hook='echo "/dev/vda / ext4 rw,relatime 0 1" > "$1/etc/fstab"' \
    --customize-hook='rm -rf "$1"/var/cache/apt/*.bin "$1"/var/lib/apt/lists/* "$1"/var/cache/debconf/*-old "$1"/var/log/*.log "$1"/var/log/apt/*' \
    "$SUITE" "$ROOT" "${MIRRORS[@]}" 2>&1 | sed 's/^/    /' >&2

step "1b/4 language servers into /usr/local (${#NPM_PACKAGES[@]} npm packages)"
for entry in "${NPM_PACKAGES[@]}"; do
    read -r name version _ <<<"$entry"
    dest="$ROOT/usr/local/lib/node_modules/$name"
    mkdir -p "$dest"
    tar -xzf "$CACHE_DIR/npm/$name-$version.tgz" -C "$dest" --strip-components=1 --no-same-owner
    # Each `bin` of package.json becomes a command in /usr/local/bin.
    python3 - "$dest" "$ROOT/usr/local/bin" "$name" <<'PY'
import json, os, sys
dest, bindir, name = sys.argv[1:]
bins = json.load(open(os.path.join(dest, "package.json"))).get("bin") or {}
if isinstance(bins, str):
    bins = {name: bins}
os.makedirs(bindir, exist_ok=True)
for cmd, rel in bins.items():
    target = os.path.normpath(os.path.join(dest, rel))
    os.chmod(target, 0o755)
    link = os.path.join(bindir, cmd)
    if os.path.lexists(link):
        os.remove(link)
    os.symlink(os.path.relpath(target, bindir), link)
PY
done

# install_service NAME: the service files into /opt/cove/NAME, and an image config whose
# command is its server.py, run by the agent as the sandbox user.
install_service() {
    local dir=/opt/cove/$1
    install -d -m 0755 "$ROOT$dir" "$ROOT/etc/cove"
    install -m 0644 "${SERVICE_FILES[@]}" "$ROOT$dir/"
    cat >"$ROOT/etc/cove/image.json" <<JSON
{"env": [], "working_dir": "/home/user", "user": "user",
 "cmd": ["/usr/bin/python3", "$dir/server.py"]}
JSON
}

if [ "$VARIANT" = code-interpreter ]; then
    step "1c/4 the code interpreter service into /opt/cove/code-interpreter"
    # The agent starts the template's command as the sandbox user before the template
    # snapshot is saved, so every sandbox restores with the service running (and a warm spare
    # worker that has numpy, pandas and matplotlib loaded).
    install_service code-interpreter
    chroot "$ROOT" python3 -c 'import numpy, pandas, matplotlib; print("numpy", numpy.__version__, "pandas", pandas.__version__, "matplotlib", matplotlib.__version__)' >&2
fi

if [ "$VARIANT" = desktop ]; then
    step "1c/4 the desktop service into /opt/cove/desktop"
    # As for the code interpreter: the agent starts it before the template snapshot, and the
    # snapshot is saved once the whole desktop is up, so every sandbox restores with it drawn.
    install_service desktop
    # D-Bus (XFCE's session bus) wants a machine id; a template's sandboxes share its one.
    chroot "$ROOT" dbus-uuidgen --ensure=/etc/machine-id
    for b in Xvfb xfce4-session xfwm4 xfdesktop xfce4-panel xfce4-terminal x11vnc websockify xdotool wmctrl ffmpeg dbus-launch; do
        chroot "$ROOT" sh -c "command -v $b" >/dev/null || { step "missing $b"; exit 1; }
    done
    [ -f "$ROOT/usr/share/novnc/vnc.html" ] || { step "missing noVNC's vnc.html"; exit 1; }
    chroot "$ROOT" python3 -c 'from PIL import Image, ImageGrab; print("Pillow", Image.__version__)' >&2
fi

step "2/4 sanity checks"
chroot "$ROOT" id user >&2
chroot "$ROOT" visudo -c >/dev/null
for b in bash python3 git curl ip ps sudo node pyright-langserver typescript-language-server tsserver; do chroot "$ROOT" sh -c "command -v $b" >/dev/null || { step "missing $b"; exit 1; }; done
chroot "$ROOT" pyright --version >&2
chroot "$ROOT" typescript-language-server --version >&2
[ -z "$(ls -A "$ROOT/var/cache/apt/archives" 2>/dev/null | grep -v '^partial$\|^lock$' || true)" ] || { step "apt cache not empty"; exit 1; }

USED_KIB=$(du -sk --apparent-size "$ROOT" | cut -f1)
INODES=$(find "$ROOT" -xdev | wc -l)
SIZE_MIB=$(( (USED_KIB * 11 / 10) / 1024 + FREE_MIB ))
step "3/4 mke2fs -d: content ${USED_KIB} KiB, $INODES files -> ${SIZE_MIB} MiB ext4"
mke2fs -q -t ext4 -L cove-root -d "$ROOT" -E root_owner=0:0 -F "$WORK/rootfs.ext4" "${SIZE_MIB}M" >&2
e2fsck -fn "$WORK/rootfs.ext4" >/dev/null 2>&1 || { step "e2fsck reports errors"; e2fsck -fn "$WORK/rootfs.ext4" >&2; exit 1; }
rm -rf "$ROOT"

step "4/4 qemu-img convert -> qcow2"
qemu-img convert -f raw -O qcow2 "$WORK/rootfs.ext4" "$WORK/rootfs.qcow2"
# Nothing reads the raw image: keeping it would double the cache's disk use.
rm -f "$WORK/rootfs.ext4"

rm -rf "$OUT.new"; mkdir -p "$OUT.new"
mv "$WORK/rootfs.qcow2" "$OUT.new/"
echo "$RECIPE" > "$OUT.new/.done"
rm -rf "$OUT"; mv "$OUT.new" "$OUT"
step "done: $(ls -lh "$OUT" | tail -n +2 | awk '{print $5, $9}' | tr '\n' ' ')"
