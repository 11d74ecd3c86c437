//! `cargo xtask image`: the sandbox's container images, built here with no registry and no
//! Docker daemon, as one-layer `docker save` archives that `ctr images import` takes.
//!
//! * `k8s.gcr.io/pause:3.2`: the pod sandbox, `build/pause/linux/pause.c` of the same tree.
//! * `k8s.gcr.io/e2e-test-images/agnhost:2.21`: the tag `e2e.test` 1.20.2 asks for
//!   (test/utils/image/manifest.go), with the userland its tests exec (`sh`, `nc`, `curl`).
//! * [`CLIENT_IMAGE`]: a shell, curl and nc, idling; what the demo and our e2e tests exec into.
//! * [`APP_IMAGE`]: the seed application, answering `You've hit <pod name>` on port 8080.
//! * [`DNS_IMAGE`]: the sandbox's cluster DNS (`lb-sandbox-dns`).
//! * [`KUBE_PROXY_IMAGE`]: kube-proxy 1.20.2 with iptables (nft backend), ipset and conntrack.
//! * `lb-agent:<version>`: the `lb` binary and the libraries it links, nothing else.
//!
//! Dynamic binaries carry the shared objects `ldd` names for them (Debian's, from this
//! machine). Files get a fixed mtime so an unchanged input gives an unchanged image.

use std::{
    collections::BTreeSet,
    fs,
    io::Write as _,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};
use sha2::{Digest as _, Sha256};

pub const PAUSE_IMAGE: &str = "k8s.gcr.io/pause:3.2";
pub const AGNHOST_IMAGE: &str = "k8s.gcr.io/e2e-test-images/agnhost:2.21";
pub const CLIENT_IMAGE: &str = "lb-sandbox/client:v1";
pub const APP_IMAGE: &str = "lb-sandbox/mynapp:v1";
pub const DNS_IMAGE: &str = "lb-sandbox/dns:v1";
pub const KUBE_PROXY_IMAGE: &str = "k8s.gcr.io/kube-proxy:v1.20.2";
/// `bench peers`' servers and client: lb-bench-tool and Debian's iperf3.
pub const BENCH_IMAGE: &str = "lb-sandbox/bench:v1";

/// The agent image's tag, as deploy/lb-agent.yaml names it.
pub fn lb_agent_image() -> String {
    format!("lb-agent:{}", env!("CARGO_PKG_VERSION"))
}

const MTIME: u64 = 1_600_000_000;

/// One entry of an image's single layer.
enum Entry {
    /// A file copied from this machine (symlinks followed).
    File {
        src: PathBuf,
        dest: String,
        mode: u32,
    },
    /// A file with the given contents.
    Data {
        dest: String,
        data: Vec<u8>,
        mode: u32,
    },
    Dir {
        dest: String,
        mode: u32,
    },
    Link {
        target: String,
        dest: String,
    },
}

/// An image under construction.
pub struct Image {
    tag: String,
    entrypoint: Vec<String>,
    cmd: Vec<String>,
    entries: Vec<Entry>,
    dests: BTreeSet<String>,
}

impl Image {
    pub fn new(tag: &str, entrypoint: &[&str], cmd: &[&str]) -> Image {
        let mut i = Image {
            tag: tag.into(),
            entrypoint: entrypoint.iter().map(|s| s.to_string()).collect(),
            cmd: cmd.iter().map(|s| s.to_string()).collect(),
            entries: vec![],
            dests: BTreeSet::new(),
        };
        // What the kubelet and runc expect to find or bind over.
        for d in ["etc", "dev", "proc", "sys", "root", "var/run", "run"] {
            i.dir(d, 0o755);
        }
        i.dir("tmp", 0o1777);
        i.data("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n", 0o644);
        i.data("etc/group", b"root:x:0:\nnogroup:x:65534:\n", 0o644);
        i
    }

    fn claim(&mut self, dest: &str) -> Option<String> {
        let d = dest.trim_start_matches('/').to_owned();
        self.dests.insert(d.clone()).then_some(d)
    }

    pub fn file(&mut self, src: impl AsRef<Path>, dest: &str, mode: u32) -> &mut Self {
        if let Some(dest) = self.claim(dest) {
            self.entries.push(Entry::File { src: src.as_ref().to_owned(), dest, mode });
        }
        self
    }

    pub fn data(&mut self, dest: &str, data: &[u8], mode: u32) -> &mut Self {
        if let Some(dest) = self.claim(dest) {
            self.entries.push(Entry::Data { dest, data: data.to_vec(), mode });
        }
        self
    }

