#!/usr/bin/env bash
# Builds the petrel-mta and petrel-operator container images without any registry, and
# saves them as OCI archives for `podman load` / `cluster.sh load-image`:
#
#   target/images/petrel-mta.tar       ghcr.io/petrel-mail/petrel-mta:<version>
#   target/images/petrel-operator.tar  ghcr.io/petrel-mail/petrel-operator:<version>
#
# <version> is [workspace.package] version of Cargo.toml. How it works offline:
#
# * The binaries are the release binaries in target/release (built with
#   `cargo build --release -p mta -p operator --bins` when missing or with --build),
#   copied with their debug info removed (as the compiled image stage does) into
#   target/images/bin, and put into the images by images/Containerfile's `prebuilt` stage
#   (BINARIES=prebuilt): the Rust builder stage is skipped, nothing is pulled.
# * The base is localhost/petrel-runtime-base, made here from scratch out of this machine's
#   own files: the shared libraries the binaries link (ldd) and the dynamic loader,
#   /etc/passwd and /etc/group with nonroot (65532), /etc/nsswitch.conf, the CA bundle,
#   /tmp and /home/nonroot. It stands in for gcr.io/distroless/cc-debian12:nonroot.
#   The CA bundle is not optional: SMTP and MTA-STS verify against the embedded webpki
#   roots, but hickory-resolver (built with DNS-over-TLS support; both binaries use it)
#   loads the system's roots whenever a resolver is built, and without any petrel-mta
#   defers every outbound delivery ("resolver: rustls construction error: ... No CA
#   certificates were loaded from the system"). kube-client in the operator also falls
#   back to the system's roots when a kubeconfig names no CA.
#
# Re-running is cheap: unchanged inputs give the same images (podman's layer cache) and an
# archive is only written again when its image changed.
#
# Usage: scripts/build-images.sh [--build]
#   --build   run the cargo release build first even if the binaries exist
# Environment:
#   PETREL_IMAGES_DIR  where the archives (and containers.conf) go; default target/images
#   CONTAINERS_CONF    podman's config; when unset, one is written next to the archives
#                      (runc, no default ulimits: both needed on the test machines)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

say() { printf '\n==> %s\n' "$*"; }
die() { printf 'build-images.sh: %s\n' "$*" >&2; exit 1; }

build=0
for arg in "$@"; do
    case "$arg" in
        --build) build=1 ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown argument: $arg (see --help)" ;;
    esac
done

