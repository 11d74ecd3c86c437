//! One real node of the sandbox: a network namespace plus a persistent mount namespace, in
//! which containerd (with runc and the CNI plugins, from Debian) and kubelet 1.20.2 run.
//!
//! Follows `shared/recipes/real-node/README.md`, each of whose workarounds is here:
//! - containerd's CRI with `restrict_oom_score_adj` (this machine has no CAP_SYS_RESOURCE)
//!   and `netns_mounts_under_state_dir`;
//! - private `/var/lib` (kubelet 1.20 hard-codes `/var/lib/kubelet/device-plugins`, libcni
//!   caches in `/var/lib/cni`), `/var/log` (`/var/log/pods`), `/run` (runc's and the
//!   shims' state), and a bpffs at `/sys/fs/bpf`, all inside the node's mount namespace;
//! - the host-wide sysctls the kubelet insists on (`setupKernelTunables`), as files holding
//!   the wanted values bind-mounted over `/proc/sys/...` in the node's mount namespace only;
//! - cgroup v1 without systemd: `--cgroup-driver=cgroupfs --cgroup-root=/lbsb/node<i>`, that
//!   directory made in every hierarchy (cpuset's cpus and mems copied down), and in the
//!   cgroup2 hierarchy too, where containerd and the kubelet are placed so that a node's
//!   processes (its pods included, runc follows) form one cgroup-v2 subtree. A host-network
//!   client started from outside ([`Node::host_cmd`]) joins it too, before it execs.
//!
//! Nothing here touches the machine's own mounts: the mount namespace starts as a private
//! copy and dies with its last process and its bind-mounted handle.