    pub fn dir(&mut self, dest: &str, mode: u32) -> &mut Self {
        if let Some(dest) = self.claim(dest) {
            self.entries.push(Entry::Dir { dest, mode });
        }
        self
    }

    pub fn link(&mut self, target: &str, dest: &str) -> &mut Self {
        if let Some(dest) = self.claim(dest) {
            self.entries.push(Entry::Link { target: target.into(), dest });
        }
        self
    }

    /// A dynamically linked binary at `dest`, with every shared object `ldd` lists for it
    /// at the path the loader looks for it.
    pub fn binary(&mut self, src: impl AsRef<Path>, dest: &str) -> Result<&mut Self> {
        let src = src.as_ref();
        for lib in shared_libs(src)? {
            self.file(&lib, &lib.display().to_string(), 0o755);
        }
        Ok(self.file(src, dest, 0o755))
    }

    /// busybox (static) with its applets linked in /bin, dash as /bin/sh (busybox's own sh
    /// runs its limited built-in `nc`), Debian's nc.openbsd and curl: the userland the
    /// upstream tests' `kubectl exec` commands expect of agnhost.
    pub fn userland(&mut self) -> Result<&mut Self> {
        self.binary("/bin/dash", "/bin/sh")?;
        self.binary("/usr/bin/nc.openbsd", "/bin/nc")?;
        self.binary("/usr/bin/curl", "/usr/bin/curl")?;
        // Debian's busybox-static `wget -T` segfaults: a curl wrapper for what tests use.
        self.data("bin/wget", WGET.as_bytes(), 0o755);
        self.file("/bin/busybox", "/bin/busybox", 0o755);
        let out = Command::new("/bin/busybox").arg("--list").output().context("running busybox --list")?;
        for app in String::from_utf8_lossy(&out.stdout).lines() {
            if !app.is_empty() && app != "busybox" {
                self.link("/bin/busybox", &format!("/bin/{app}"));
            }
        }
        self.link("/bin/nc", "/usr/bin/nc");
        self.link("/bin/sh", "/bin/bash");
        Ok(self)
    }

    /// Writes the image as a `docker save` archive (one layer) to `out`.
    pub fn write(&self, out: &Path) -> Result<()> {
        let layer = self.layer().with_context(|| format!("building the layer of {}", self.tag))?;
        let layer_sha = hex(&Sha256::digest(&layer));
        let config = serde_json::json!({
            "architecture": "amd64", "os": "linux", "created": "2020-09-13T12:26:40Z",
            "config": {
                "Entrypoint": self.entrypoint,
                "Cmd": if self.cmd.is_empty() { serde_json::Value::Null } else { self.cmd.clone().into() },
                "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
                "WorkingDir": "/",
            },
            "rootfs": {"type": "layers", "diff_ids": [format!("sha256:{layer_sha}")]},
            "history": [{"created": "2020-09-13T12:26:40Z", "created_by": "cargo xtask image"}],
        });
        let config = serde_json::to_vec(&config)?;
        let config_sha = hex(&Sha256::digest(&config));
        let manifest = serde_json::to_vec(&serde_json::json!([{
            "Config": format!("{config_sha}.json"),
            "RepoTags": [self.tag],
            "Layers": [format!("{layer_sha}/layer.tar")],
        }]))?;
        let tmp = out.with_extension("tmp");
        let mut t = tar::Builder::new(fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?);
        for (name, data) in [
            (format!("{layer_sha}/layer.tar"), &layer),
            (format!("{config_sha}.json"), &config),
            ("manifest.json".into(), &manifest),
        ] {
            let mut h = header(tar::EntryType::Regular, 0o644, data.len() as u64);
            t.append_data(&mut h, name, data.as_slice())?;
        }
        t.into_inner()?.flush()?;
        fs::rename(&tmp, out)?;
        Ok(())
    }