VERSION=$(awk '/^\[/{section=$0} section=="[workspace.package]" && $1=="version" {
    gsub(/"/, "", $3); print $3; exit }' Cargo.toml)
[ -n "$VERSION" ] || die "no [workspace.package] version in Cargo.toml"
# Scratch space inside the build context (the stripped binaries must be there), and where
# the archives go.
WORK=$ROOT/target/images
OUT=${PETREL_IMAGES_DIR:-$WORK}
MTA_IMAGE=ghcr.io/petrel-mail/petrel-mta:$VERSION
OPERATOR_IMAGE=ghcr.io/petrel-mail/petrel-operator:$VERSION
BASE_IMAGE=localhost/petrel-runtime-base:latest
BINARIES=(petrel-mta petrel-operator)
mkdir -p "$WORK" "$OUT"

# --- tools -----------------------------------------------------------------------------------
SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
apt_missing=()
command -v podman >/dev/null || apt_missing+=(podman)
command -v runc >/dev/null || [ -x /usr/sbin/runc ] || apt_missing+=(runc)
command -v objcopy >/dev/null || apt_missing+=(binutils)
[ -s /etc/ssl/certs/ca-certificates.crt ] || apt_missing+=(ca-certificates)
if [ ${#apt_missing[@]} -gt 0 ]; then
    say "installing Debian packages: ${apt_missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq --no-install-recommends "${apt_missing[@]}" >/dev/null
fi

# crun cannot handle this machine's cgroup mode, and raising RLIMIT_NPROC (podman's default
# ulimits) is not permitted here. An existing CONTAINERS_CONF is left as it is.
if [ -z "${CONTAINERS_CONF:-}" ] || [ ! -f "$CONTAINERS_CONF" ]; then
    cat > "$OUT/containers.conf" <<'EOF'
# Written by scripts/build-images.sh.
[containers]
default_ulimits = []

[engine]
runtime = "runc"
EOF
    export CONTAINERS_CONF="$OUT/containers.conf"
fi

# --- binaries --------------------------------------------------------------------------------
missing=0
for b in "${BINARIES[@]}"; do [ -x "target/release/$b" ] || missing=1; done
if [ $build -eq 1 ] || [ $missing -eq 1 ]; then
    say "cargo build --release -p mta -p operator --bins"
    cargo build --release -p mta -p operator --bins
else
    newer=$(find Cargo.toml Cargo.lock crds mta operator -path mta/fuzz -prune -o -type f \
        \( -name '*.rs' -o -name Cargo.toml -o -name Cargo.lock \) \
        -newer target/release/petrel-mta -print -quit)
    if [ -n "$newer" ]; then
        echo "note: $newer is newer than target/release/petrel-mta; pass --build to rebuild" >&2
    fi
fi

# The release profile keeps debug info; the images do not (the `compiled` stage builds with
# CARGO_PROFILE_RELEASE_STRIP=debuginfo, which this matches). Symbols stay for backtraces.
# They go to target/images/bin, which .containerignore lets into the build context.
PREBUILT_DIR=target/images/bin
mkdir -p "$PREBUILT_DIR"
for b in "${BINARIES[@]}"; do
    if [ ! -e "$PREBUILT_DIR/$b" ] || [ "target/release/$b" -nt "$PREBUILT_DIR/$b" ]; then
        objcopy --strip-debug "target/release/$b" "$PREBUILT_DIR/$b.tmp"
        chmod 0555 "$PREBUILT_DIR/$b.tmp"
        touch -r "target/release/$b" "$PREBUILT_DIR/$b.tmp"
        mv -f "$PREBUILT_DIR/$b.tmp" "$PREBUILT_DIR/$b"
    fi
done

# --- runtime base ----------------------------------------------------------------------------
say "runtime base $BASE_IMAGE (this machine's glibc, nonroot 65532)"
rootfs="$WORK/runtime-base"
rm -rf "$rootfs"
mkdir -p "$rootfs/etc/ssl/certs" "$rootfs/tmp" "$rootfs/home/nonroot"
cp -L /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/certs/ca-certificates.crt"
libs=$(for b in "${BINARIES[@]}"; do ldd "$PREBUILT_DIR/$b"; done | awk '
    /not found/ { print "MISSING " $1; next }
    $2 == "=>" && $3 ~ /^\// { print $3; next }
    $1 ~ /^\// { print $1 }' | sort -u)
if grep -q '^MISSING' <<<"$libs"; then die "unresolved libraries: $(grep '^MISSING' <<<"$libs")"; fi
for lib in $libs; do
    # Copied at the path the binaries look for (the loader at its PT_INTERP path, libraries
    # in the loader's default directories), symlinks resolved.
    mkdir -p "$rootfs$(dirname "$lib")"
    cp -L "$lib" "$rootfs$lib"
done
cat > "$rootfs/etc/passwd" <<'EOF'
root:x:0:0:root:/root:/sbin/nologin
nobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin
nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin
EOF
cat > "$rootfs/etc/group" <<'EOF'
root:x:0:
nobody:x:65534:
nonroot:x:65532:
EOF
cat > "$rootfs/etc/nsswitch.conf" <<'EOF'
passwd: files
group:  files
shadow: files
hosts:  files dns
networks: files
protocols: files
services: files
EOF
chmod 0644 "$rootfs"/etc/passwd "$rootfs"/etc/group "$rootfs"/etc/nsswitch.conf \
    "$rootfs/etc/ssl/certs/ca-certificates.crt"
chmod 1777 "$rootfs/tmp"
chmod 0700 "$rootfs/home/nonroot"
chown 65532:65532 "$rootfs/home/nonroot"
# A reproducible tarball: its digest decides whether the base must be imported again.
tarball="$WORK/runtime-base.tar"
tar --sort=name --mtime=@0 --numeric-owner --format=gnu \
    -C "$rootfs" -cf "$tarball" .
digest=$(sha256sum "$tarball" | cut -d' ' -f1)
current=$(podman image inspect --format '{{index .Labels "io.petrel.rootfs-sha256"}}' \
    "$BASE_IMAGE" 2>/dev/null || true)
if [ "$current" = "$digest" ]; then
    echo "unchanged ($(echo "$libs" | tr '\n' ' '))"
else
    podman import --quiet \
        --change "USER 65532:65532" \
        --change "WORKDIR /home/nonroot" \
        --change "LABEL io.petrel.rootfs-sha256=$digest" \
        --change "LABEL org.opencontainers.image.description=glibc runtime for the Petrel binaries, from the build host" \
        --message "scripts/build-images.sh" \
        "$tarball" "$BASE_IMAGE" >/dev/null
    echo "imported: $(echo "$libs" | tr '\n' ' ')"
fi

# --- images ----------------------------------------------------------------------------------
# On every image of every stage (podman build --label), so that the cache images these
# builds leave behind can be told from anyone else's and removed (see prune_ours).
BUILT_BY=io.petrel.built-by=scripts/build-images.sh
build_image() { # target tag
    local old
    old=$(podman image inspect --format '{{.Id}}' "$2" 2>/dev/null || true)
    say "podman build --target $1 -> $2"
    podman build --quiet --pull=never -f images/Containerfile --target "$1" \
        --label "$BUILT_BY" \
        --build-arg BINARIES=prebuilt \
        --build-arg PREBUILT_DIR="$PREBUILT_DIR" \
        --build-arg RUNTIME_IMAGE="$BASE_IMAGE" \
        --build-arg VERSION="$VERSION" \
        -t "$2" . >/dev/null
    local new
    new=$(podman image inspect --format '{{.Id}}' "$2")
    # The image this tag pointed to before, now untagged: remove it (but no one else's).
    if [ -n "$old" ] && [ "$old" != "$new" ] \
        && [ "$(podman image inspect --format '{{len .RepoTags}}' "$old" 2>/dev/null)" = 0 ]; then
        podman rmi "$old" >/dev/null 2>&1 || true
    fi
}
save_image() { # tag archive
    local id
    id=$(podman image inspect --format '{{.Id}}' "$1")
    if [ -f "$2" ] && [ "$(cat "$2.id" 2>/dev/null)" = "$id" ]; then
        echo "$2: up to date"
        return
    fi
    rm -f "$2" "$2.id"
    podman save --quiet --format oci-archive -o "$2.tmp" "$1"
    mv -f "$2.tmp" "$2"
    echo "$id" > "$2.id"
    echo "$2: written"
}
# podman keeps an image per build step as its cache. The images still in use (the chains of
# the tagged ones) stay; what is left over (the `prebuilt` stage's copy of the binaries,
# chains of replaced images, replaced bases) is removed, so that a machine that runs this
# for every change does not fill up. A re-run rebuilds the `prebuilt` stage in a second
# and, its content unchanged, gets the same images again.
prune_ours() {
    local filter ids
    for filter in "label=$BUILT_BY" label=io.petrel.rootfs-sha256; do
        while ids=$(podman images -q --filter dangling=true --filter "$filter") \
            && [ -n "$ids" ]; do
            # shellcheck disable=SC2086
            podman rmi $ids >/dev/null 2>&1 || break
        done
    done
}
build_image mta "$MTA_IMAGE"
build_image operator "$OPERATOR_IMAGE"
prune_ours

say "saving OCI archives"
save_image "$MTA_IMAGE" "$OUT/petrel-mta.tar"
save_image "$OPERATOR_IMAGE" "$OUT/petrel-operator.tar"

say "images"
human() { numfmt --to=iec-i --suffix=B --format=%.1f "$1"; }
printf '%-45s %-14s %10s %10s\n' IMAGE ID SIZE ARCHIVE
for pair in "$MTA_IMAGE:petrel-mta" "$OPERATOR_IMAGE:petrel-operator" "$BASE_IMAGE:"; do
    image=${pair%:*}; archive=${pair##*:}
    size=$(podman image inspect --format '{{.Size}}' "$image")
    id=$(podman image inspect --format '{{.Id}}' "$image" | cut -c1-12)
    tar_size=-
    [ -z "$archive" ] || tar_size=$(human "$(stat -c %s "$OUT/$archive.tar")")
    printf '%-45s %-14s %10s %10s\n' "$image" "$id" "$(human "$size")" "$tar_size"
done