use std::{
    fs,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{Context as _, Result, bail};

use super::{CGROUP_ROOT, CLUSTER_DNS, NS_DIR, STATE_DIR, pid_alive, run_ok, spawn_detached, wait_for};

/// [`Node::host_cmd`]'s exit status when the process could not join the node's cgroup.
pub const JOIN_FAILED: i32 = 125;

/// The sysctls kubelet 1.20's `setupKernelTunables` sets host-wide, with its values.
const KERNEL_TUNABLES: [(&str, &str); 6] = [
    ("vm/overcommit_memory", "1"),
    ("vm/panic_on_oom", "0"),
    ("kernel/panic", "10"),
    ("kernel/panic_on_oops", "1"),
    ("kernel/keys/root_maxkeys", "1000000"),
    ("kernel/keys/root_maxbytes", "25000000"),
];

#[derive(Debug, Clone)]
pub struct Node {
    pub index: u8,
    /// Node name, network namespace name and cgroup leaf: `lbsb-node<i>`.
    pub name: String,
    pub ip: Ipv4Addr,
    /// STATE_DIR/lbsb-node<i>: configs, logs, containerd root and state, the private /var/lib.
    pub dir: PathBuf,
}

impl Node {
    pub fn new(index: u8) -> Node {
        let name = format!("{}node{index}", super::PREFIX);
        Node { index, ip: Ipv4Addr::new(10, 250, 0, 10 + index), dir: Path::new(STATE_DIR).join(&name), name }
    }

    pub fn pod_cidr(&self) -> String {
        format!("10.244.{}.0/24", self.index)
    }

    /// The bind-mounted handle of the node's mount namespace.
    pub fn mnt(&self) -> PathBuf {
        Path::new(NS_DIR).join(format!("mnt-{}", self.name))
    }

    pub fn containerd_sock(&self) -> PathBuf {
        self.dir.join("containerd.sock")
    }

    /// `nsenter` into the node's mount and network namespaces. The process stays in the
    /// caller's cgroup (this machine's root one), outside the node's subtree: fine for
    /// tools that manage the node (`ip`, `conntrack`, `lb cleanup`), but socket-level load
    /// balancing never sees it. A host-network client of the node is [`Node::host_cmd`].
    pub fn nsenter(&self) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--mount={}", self.mnt().display())).arg(format!("--net=/run/netns/{}", self.name));
        c
    }

    /// The node's cgroup2 cgroup, `<cgroup2 mount>/lbsb/lbsb-node<i>` (this machine:
    /// `/sys/fs/cgroup/unified/lbsb/lbsb-node<i>`): its containerd, kubelet and so every pod
    /// of it live below it, and the agent attaches socket-level load balancing there.
    /// `None` without a cgroup2 mount.
    pub fn cgroup2(&self) -> Option<PathBuf> {
        cgroup_hierarchies().into_iter().find(|h| is_cgroup2(h)).map(|h| h.join(CGROUP_ROOT).join(&self.name))
    }

    /// A command that runs as a host-network process of the node, as a node's own daemon
    /// or a hostNetwork pod does: in its mount and network namespaces ([`Node::nsenter`])
    /// *and* in its cgroup2 cgroup, which the process joins before it execs the program,
    /// so its first socket is already under the agent's socket-LB programs. Append the
    /// program and its arguments. The machine's proxy variables are not passed on.
    pub fn host_cmd(&self) -> Result<Command> {
        let procs = self
            .cgroup2()
            .map(|d| d.join("cgroup.procs"))
            .filter(|p| p.exists())
            .with_context(|| format!("{} has no cgroup2 cgroup (is the sandbox up?)", self.name))?;
        // `$0` is the cgroup.procs file; `$@` the nsenter command line and the program.
        // Exit status [`JOIN_FAILED`] if the cgroup cannot be joined.
        let mut c = Command::new("sh");
        c.arg("-c").arg(format!("echo $$ > \"$0\" || exit {JOIN_FAILED}; exec \"$@\"")).arg(procs);
        let ns = self.nsenter();
        c.arg(ns.get_program()).args(ns.get_args());
        for v in crate::kube::PROXY_VARS {
            c.env_remove(v);
        }
        Ok(c)
    }

    /// Writes configs, makes the mount namespace and cgroups, starts containerd, imports
    /// the images and starts the kubelet (which registers the node).
    pub fn start(&self, kubeconfig: &Path, kubelet: &Path, images: &[(String, PathBuf)]) -> Result<()> {
        self.write_configs()?;
        self.make_mount_ns()?;
        self.make_cgroups()?;
        let cfg = self.dir.join("containerd.toml");
        spawn_detached(
            &self.dir,
            "containerd",
            &mut self.nsenter(),
            Path::new("containerd"),
            &["--config".into(), cfg.display().to_string()],
        )?;
        self.join_cgroup("containerd")?;
        let sock = self.containerd_sock();
        wait_for(&format!("containerd on {} to listen", self.name), Duration::from_secs(30), || {
            if !pid_alive(&self.dir, "containerd", "containerd") {
                bail!("containerd on {} exited; see {}", self.name, self.dir.join("containerd.log").display());
            }
            Ok(sock.exists())
        })?;
        super::image::import(self, images)?;
        spawn_detached(&self.dir, "kubelet", &mut self.nsenter(), kubelet, &self.kubelet_args(kubeconfig))?;
        self.join_cgroup("kubelet")
    }

    fn kubelet_args(&self, kubeconfig: &Path) -> Vec<String> {
        let d = &self.dir;
        vec![
            format!("--kubeconfig={}", kubeconfig.display()),
            "--container-runtime=remote".into(),
            format!("--container-runtime-endpoint=unix://{}", self.containerd_sock().display()),
            "--runtime-request-timeout=5m".into(),
            "--cgroup-driver=cgroupfs".into(),
            format!("--cgroup-root=/{CGROUP_ROOT}/{}", self.name),
            "--fail-swap-on=false".into(),
            format!("--hostname-override={}", self.name),
            format!("--node-ip={}", self.ip),
            format!("--address={}", self.ip),
            "--read-only-port=0".into(),
            "--healthz-bind-address=127.0.0.1".into(),
            format!("--pod-infra-container-image={}", super::image::PAUSE_IMAGE),
            format!("--cluster-dns={CLUSTER_DNS}"),
            "--cluster-domain=cluster.local".into(),
            format!("--resolv-conf={}", d.join("resolv.conf").display()),
            format!("--volume-plugin-dir={}", d.join("volume-plugins").display()),
            // Images are imported, never pulled; a full disk must not make it delete them.
            "--image-gc-high-threshold=100".into(),
            "--eviction-hard=memory.available<100Mi".into(),
            "--v=1".into(),
        ]
    }

    fn write_configs(&self) -> Result<()> {
        let d = &self.dir;
        for sub in ["log", "varlib/kubelet", "varlib/cni", "containerd/root", "containerd/state", "containerd/opt"] {
            fs::create_dir_all(d.join(sub)).with_context(|| format!("creating {}", d.join(sub).display()))?;
        }
        fs::create_dir_all(d.join("cni-conf"))?;
        fs::create_dir_all(d.join("volume-plugins"))?;
        fs::create_dir_all(d.join("sysctl"))?;
        // The standard plugins: a bridge with the node as gateway, host-local addresses.
        fs::write(
            d.join("cni-conf/10-lbsb.conflist"),
            serde_json::to_string_pretty(&serde_json::json!({
                "cniVersion": "0.4.0", "name": "lbsb",
                "plugins": [{
                    "type": "bridge", "bridge": "cni0", "isGateway": true, "ipMasq": false, "hairpinMode": true,
                    "ipam": {"type": "host-local", "ranges": [[{"subnet": self.pod_cidr()}]],
                             "routes": [{"dst": "0.0.0.0/0"}], "dataDir": d.join("varlib/cni/networks")},
                }],
            }))?,
        )?;
        fs::write(
            d.join("containerd.toml"),
            format!(
                r#"version = 2
root = "{root}"
state = "{state}"
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs"]
[grpc]
  address = "{sock}"
[plugins."io.containerd.internal.v1.opt"]
  path = "{opt}"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{pause}"
  netns_mounts_under_state_dir = true
  restrict_oom_score_adj = true
  stream_server_address = "127.0.0.1"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{cni}"
"#,
                root = d.join("containerd/root").display(),
                state = d.join("containerd/state").display(),
                sock = self.containerd_sock().display(),
                opt = d.join("containerd/opt").display(),
                pause = super::image::PAUSE_IMAGE,
                cni = d.join("cni-conf").display(),
            ),
        )?;
        // Pods get the cluster DNS and search paths from the kubelet; the node itself has no
        // resolver (the sandbox has no outside network).
        fs::write(d.join("resolv.conf"), "# lb sandbox node: no upstream resolver\n")?;
        for (key, val) in KERNEL_TUNABLES {
            fs::write(d.join("sysctl").join(key.replace('/', "_")), format!("{val}\n"))?;
        }
        Ok(())
    }

    /// A persistent mount namespace, held by a bind mount of its nsfs file in [`NS_DIR`]
    /// (itself a private bind mount, as nsfs handles may not live on a shared mount).
    fn make_mount_ns(&self) -> Result<()> {
        fs::create_dir_all(NS_DIR)?;
        if !is_mountpoint(Path::new(NS_DIR)) {
            run_ok(Command::new("mount").args(["--bind", NS_DIR, NS_DIR]), "mount --bind (the ns handle dir)")?;
            run_ok(Command::new("mount").args(["--make-private", NS_DIR]), "mount --make-private")?;
        }
        fs::write(self.mnt(), "")?;
        let d = &self.dir;
        let mut script = format!(
            "set -e; mount --bind {log} /var/log; mount --bind {varlib} /var/lib; \
             mount -t tmpfs -o mode=755,size=256m lbsb-run /run; \
             mount -t bpf bpf /sys/fs/bpf; mount --make-shared /sys/fs/bpf; ",
            log = d.join("log").display(),
            varlib = d.join("varlib").display(),
        );
        for (key, _) in KERNEL_TUNABLES {
            script +=
                &format!("mount --bind {} /proc/sys/{key}; ", d.join("sysctl").join(key.replace('/', "_")).display());
        }
        run_ok(
            Command::new("unshare").arg(format!("--mount={}", self.mnt().display())).args([
                "--propagation",
                "private",
                "sh",
                "-c",
                &script,
            ]),
            &format!("making the mount namespace of {}", self.name),
        )
    }

    fn make_cgroups(&self) -> Result<()> {
        for h in cgroup_hierarchies() {
            for dir in [h.join(CGROUP_ROOT), h.join(CGROUP_ROOT).join(&self.name)] {
                fs::create_dir_all(&dir).with_context(|| format!("creating cgroup {}", dir.display()))?;
                // A cpuset cgroup takes no task until it has cpus and mems.
                if h.ends_with("cpuset") {
                    for f in ["cpuset.cpus", "cpuset.mems"] {
                        let parent = fs::read_to_string(dir.parent().unwrap_or(&h).join(f))?;
                        fs::write(dir.join(f), parent.trim())?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Moves the daemon `name` (by pid file) into the node's cgroup2 cgroup.
    fn join_cgroup(&self, name: &str) -> Result<()> {
        let Some(cg) = self.cgroup2() else { return Ok(()) };
        let pid = fs::read_to_string(self.dir.join(format!("{name}.pid")))?;
        let procs = cg.join("cgroup.procs");
        fs::write(&procs, pid.trim()).with_context(|| format!("moving {name} into {}", procs.display()))
    }
}

/// Every mounted cgroup hierarchy (v1 controllers, named ones, and cgroup2), from /proc/mounts.
pub fn cgroup_hierarchies() -> Vec<PathBuf> {
    let mounts = fs::read_to_string("/proc/mounts").unwrap_or_default();
    let mut v: Vec<PathBuf> = mounts
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() > 2 && (f[2] == "cgroup" || f[2] == "cgroup2")).then(|| PathBuf::from(f[1]))
        })
        .collect();
    v.sort();
    v.dedup();
    v
}

fn is_cgroup2(h: &Path) -> bool {
    h.join("cgroup.controllers").exists()
}

pub fn is_mountpoint(p: &Path) -> bool {
    let s = p.display().to_string();
    fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split_whitespace().nth(4) == Some(s.as_str()))
}

/// Every pid in the sandbox's cgroup subtree of any hierarchy (pods' processes included).
pub fn cgroup_pids() -> Vec<i32> {
    let mut pids = vec![];
    for h in cgroup_hierarchies() {
        walk(&h.join(CGROUP_ROOT), &mut |d| {
            if let Ok(s) = fs::read_to_string(d.join("cgroup.procs")) {
                pids.extend(s.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
            }
        });
    }
    pids.sort_unstable();
    pids.dedup();
    pids
}

/// Removes the sandbox's cgroup subtree in every hierarchy, deepest first.
pub fn remove_cgroups() -> Result<()> {
    for h in cgroup_hierarchies() {
        let root = h.join(CGROUP_ROOT);
        let mut dirs = vec![];
        walk(&root, &mut |d| dirs.push(d.to_owned()));
        dirs.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
        for d in dirs {
            if let Err(e) = fs::remove_dir(&d)
                && d.exists()
            {
                bail!("cannot remove cgroup {}: {e} (a process still in it?)", d.display());
            }
        }
    }
    Ok(())
}

fn walk(dir: &Path, f: &mut dyn FnMut(&Path)) {
    if !dir.is_dir() {
        return;
    }
    f(dir);
    for e in fs::read_dir(dir).into_iter().flatten().flatten() {
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            walk(&e.path(), f);
        }
    }
}
