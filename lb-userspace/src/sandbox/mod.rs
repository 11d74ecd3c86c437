//! The sandbox cluster's node side (`lb-sandbox`): our own small kubelet, the built-in
//! "container images", and the TCP relay that lets root-namespace kubectl reach the
//! control plane. `cargo xtask sandbox` drives it; docs/sandbox.md has the topology.
//!
//! Naming is shared with xtask/src/sandbox by convention (not by code, since xtask must
//! build without lb-userspace): node `i` (1-based) is namespace `lbsb-node<i>`, fabric
//! address 10.250.0.<10+i>, pod CIDR 10.244.<i>.0/24 with gateway 10.244.<i>.1.

pub mod envvars;
pub mod images;
pub mod kubelet;
pub mod relay;

use std::{fs::File, net::Ipv4Addr, os::fd::AsRawFd as _, path::Path, process::Command};

use anyhow::{Context as _, Result, bail};

/// Every namespace, bpffs dir and interface group the sandbox makes starts with this.
pub const PREFIX: &str = "lbsb-";
/// Default state dir (logs, pid files, kubeconfigs, pod records).
pub const STATE_DIR: &str = "/tmp/lbsb";

/// Node `i` (1-based).
#[derive(Debug, Clone)]
pub struct NodeSpec {
    pub index: u8,
    pub name: String,
    pub netns: String,
    pub fabric_ip: Ipv4Addr,
    pub pod_gw: Ipv4Addr,
}

impl NodeSpec {
    pub fn new(index: u8) -> Self {
        let name = format!("{PREFIX}node{index}");
        NodeSpec {
            index,
            netns: name.clone(),
            name,
            fabric_ip: Ipv4Addr::new(10, 250, 0, 10 + index),
            pod_gw: Ipv4Addr::new(10, 244, index, 1),
        }
    }
    pub fn pod_cidr(&self) -> String {
        format!("10.244.{}.0/24", self.index)
    }
}

/// Runs `ip ARGS`, failing with its stderr.
pub fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip").args(args).output().context("cannot run ip (iproute2); is it installed?")?;
    if !out.status.success() {
        bail!("ip {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// Moves the calling thread into the named network namespace for good: only call it on
/// a thread made for the purpose (sockets opened afterwards live in that namespace).
pub fn enter_netns(name: &str) -> Result<()> {
    let path = Path::new("/run/netns").join(name);
    let f = File::open(&path).with_context(|| format!("opening {}; does netns {name} exist?", path.display()))?;
    // SAFETY: plain syscall on a file descriptor we own for its duration.
    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error()).with_context(|| format!("setns into {name} (run as root)"));
    }
    Ok(())
}

/// RFC 3339 UTC timestamp ("2024-05-01T12:00:00Z") for API objects, without a date crate.
pub fn rfc3339_now() -> String {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    rfc3339(secs)
}

fn rfc3339(secs: u64) -> String {
    let days = i64::try_from(secs / 86_400).unwrap_or(0);
    let rem = secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

#[cfg(test)]
mod tests {
    #[test]
    fn rfc3339_dates() {
        assert_eq!(super::rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(super::rfc3339(1_709_210_096), "2024-02-29T12:34:56Z");
    }
}
