#!/usr/bin/env bash
# Installs everything mesh needs on a fresh Debian machine of this kind: the eBPF toolchain
# pieces for the pinned stable Rust, and the Debian packages the demo, tests and benchmarks use.
# Idempotent: when everything is present it only checks, in a second or two.
set -euo pipefail
cd "$(dirname "$0")/.."

TOOLCHAIN=1.95.0
BPF_LINKER_VERSION=0.10.0
PACKAGES=(iproute2 nftables iptables conntrack iputils-ping bpftool tcpdump ethtool wrk iperf3
  dnsperf nginx-light netcat-openbsd dnsmasq-base curl util-linux procps kmod systemd
  gnuplot-nox chromium
  # The podman task driver and its tests: runc (crun refuses hybrid cgroups), busybox-static
  # for the images the tests build offline, the reference CNI plugins.
  podman runc busybox-static containernetworking-plugins
  # The real docker client (20.10) that tests/tests/docker_cli.rs drives against the agent's
  # Docker socket; its dockerd is never started (below).
  docker.io
  # tests/tests/clock_steps.rs steps one agent's wall clock (LD_PRELOAD, test only).
  libfaketime
  # tests/tests/registry_auth.rs pulls from a private registry (distribution's, with
  # htpasswd logins); its own service is never started (below).
  docker-registry apache2-utils)

say() { printf '\033[1m==> %s\033[0m\n' "$*"; }
die() { printf 'setup: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "run as root: mesh programs eBPF and network namespaces"

# --- Debian packages ---------------------------------------------------------------------
missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  say "installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq || die "apt-get update failed"
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null \
    || die "apt-get install ${missing[*]} failed"
  # Debian starts services on install; the tests start their own instances.
  for svc in nginx dnsmasq docker.socket docker containerd docker-registry; do
    if command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
      systemctl disable --now "$svc" >/dev/null 2>&1 || true
    fi
  done
fi

# --- Rust: the pinned stable toolchain, rust-src for -Z build-std, bpf-linker -------------
command -v rustup >/dev/null || die "rustup not found; this machine kind ships Rust through rustup"
rustup toolchain list | grep -q "^$TOOLCHAIN" || rustup toolchain list | grep -q "^stable" \
  || die "Rust toolchain $TOOLCHAIN is not installed"
if ! rustup component list --toolchain "$TOOLCHAIN" --installed 2>/dev/null | grep -q '^rust-src'; then
  say "adding rust-src to $TOOLCHAIN (the eBPF build compiles core from source)"
  rustup component add rust-src --toolchain "$TOOLCHAIN" \
    || die "rustup could not download rust-src; the eBPF programs cannot be built without it"
fi
if ! bpf-linker --version 2>/dev/null | grep -q "$BPF_LINKER_VERSION"; then
  say "installing bpf-linker $BPF_LINKER_VERSION (links eBPF objects with the toolchain's LLVM)"
  cargo +"$TOOLCHAIN" install "bpf-linker@$BPF_LINKER_VERSION" --locked --quiet \
    || die "cargo install bpf-linker@$BPF_LINKER_VERSION failed"
fi
command -v bpf-linker >/dev/null || die "bpf-linker installed but not on PATH (add ~/.cargo/bin)"

# --- Kernel features the dataplane uses ---------------------------------------------------
[ -e /sys/kernel/btf/vmlinux ] || die "kernel has no BTF (/sys/kernel/btf/vmlinux)"
mountpoint -q /sys/fs/bpf 2>/dev/null || mount -t bpf bpf /sys/fs/bpf \
  || die "cannot mount bpffs on /sys/fs/bpf"
for m in vxlan veth bridge br_netfilter nf_conntrack; do modprobe -q "$m" 2>/dev/null || true; done

# --- podman --------------------------------------------------------------------------------
# The agent passes what this kernel needs on every podman call (`--runtime runc` when runc is
# installed, --ulimit at or below its own hard limits), so no containers.conf is written and
# the host's other containers keep their configuration.
if ! podman --runtime runc info --format '{{.Host.OCIRuntime.Name}}' >/dev/null 2>&1; then
  die "podman does not work here (podman --runtime runc info fails); image services need it"
fi

say "setup complete"
