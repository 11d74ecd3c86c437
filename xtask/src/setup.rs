//! `cargo xtask setup`: the verified toolchain recipe (the README's first section lists it), idempotently.
//!
//! - Debian's rustc-web 1.96 at /usr/bin/rustc ships a prebuilt `core` for
//!   bpfel-unknown-none, so the datapath builds without nightly or build-std;
//! - LLVM 22 matches that rustc, and bpf-linker 0.13.0 is built against it;
//! - iperf3, ethtool and iproute2 are for the namespace tests and benchmarks; openssl,
//!   curl and make for the Kubernetes control plane that `cargo xtask kube` builds;
//!   containerd, runc and the CNI plugins for the sandbox's real nodes.

use std::process::Command;

use anyhow::{Context as _, Result, bail};

const APT_PACKAGES: &[&str] = &[
    "rustc-web",
    "cargo-web",
    "libstd-rust-web-dev-bpf",
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "zlib1g-dev",
    "iperf3",
    "ethtool",
    "iproute2",
    // The control plane (xtask/src/kube.rs): certificates, readiness checks, the build.
    "openssl",
    "curl",
    "make",
    // Real nodes (xtask/src/sandbox): the container runtime and CNI plugins a kubelet drives,
    // the iptables/IPVS tools kube-proxy (the peer) needs, and the static userland the test
    // images are made of (xtask/src/sandbox/image.rs).
    "containerd",
    "runc",
    "containernetworking-plugins",
    "iptables",
    "ipvsadm",
    "ipset",
    "conntrack",
    "busybox-static",
    "netcat-openbsd",
    "dash",
    "gcc",
    "libc6-dev",
];
const BPF_LINKER_VERSION: &str = "0.13.0";

fn missing_packages() -> Vec<&'static str> {
    APT_PACKAGES
        .iter()
        .copied()
        .filter(|p| {
            let out = Command::new("dpkg-query").args(["-W", "-f=${Status}", p]).output();
            !matches!(out, Ok(o) if String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        })
        .collect()
}

fn bpf_linker_ok() -> bool {
    Command::new("bpf-linker")
        .arg("--version")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(BPF_LINKER_VERSION))
}

/// Installs what is missing; says so when nothing is.
pub fn run() -> Result<()> {
    if !install()? {
        println!("setup: everything is installed already; nothing to do");
    }
    Ok(())
}

/// Installs what is missing, quietly when nothing is (used before build and test).
pub fn ensure() -> Result<()> {
    install().map(|_| ())
}

fn install() -> Result<bool> {
    let missing = missing_packages();
    let linker = bpf_linker_ok();
    if missing.is_empty() && linker {
        return Ok(false);
    }
    if !missing.is_empty() {
        println!("setup: installing Debian packages: {}", missing.join(" "));
        run_cmd(Command::new("apt-get").args(["update", "-q"]), "apt-get update")?;
        run_cmd(
            Command::new("apt-get")
                .args(["install", "-y", "-q", "--no-install-recommends"])
                .args(&missing)
                .env("DEBIAN_FRONTEND", "noninteractive"),
            "apt-get install (run as root)",
        )?;
    }
    if !bpf_linker_ok() {
        println!("setup: building bpf-linker {BPF_LINKER_VERSION} against LLVM 22 (a few minutes)");
        let path = format!("/usr/lib/llvm-22/bin:{}", std::env::var("PATH").unwrap_or_default());
        run_cmd(
            Command::new("cargo")
                .args(["install", "bpf-linker", "--version", BPF_LINKER_VERSION])
                .args(["--no-default-features", "--features", "llvm-22"])
                .env("LLVM_PREFIX", "/usr/lib/llvm-22")
                .env("PATH", path),
            "cargo install bpf-linker",
        )?;
    }
    if !std::path::Path::new("/usr/bin/rustc").exists() {
        bail!("/usr/bin/rustc is still missing after installing rustc-web; check `apt-cache policy rustc-web`");
    }
    println!("setup: done");
    Ok(true)
}

fn run_cmd(cmd: &mut Command, what: &str) -> Result<()> {
    let status = cmd.status().with_context(|| format!("{what}: could not start"))?;
    if !status.success() {
        bail!("{what} failed ({status})");
    }
    Ok(())
}
