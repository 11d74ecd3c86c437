#!/usr/bin/env bash
# Build Kubernetes 1.20.2 control-plane binaries from Debian bookworm packages, offline.
#   Usage: kube-build.sh CACHE_DIR        (xtask's kube.rs runs this; CACHE_DIR=/var/cache/lb/kube-1.20.2)
# Result: CACHE_DIR/bin/{etcd,kube-apiserver,kube-controller-manager,kube-scheduler,kubectl,kubelet,kube-proxy,
#         agnhost,e2e.test,pause} plus CACHE_DIR/bin/agnhost-files/ (porter's test certificate), log in CACHE_DIR/build.log.
# Progress lines go to stdout, everything else to the log. Follows /work/shared/recipes/build-kube-apiserver.sh:
#  - a scratch apt config derived at run time from /etc/apt/sources.list.d/debian.sources
#    (no mirror address lives in the project, system apt config and lists are untouched);
#  - `apt-get source --download-only kubernetes`, `apt-get download` of Go 1.19, etcd-server, rsync;
#  - debs unpacked with dpkg -x (nothing is installed); vendored reflect2 swapped for Debian's 1.0.2.
# Set LB_KUBE_KEEP_WORK=1 to keep CACHE_DIR/work (source tree + Go cache) after a successful build.
set -euo pipefail
C=${1:?usage: kube-build.sh CACHE_DIR}
mkdir -p "$C"; C=$(cd "$C" && pwd)
W=$C/work; LOG=$C/build.log
BINS=(etcd kube-apiserver kube-controller-manager kube-scheduler kubectl kubelet kube-proxy agnhost e2e.test pause)
WANT=1.20.2

# one build at a time per cache dir
exec 9>"$C/.lock"; flock 9
have_all() { for b in "${BINS[@]}"; do [ -x "$C/bin/$b" ] || return 1; done; [ -f "$C/bin/.complete" ]; }
if have_all; then echo "lb-kube: binaries already in $C/bin (cached), nothing to do"; exit 0; fi

exec 3>&1 >"$LOG" 2>&1
T0=$(date +%s)
say() { echo "lb-kube: $*" >&3; echo "=== $(date +%T) $*"; }
say "build log: $LOG"

# 1. scratch apt config: the machine's bookworm (non-security) stanza, as deb + deb-src, Suites: bookworm only
SRC=/etc/apt/sources.list.d/debian.sources
[ -r "$SRC" ] || { echo "lb-kube: $SRC not found (expected a Debian bookworm deb822 sources file)" >&3; exit 1; }
rm -rf "$W/apt" "$W/aptparts"
mkdir -p "$W"/{apt/lists/partial,apt/cache/archives/partial,aptparts,deb,root,bin}
awk 'BEGIN{RS="";ORS="\n\n"} /Suites: bookworm( |$|\n)/ && !/security/' "$SRC" \
  | sed -e 's/^Types: .*/Types: deb deb-src/' -e 's/^Suites: .*/Suites: bookworm/' > "$W/aptparts/lb-kube.sources"
grep -q '^URIs:' "$W/aptparts/lb-kube.sources" \
  || { echo "lb-kube: no bookworm stanza found in $SRC" >&3; exit 1; }
APTO=(-o Dir::Etc::SourceList=/dev/null -o Dir::Etc::SourceParts="$W/aptparts"
      -o Dir::State::Lists="$W/apt/lists" -o Dir::Cache="$W/apt/cache" -o APT::Sandbox::User=root)
say "apt-get update (scratch config, bookworm main deb+deb-src)..."
apt-get "${APTO[@]}" update -qq

# 2. kubernetes source: the orig tarball carries the whole tree incl. vendor/ and staging/
say "downloading the kubernetes source package (34 MB)..."
rm -rf "$W/src"; mkdir -p "$W/src"
( cd "$W/src" && apt-get "${APTO[@]}" source --download-only -qq kubernetes )
tar xf "$W"/src/kubernetes_*.orig.tar.* -C "$W/src"
K8S=$(ls -d "$W"/src/kubernetes-1.* | head -1)
case "$K8S" in */kubernetes-$WANT) ;; *) echo "lb-kube: expected kubernetes-$WANT, Debian has $(basename "$K8S")" >&3; exit 1;; esac

