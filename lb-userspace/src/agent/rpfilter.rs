//! Reverse-path filtering on the interfaces the datapath is attached to.
//!
//! The datapath reverse-NATs a backend's reply at tc/XDP ingress, before the routing
//! decision, so the kernel's reverse-path check (`fib_validate_source` in
//! net/ipv4/fib_frontend.c) sees a packet *from the ClusterIP* arriving on the
//! backend's interface. Strict mode drops every such reply; loose mode passes them only
//! if the node has a route to the ClusterIP (a default route); 0 always passes them
//! (measured in docs/datapath-veth.md, finding 3). kube-proxy never meets this: its
//! un-DNAT is done by netfilter after routing.
//!
//! The value in force on an interface is `max(conf.all.rp_filter,
//! conf.<iface>.rp_filter)` (Documentation/networking/ip-sysctl.rst, `rp_filter`:
//! <https://www.kernel.org/doc/html/latest/networking/ip-sysctl.html>), so the agent
//! - sets `conf.<iface>.rp_filter = 0` on each interface it attaches to (Cilium does
//!   the same on its devices), and
//! - checks `conf.all.rp_filter`: strict (1) there overrides the 0 and breaks every
//!   ClusterIP connection, so it warns, and with `--fix-rp-filter` sets it to 0, as
//!   Cilium's loader does (`net.ipv4.conf.all.rp_filter = 0` in
//!   pkg/datapath/loader/base.go). Other interfaces then get the value of their own
//!   `conf.<iface>.rp_filter`, which distributions set with `conf.default` or
//!   sysctl.d, instead of the `all` floor.
//!
//! `/proc/sys/net` shows the network namespace of the process that opens it, so all of
//! this happens in the agent's own namespace only.

use std::{
    io,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

/// Where the IPv4 per-interface sysctls live, under a proc mount (`--proc-dir`).
pub const PROC_IPV4_CONF: &str = "sys/net/ipv4/conf";

/// Strict reverse-path filtering (RFC 3704 strict reverse path).
pub const STRICT: u8 = 1;

/// What the agent found and did about `conf.all.rp_filter`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RpFilterStatus {
    /// `conf.all.rp_filter` as last read (after any fix); None if unreadable or not
    /// checked (nothing attached).
    pub all: Option<u8>,
    /// The value `all` had before `--fix-rp-filter` changed it.
    pub all_fixed_from: Option<u8>,
    /// Set while `all` is strict: every reverse-NATed reply is dropped.
    pub warning: Option<String>,
    /// Attached interfaces whose rp_filter could not be set to 0.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ifaces_failed: Vec<String>,
}

/// Reads and writes `<conf_dir>/<iface>/rp_filter`.
#[derive(Clone, Debug)]
pub struct RpFilter {
    conf_dir: PathBuf,
    fix_all: bool,
}

impl RpFilter {
    /// `conf_dir` is `<proc dir>/`[`PROC_IPV4_CONF`] except in unit tests.
    pub fn new(conf_dir: impl Into<PathBuf>, fix_all: bool) -> Self {
        Self { conf_dir: conf_dir.into(), fix_all }
    }

    fn path(&self, iface: &str) -> PathBuf {
        // The directory keeps the interface's name as is (`eth0.100` included).
        self.conf_dir.join(iface).join("rp_filter")
    }

    pub fn read(&self, iface: &str) -> io::Result<u8> {
        read(&self.path(iface))
    }

    fn write(&self, iface: &str, v: u8) -> io::Result<()> {
        std::fs::write(self.path(iface), format!("{v}\n"))
    }

    /// Sets `conf.<iface>.rp_filter` to 0 if it is not. Returns the previous value if it
    /// changed it.
    pub fn disable_on(&self, iface: &str) -> io::Result<Option<u8>> {
        let v = self.read(iface)?;
        if v == 0 {
            return Ok(None);
        }
        self.write(iface, 0)?;
        Ok(Some(v))
    }

    /// Checks `conf.all.rp_filter`; with `fix_all`, turns strict into 0.
    pub fn check_all(&self) -> io::Result<RpFilterStatus> {
        let v = self.read("all")?;
        let mut st = RpFilterStatus { all: Some(v), ..Default::default() };
        if v == STRICT && self.fix_all {
            self.write("all", 0)?;
            st.all = Some(self.read("all")?);
            st.all_fixed_from = Some(v);
        }
        if st.all == Some(STRICT) {
            st.warning = Some(format!(
                "net.ipv4.conf.all.rp_filter is 1 (strict): the node drops every reply the datapath reverse-NATs, \
                 so ClusterIP connections time out; set it to 0 or 2, or run with --fix-rp-filter (see {}/all/rp_filter)",
                self.conf_dir.display()
            ));
        }
        Ok(st)
    }
}

fn read(path: &Path) -> io::Result<u8> {
    let s = std::fs::read_to_string(path)?;
    s.trim().parse().map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("{}: {s:?}: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    struct TempDir(PathBuf);
    impl TempDir {
        fn path(&self) -> &Path {
            &self.0
        }
    }
    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// A fake `conf` directory: (interface, rp_filter).
    fn conf(values: &[(&str, u8)]) -> TempDir {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = TempDir(std::env::temp_dir().join(format!(
            "lb-rpfilter-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        )));
        for (iface, v) in values {
            std::fs::create_dir_all(dir.path().join(iface)).unwrap();
            std::fs::write(dir.path().join(iface).join("rp_filter"), format!("{v}\n")).unwrap();
        }
        dir
    }

    #[test]
    fn disables_per_interface() {
        let d = conf(&[("all", 0), ("veth1", 1), ("veth2", 0), ("eth0.100", 2)]);
        let rp = RpFilter::new(d.path(), false);
        assert_eq!(rp.disable_on("veth1").unwrap(), Some(1));
        assert_eq!(rp.disable_on("veth2").unwrap(), None);
        assert_eq!(rp.disable_on("eth0.100").unwrap(), Some(2));
        assert_eq!((rp.read("veth1").unwrap(), rp.read("eth0.100").unwrap()), (0, 0));
        assert!(rp.disable_on("gone").is_err());
    }

    #[test]
    fn strict_all_is_fixed_or_warned() {
        let d = conf(&[("all", 1)]);
        let st = RpFilter::new(d.path(), false).check_all().unwrap();
        assert_eq!((st.all, st.all_fixed_from), (Some(1), None));
        assert!(st.warning.as_deref().is_some_and(|w| w.contains("strict")));

        let st = RpFilter::new(d.path(), true).check_all().unwrap();
        assert_eq!(st, RpFilterStatus { all: Some(0), all_fixed_from: Some(1), ..Default::default() });

        // Loose and off are left alone.
        for v in [0, 2] {
            let d = conf(&[("all", v)]);
            let st = RpFilter::new(d.path(), true).check_all().unwrap();
            assert_eq!(st, RpFilterStatus { all: Some(v), ..Default::default() });
        }
    }
}