    fn layer(&self) -> Result<Vec<u8>> {
        let mut t = tar::Builder::new(Vec::new());
        let mut dirs = BTreeSet::new();
        let mut parents = |t: &mut tar::Builder<Vec<u8>>, dest: &str| -> Result<()> {
            let parts: Vec<&str> = dest.split('/').collect();
            for i in 1..parts.len() {
                let d = parts[..i].join("/");
                if !self.dests.contains(&d) && dirs.insert(d.clone()) {
                    let mut h = header(tar::EntryType::Directory, 0o755, 0);
                    t.append_data(&mut h, format!("{d}/"), std::io::empty())?;
                }
            }
            Ok(())
        };
        // Directories first, so that explicit modes (tmp's sticky bit) are what lands.
        for e in &self.entries {
            if let Entry::Dir { dest, mode } = e {
                parents(&mut t, dest)?;
                let mut h = header(tar::EntryType::Directory, *mode, 0);
                t.append_data(&mut h, format!("{dest}/"), std::io::empty())?;
            }
        }
        for e in &self.entries {
            match e {
                Entry::File { src, dest, mode } => {
                    parents(&mut t, dest)?;
                    let data = fs::read(src).with_context(|| format!("reading {} for the image", src.display()))?;
                    let mut h = header(tar::EntryType::Regular, *mode, data.len() as u64);
                    t.append_data(&mut h, dest, data.as_slice())?;
                }
                Entry::Data { dest, data, mode } => {
                    parents(&mut t, dest)?;
                    let mut h = header(tar::EntryType::Regular, *mode, data.len() as u64);
                    t.append_data(&mut h, dest, data.as_slice())?;
                }
                Entry::Link { target, dest } => {
                    parents(&mut t, dest)?;
                    let mut h = header(tar::EntryType::Symlink, 0o777, 0);
                    t.append_link(&mut h, dest, target)?;
                }
                Entry::Dir { .. } => {}
            }
        }
        Ok(t.into_inner()?)
    }
}

/// A wget for `wget -q -T SECS -O - URL` and `wget -qO- URL`, on curl.
const WGET: &str = r#"#!/bin/sh
# wget stand-in (Debian's busybox-static wget -T segfaults): the options tests use, on curl.
t=10; o=-
while [ $# -gt 1 ]; do
  case "$1" in
    -T) t=$2; shift 2 ;; -T*) t=${1#-T}; shift ;;
    -O) o=$2; shift 2 ;; -qO-|-O-) o=-; shift ;;
    *) shift ;;
  esac
done
exec curl -sSf --max-time "$t" -o "$o" "$1"
"#;

fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_size(size);
    h.set_mtime(MTIME);
    h.set_uid(0);
    h.set_gid(0);
    h
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The shared objects (with the ELF interpreter) `ldd` lists for `bin`; none for a static one.
pub fn shared_libs(bin: &Path) -> Result<Vec<PathBuf>> {
    let out = Command::new("ldd").arg(bin).output().context("running ldd (libc-bin)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if text.contains("not a dynamic executable") || String::from_utf8_lossy(&out.stderr).contains("not a dynamic") {
        return Ok(vec![]);
    }
    if !out.status.success() {
        bail!("ldd {} failed: {}", bin.display(), String::from_utf8_lossy(&out.stderr).trim());
    }
    let mut libs = vec![];
    for l in text.lines() {
        if l.contains("not found") {
            bail!("{}: a shared library is missing on this machine: {}", bin.display(), l.trim());
        }
        if let Some(p) = l.split_whitespace().find(|w| w.starts_with('/')) {
            libs.push(PathBuf::from(p));
        }
    }
    Ok(libs)
}

/// Inputs of the images that are not Debian packages.
pub struct Inputs {
    /// The Kubernetes binary cache (pause, agnhost, kube-proxy, agnhost-files/).
    pub kube_bin: PathBuf,
    /// The release `lb` binary.
    pub lb: PathBuf,
    /// The `lb-sandbox-dns` binary.
    pub dns: PathBuf,
    /// The `lb-bench-tool` binary.
    pub bench: PathBuf,
}

