//! Builds `lb-ebpf` for `bpfel-unknown-none` and leaves the object in OUT_DIR, where
//! `lb_userspace::datapath` embeds it with `include_bytes_aligned!` (the aya-template
//! layout).
//!
//! The BPF target needs a rustc that ships `core` for bpfel-unknown-none; Debian's
//! rustc-web does (see `cargo xtask setup`), so no build-std or nightly is needed.
//! `LB_BPF_RUSTC` and `LB_BPF_CARGO` override where that toolchain lives.

use std::{
    env,
    path::PathBuf,
    process::{Command, Stdio},
};

use anyhow::{Context as _, bail};

fn main() -> anyhow::Result<()> {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?);
    let root = manifest_dir.parent().context("lb-userspace has no parent directory")?;
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    for dir in ["lb-ebpf/src", "lb-ebpf/Cargo.toml", "lb-common/src", "lb-common/Cargo.toml"] {
        println!("cargo:rerun-if-changed={}", root.join(dir).display());
    }
    println!("cargo:rerun-if-env-changed=LB_BPF_RUSTC");
    println!("cargo:rerun-if-env-changed=LB_BPF_CARGO");
    let rustc = env::var("LB_BPF_RUSTC").unwrap_or_else(|_| "/usr/bin/rustc".into());
    let cargo = env::var("LB_BPF_CARGO").unwrap_or_else(|_| "/usr/bin/cargo".into());

    let target_dir = out_dir.join("ebpf-target");
    let mut cmd = Command::new(&cargo);
    cmd.current_dir(root)
        .args(["build", "--package", "lb-ebpf", "--release", "--target", "bpfel-unknown-none"])
        .arg("--target-dir")
        .arg(&target_dir)
        .env("RUSTC", &rustc)
        // Debian's rustc is a stable release; the BPF target's `core` needs the
        // unstable asm/intrinsics gates that aya-ebpf uses.
        .env("RUSTC_BOOTSTRAP", "1")
        .env("CARGO_TARGET_BPFEL_UNKNOWN_NONE_LINKER", "bpf-linker")
        // BTF, for the verifier: `bpf_loop` callbacks need BTF func_info.
        .env("CARGO_ENCODED_RUSTFLAGS", "-Cdebuginfo=2\x1f-Clink-arg=--btf");
    if env::var_os("CARGO_FEATURE_DEBUG_LOG").is_some() {
        cmd.args(["--features", "lb-ebpf/debug-log"]);
    }
    // Nothing of the host build may leak into the BPF build.
    for var in [
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTC_WRAPPER",
        "RUSTFLAGS",
        "CARGO_BUILD_TARGET",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_RUSTFLAGS",
        "CARGO_MAKEFLAGS",
        "RUSTDOC",
    ] {
        cmd.env_remove(var);
    }
    let output = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .with_context(|| format!("running {cargo} for lb-ebpf; try `cargo xtask setup`"))?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        for line in stderr.lines() {
            println!("cargo:warning={line}");
        }
        bail!(
            "building lb-ebpf with {cargo} (RUSTC={rustc}) failed; \
             try `cargo xtask setup` to install the BPF toolchain"
        );
    }
    for (bin, dest) in [("lb", "lb-ebpf.o"), ("floor", "lb-floor.o")] {
        let obj = target_dir.join("bpfel-unknown-none/release").join(bin);
        std::fs::copy(&obj, out_dir.join(dest)).with_context(|| format!("copying {}", obj.display()))?;
    }
    // The benchmark's no-op floor programs are not the product's: lb-dev's build script
    // gets their path as DEP_LB_EBPF_FLOOR_OBJECT (this package `links = "lb_ebpf"`).
    println!("cargo:floor_object={}", out_dir.join("lb-floor.o").display());
    Ok(())
}