# 3. binary debs: Go 1.19 (+src), etcd, rsync (+libpopt0), reflect2 1.0.2 -- unpacked, not installed
say "downloading golang-1.19, etcd-server, rsync debs..."
rm -rf "$W/deb" "$W/root"; mkdir -p "$W/deb" "$W/root"
( cd "$W/deb" && apt-get "${APTO[@]}" download -qq golang-1.19-go golang-1.19-src etcd-server \
      golang-github-modern-go-reflect2-dev rsync libpopt0 )
for f in "$W"/deb/*.deb; do dpkg -x "$f" "$W/root"; done
printf '#!/bin/sh\nLD_LIBRARY_PATH=%s exec %s "$@"\n' "$W/root/usr/lib/x86_64-linux-gnu" "$W/root/usr/bin/rsync" > "$W/bin/rsync"
chmod +x "$W/bin/rsync"

# 4. vendored reflect2 1.0.1 is broken with Go >= 1.18: swap in Debian's 1.0.2
rm -rf "$K8S/vendor/github.com/modern-go/reflect2"
cp -r "$W/root/usr/share/gocode/src/github.com/modern-go/reflect2" "$K8S/vendor/github.com/modern-go/reflect2"
rm -f "$K8S/vendor/github.com/modern-go/reflect2/go.mod"

# 5. build, GOPATH mode, offline
export PATH="$W/bin:$W/root/usr/lib/go-1.19/bin:$PATH" GOPROXY=off GOFLAGS= GOCACHE="$W/gocache"
T1=$(date +%s)
say "building kube-apiserver (about 4 minutes the first time)..."
( cd "$K8S" && make WHAT=cmd/kube-apiserver )
T2=$(date +%s)
say "kube-apiserver built in $((T2-T1))s; building kube-controller-manager, kube-scheduler, kubectl, kubelet, kube-proxy (about 4 minutes)..."
( cd "$K8S" && make WHAT="cmd/kube-controller-manager cmd/kube-scheduler cmd/kubectl cmd/kubelet cmd/kube-proxy" )
T3=$(date +%s)
say "node binaries built in $((T3-T2))s; building agnhost (static) and e2e.test (about 3 minutes)..."
( cd "$K8S" && make WHAT=test/images/agnhost KUBE_STATIC_OVERRIDES=agnhost )
( cd "$K8S" && make WHAT=test/e2e/e2e.test )
T3B=$(date +%s)
say "agnhost and e2e.test built in $((T3B-T3))s"

# 6. install into the cache atomically
rm -rf "$C/bin.new"; mkdir -p "$C/bin.new"
cp "$W/root/usr/bin/etcd" "$C/bin.new/etcd"
for b in kube-apiserver kube-controller-manager kube-scheduler kubectl kubelet kube-proxy agnhost e2e.test; do
  cp "$K8S/_output/bin/$b" "$C/bin.new/$b"
done
# the pause container of every pod sandbox, from the same tree (build/pause), static so the image needs nothing else
gcc -static -O2 -DVERSION=3.2 -o "$C/bin.new/pause" "$K8S/build/pause/linux/pause.c"
# agnhost's porter serves TLS with this pair; the agnhost image carries them at /
mkdir -p "$C/bin.new/agnhost-files"
cp "$K8S/test/images/agnhost/porter/localhost.crt" "$K8S/test/images/agnhost/porter/localhost.key" "$C/bin.new/agnhost-files/"
{ "$C/bin.new/kube-apiserver" --version; "$C/bin.new/kubectl" version --client --short 2>/dev/null || true
  # sed, not head: head exits after one line, and etcd, still writing, dies of SIGPIPE,
  # which pipefail turns into a failed build (exit status 141, seen here).
  "$C/bin.new/etcd" --version | sed -n 1p; } | tee "$C/bin.new/VERSIONS"
touch "$C/bin.new/.complete"
rm -rf "$C/bin"; mv "$C/bin.new" "$C/bin"
[ "${LB_KUBE_KEEP_WORK:-}" = 1 ] || rm -rf "$W"
T4=$(date +%s)
say "done: kube-apiserver $((T2-T1))s, node binaries $((T3-T2))s, agnhost+e2e.test $((T3B-T3))s, total $((T4-T0))s; binaries in $C/bin"