/// Writes every image into `dir`; returns (tag, archive) pairs.
pub fn build_all(inp: &Inputs, dir: &Path) -> Result<Vec<(String, PathBuf)>> {
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let k = &inp.kube_bin;
    let mut images = vec![];

    let mut pause = Image::new(PAUSE_IMAGE, &["/pause"], &[]);
    pause.file(k.join("pause"), "/pause", 0o755);
    images.push(("pause", pause));

    let mut agnhost = Image::new(AGNHOST_IMAGE, &["/agnhost"], &["pause"]);
    agnhost.file(k.join("agnhost"), "/agnhost", 0o755).link("agnhost", "/agnhost-2").dir("uploads", 0o755);
    agnhost.file(k.join("agnhost-files/localhost.crt"), "/localhost.crt", 0o644);
    agnhost.file(k.join("agnhost-files/localhost.key"), "/localhost.key", 0o600);
    agnhost.userland()?;
    images.push(("agnhost", agnhost));

    let mut client = Image::new(CLIENT_IMAGE, &["/bin/sleep"], &["2147483647"]);
    client.userland()?;
    images.push(("client", client));

    // The seed's application: one static page naming the pod, served by busybox httpd.
    let mut app = Image::new(
        APP_IMAGE,
        &["/bin/sh", "-c"],
        &[
            "mkdir -p /tmp/www && echo \"You've hit $(hostname)\" > /tmp/www/index.html && exec httpd -f -p 8080 -h /tmp/www",
        ],
    );
    app.userland()?;
    images.push(("mynapp", app));

    let mut dns = Image::new(DNS_IMAGE, &["/lb-sandbox-dns"], &[]);
    dns.binary(&inp.dns, "/lb-sandbox-dns")?;
    images.push(("dns", dns));

    let mut kp = Image::new(KUBE_PROXY_IMAGE, &["/usr/local/bin/kube-proxy"], &[]);
    kp.file(k.join("kube-proxy"), "/usr/local/bin/kube-proxy", 0o755);
    kp.binary("/usr/sbin/xtables-nft-multi", "/usr/sbin/xtables-nft-multi")?;
    for t in ["iptables", "iptables-save", "iptables-restore", "ip6tables", "ip6tables-save", "ip6tables-restore"] {
        kp.link("xtables-nft-multi", &format!("/usr/sbin/{t}"));
    }
    kp.binary("/usr/sbin/conntrack", "/usr/sbin/conntrack")?;
    if Path::new("/usr/sbin/ipset").exists() {
        kp.binary("/usr/sbin/ipset", "/usr/sbin/ipset")?;
    }
    kp.file("/bin/busybox", "/bin/busybox", 0o755).link("/bin/busybox", "/bin/sh");
    // iptables-nft loads its extensions from here, and they link libraries of their own
    // (libxt_statistic needs libm: without it kube-proxy's iptables-restore fails).
    for e in fs::read_dir("/usr/lib/x86_64-linux-gnu/xtables").into_iter().flatten().flatten() {
        let p = e.path();
        kp.binary(&p, &p.display().to_string())?;
    }
    images.push(("kube-proxy", kp));

    let mut bench = Image::new(BENCH_IMAGE, &["/bin/sleep"], &["2147483647"]);
    bench.userland()?;
    bench.binary(&inp.bench, "/usr/local/bin/lb-bench-tool")?;
    bench.binary("/usr/bin/iperf3", "/usr/bin/iperf3")?;
    images.push(("bench", bench));

    let tag = lb_agent_image();
    let mut agent = Image::new(&tag, &["/usr/local/bin/lb"], &[]);
    agent.binary(&inp.lb, "/usr/local/bin/lb")?;
    images.push(("lb-agent", agent));

    let mut out = vec![];
    for (name, img) in images {
        let path = dir.join(format!("{name}.tar"));
        img.write(&path)?;
        out.push((img.tag.clone(), path));
    }
    Ok(out)
}

/// `ctr images import` of every archive into `node`'s containerd (namespace k8s.io, the
/// CRI's), run inside the node's mount and network namespaces.
pub fn import(node: &super::node::Node, archives: &[(String, PathBuf)]) -> Result<()> {
    for (tag, path) in archives {
        let out = node
            .nsenter()
            .args(["ctr", "-n", "k8s.io", "--address"])
            .arg(node.containerd_sock())
            .args(["images", "import"])
            .arg(path)
            .output()
            .context("running ctr (containerd)")?;
        if !out.status.success() {
            bail!(
                "importing {tag} into {}'s containerd failed: {}",
                node.name,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
    }
    Ok(())
}

/// `cargo xtask image`: builds every image into target/images and imports them into each
/// running sandbox node (`kubectl rollout restart` then picks up a new lb-agent image).
pub fn run() -> Result<()> {
    super::require_root()?;
    let bins = crate::kube::ensure_built()?;
    let super::Binaries { lb, dns, bench } = super::build_binaries()?;
    let dir = super::target_dir()?.join("images");
    let images = build_all(&Inputs { kube_bin: bins.dir, lb, dns, bench }, &dir)?;
    for (tag, path) in &images {
        let size = fs::metadata(path).map(|m| m.len()).unwrap_or(0);
        println!("{tag:45} {:>6.1} MB  {}", size as f64 / 1e6, path.display());
    }
    match super::Sandbox::open() {
        Ok(sb) => {
            for i in 1..=sb.nodes {
                let n = super::node::Node::new(i);
                import(&n, &images)?;
                println!("imported into {}", n.name);
            }
        }
        Err(_) => println!("no sandbox is up: nothing imported (`cargo xtask sandbox up` imports them)"),
    }
    Ok(())
}
