//! `lb agent` refusing to start on bad flags and bad configuration (root needed): an
//! unknown flag, malformed values, an unreadable kubeconfig, a --metrics-addr that is
//! taken, a bpffs that cannot be prepared, pinned maps of another layout or size.
//! Each time: a non-zero exit, a message on stderr that names the fix, and the pinned
//! state of an earlier agent exactly as it was (same pins, same map ids, same contents
//! of every map the agent writes at start).
//!
//! Nothing is attached (no `--iface`); the one agent that needs a port runs in a
//! throw-away network namespace.

use std::{
    collections::BTreeMap,
    net::TcpListener,
    os::fd::{AsFd as _, AsRawFd as _},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use lb_testing::{PrivateBpffs, Scratch, agent::AgentProcess, netns::Netns, pin_foreign_hash_map};

fn lb() -> &'static str {
    env!("CARGO_BIN_EXE_lb")
}

const GOOD: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: default}\n\
spec: {clusterIP: 10.96.0.10, ports: [{name: http, port: 80}]}\n---\n\
apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: web-1, namespace: default, \
labels: {kubernetes.io/service-name: web}}\naddressType: IPv4\nports: [{name: http, port: 8080}]\n\
endpoints: [{addresses: [10.244.1.2]}, {addresses: [10.244.1.3]}]\n";

/// Every entry of a map (keys and values as bytes, sorted), read with raw
/// `BPF_MAP_GET_NEXT_KEY` and `BPF_MAP_LOOKUP_ELEM`: the tests compare maps of any
/// type without knowing their Rust types.
fn dump(info: &aya::maps::MapInfo) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
    // include/uapi/linux/bpf.h
    const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
    const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;
    let fd = info.fd().context("map fd")?;
    let fd = fd.as_fd().as_raw_fd() as u32;
    let (ks, vs) = (info.key_size() as usize, info.value_size() as usize);
    // Per-CPU maps return one (8-byte aligned) value per possible CPU.
    let vbuf = vs.next_multiple_of(8) * 1024;
    let bpf = |cmd: libc::c_long, attr: &mut [u64; 4]| -> std::io::Result<()> {
        // SAFETY: `attr` is a zero-padded bpf_attr for `cmd`, its pointers point at
        // buffers of the map's key size and at least its value size, alive for the
        // call.
        let r = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), std::mem::size_of_val(attr)) };
        if r < 0 { Err(std::io::Error::last_os_error()) } else { Ok(()) }
    };
    let mut out = Vec::new();
    let mut key: Option<Vec<u8>> = None;
    loop {
        let mut next = vec![0u8; ks];
        let kp = key.as_ref().map_or(0, |k| k.as_ptr() as u64);
        let mut attr = [fd as u64, kp, next.as_mut_ptr() as u64, 0];
        match bpf(BPF_MAP_GET_NEXT_KEY, &mut attr) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => break,
            Err(e) => return Err(e).context("BPF_MAP_GET_NEXT_KEY"),
        }
        let mut value = vec![0u8; vbuf];
        let mut attr = [fd as u64, next.as_ptr() as u64, value.as_mut_ptr() as u64, 0];
        bpf(BPF_MAP_LOOKUP_ELEM, &mut attr).context("BPF_MAP_LOOKUP_ELEM")?;
        out.push((next.clone(), value));
        key = Some(next);
    }
    out.sort();
    Ok(out)
}

/// What a bpffs holds: each pin's name, and for maps their id, size and, but for
/// large arrays (the lookup tables and counters, which only a sync or packets
/// change), every entry.
#[derive(Debug, PartialEq, Eq)]
enum Pin {
    Map { id: u32, max_entries: u32, entries: Option<Vec<(Vec<u8>, Vec<u8>)>> },
    Other,
}

fn fingerprint(bpffs: &Path) -> Result<BTreeMap<String, Pin>> {
    let mut out = BTreeMap::new();
    for e in std::fs::read_dir(bpffs).with_context(|| format!("listing {}", bpffs.display()))? {
        let e = e?;
        let name = e.file_name().to_string_lossy().into_owned();
        let pin = match aya::maps::MapInfo::from_pin(e.path()) {
            Ok(info) => {
                let array = matches!(info.map_type(), Ok(aya::maps::MapType::Array | aya::maps::MapType::PerCpuArray));
                let entries =
                    (!array || info.max_entries() <= 64).then(|| dump(&info)).transpose().context(name.clone())?;
                Pin::Map { id: info.id(), max_entries: info.max_entries(), entries }
            }
            Err(_) => Pin::Other,
        };
        out.insert(name, pin);
    }
    Ok(out)
}

/// Runs `lb ARGS` (with `--bpffs` and `--status-file` as given by `env`) to its end,
/// at most 30 s; returns its exit code and stderr.
fn run_lb(mut cmd: Command) -> Result<(i32, String)> {
    let mut child = cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped()).spawn()?;
    let t0 = Instant::now();
    loop {
        if let Some(st) = child.try_wait()? {
            let mut err = String::new();
            std::io::Read::read_to_string(&mut child.stderr.take().context("stderr")?, &mut err)?;
            return Ok((st.code().unwrap_or(-1), err));
        }
        if t0.elapsed() > Duration::from_secs(30) {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{cmd:?} still running after 30 s: a bad configuration should end it");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn lb_cmd(bpffs: &Path, status: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(lb());
    c.args(args).env("LB_BPFFS", bpffs).env("LB_STATUS_FILE", status).env("LB_LOG", "info");
    c
}

/// `cmd` fails (non-zero), its stderr contains every one of `needles`, and `bpffs`
/// is as `before`.
fn refused(what: &str, cmd: Command, needles: &[&str], bpffs: &Path, before: &BTreeMap<String, Pin>) -> Result<()> {
    let (code, err) = run_lb(cmd).with_context(|| what.to_string())?;
    ensure!(code != 0, "{what}: exit code 0; stderr:\n{err}");
    for n in needles {
        ensure!(err.contains(n), "{what}: stderr should contain {n:?}:\n{err}");
    }
    ensure!(!err.contains("panicked"), "{what}: a panic:\n{err}");
    let after = fingerprint(bpffs)?;
    ensure!(&after == before, "{what}: the pinned state changed:\nbefore {before:#?}\nafter {after:#?}");
    eprintln!("{what}: exit {code}, {}", err.lines().find(|l| !l.trim().is_empty()).unwrap_or_default());
    Ok(())
}

#[test]
fn bad_flags_and_configuration_are_refused_and_change_nothing() -> Result<()> {
    let dir = Scratch::new("refusals")?;
    let objects = dir.path("objects.yaml");
    std::fs::write(&objects, GOOD)?;
    let source = format!("file:{}", objects.display());

    // An earlier agent's pinned state, left as a SIGTERM leaves it.
    let bpffs = PrivateBpffs::new()?;
    let status = dir.path("status.json");
    let mut first = AgentProcess::spawn(
        lb_cmd(bpffs.path(), &status, &["agent", "--source", &source]),
        &dir.path("first.log"),
        &status,
    )?;
    first.wait_status("initial sync", Duration::from_secs(30), |s| s.ready && s.frontends == 1)?;
    first.term()?;
    let before = fingerprint(bpffs.path())?;
    ensure!(before.values().filter(|p| matches!(p, Pin::Map { .. })).count() >= 10, "{before:#?}");
    let services = lb_testing::backend_sets(bpffs.path());
    ensure!(services.len() == 1 && services[0].1.len() == 2, "{services:?}");

    let bad_kubeconfig = dir.path("kubeconfig");
    std::fs::write(&bad_kubeconfig, "apiVersion: v1\nclusters: {not: [a, list\n")?;
    let bad_kubeconfig = bad_kubeconfig.display().to_string();
    let empty_kubeconfig = dir.path("empty-kubeconfig");
    std::fs::write(&empty_kubeconfig, "apiVersion: v1\nkind: Config\n")?;
    let empty_kubeconfig = empty_kubeconfig.display().to_string();
    let missing = dir.path("no-such-kubeconfig").display().to_string();
    let (b, s) = (bpffs.path(), status.as_path());
    let size_msg = format!("has {} entries but 4096 are asked for", lb_common::limits::CONNTRACK);
    let cases: &[(&str, &[&str], &[&str])] = &[
        ("unknown flag", &["agent", "--no-such-flag"], &["--no-such-flag", "--help"]),
        ("unknown subcommand", &["agnet"], &["agnet", "--help"]),
        ("bad duration", &["agent", "--debounce", "5"], &["--debounce", "5ms"]),
        ("negative duration", &["agent", "--max-delay=-1s"], &["--max-delay", "negative"]),
        ("bad on/off", &["agent", "--socket-lb", "maybe"], &["--socket-lb", "expected on or off"]),
        ("bad bool", &["agent", "--fix-rp-filter=yes"], &["--fix-rp-filter", "true"]),
        ("max out of range", &["agent", "--max-services", "3"], &["--max-services", "16.."]),
        ("max not a number", &["agent", "--max-conntrack", "lots"], &["--max-conntrack", "invalid digit"]),
        ("max too large", &["agent", "--max-backends", "4294967296"], &["--max-backends"]),
        ("bad source", &["agent", "--source", "ftp://x"], &["--source", "file:PATH"]),
        ("bad metrics address", &["agent", "--metrics-addr", "localhost"], &["--metrics-addr"]),
        ("bad pod attach", &["agent", "--pod-attach", "ebpf"], &["--pod-attach", "xdp, xdp-generic or tc"]),
        ("xdp on pods", &["agent", "--source", &source, "--pod-attach", "xdp"], &["--allow-xdp-on-pods"]),
        ("bad log filter", &["--log", "lb_userspace=[", "agent"], &["--log", "try"]),
        (
            "missing kubeconfig",
            &["agent", "--source", "kubernetes", "--kubeconfig", &missing],
            &["--kubeconfig", "no-such-kubeconfig"],
        ),
        (
            "garbage kubeconfig",
            &["agent", "--source", "kubernetes", "--kubeconfig", &bad_kubeconfig],
            &["--kubeconfig", "cannot read kubeconfig"],
        ),
        (
            "kubeconfig without a cluster",
            &["agent", "--source", "kubernetes", "--kubeconfig", &empty_kubeconfig],
            &["--kubeconfig"],
        ),
        (
            "pinned maps of another size",
            &["agent", "--source", &source, "--max-conntrack", "4096"],
            &[size_msg.as_str(), "lb cleanup"],
        ),
    ];
    for (what, args, needles) in cases {
        refused(what, lb_cmd(b, s, args), needles, b, &before)?;
    }
    // On a node without pinned state, the configuration errors create none: they are
    // found before the datapath is loaded (an adopting agent would also attach, and
    // detach an earlier socket LB, before it got to them).
    let fresh = PrivateBpffs::new()?;
    let fresh_before = fingerprint(fresh.path())?;
    ensure!(!fresh_before.values().any(|p| matches!(p, Pin::Map { .. })), "{fresh_before:?}");
    for (what, args, needles) in cases.iter().filter(|(w, _, _)| w.contains("kubeconfig")) {
        let what = format!("{what}, fresh bpffs");
        refused(&what, lb_cmd(fresh.path(), s, args), needles, fresh.path(), &fresh_before)?;
    }

    // A --metrics-addr that is taken: refused before the datapath is opened. In a
    // namespace of our own, whose loopback is the test's.
    let ns = Netns::create(format!("lbt-{}-cli", std::process::id()))?;
    ns.ip(&["link", "set", "lo", "up"])?;
    let taken: TcpListener = ns.run(|| Ok(TcpListener::bind("127.0.0.1:0")?))?;
    let addr = taken.local_addr()?.to_string();
    let mut cmd = ns.command_net_only(lb());
    cmd.args(["agent", "--source", &source, "--metrics-addr", &addr])
        .env("LB_BPFFS", b)
        .env("LB_STATUS_FILE", s)
        .env("LB_LOG", "info");
    refused("metrics address taken", cmd, &["--metrics-addr", "is another agent running?"], b, &before)?;
    let mut cmd = ns.command_net_only(lb());
    cmd.args(["agent", "--source", &source, "--metrics-addr", &addr])
        .env("LB_BPFFS", fresh.path())
        .env("LB_STATUS_FILE", s)
        .env("LB_LOG", "info");
    let needles = ["--metrics-addr", "is another agent running?"];
    refused("metrics address taken, fresh bpffs", cmd, &needles, fresh.path(), &fresh_before)?;
    drop(taken);

    // And the state is still usable: a new agent adopts it, nothing lost.
    let again = AgentProcess::spawn(lb_cmd(b, s, &["agent", "--source", &source]), &dir.path("again.log"), s)?;
    again.wait_status("adoption", Duration::from_secs(30), |st| st.ready && st.frontends == 1)?;
    ensure!(lb_testing::backend_sets(b) == services, "{:?}", lb_testing::backend_sets(b));
    Ok(())
}

/// Pinned maps another build left: refused, named, left as they were.
#[test]
fn pinned_maps_of_another_layout_are_refused_by_the_agent() -> Result<()> {
    let dir = Scratch::new("layout")?;
    let objects = dir.path("objects.yaml");
    std::fs::write(&objects, GOOD)?;
    let source = format!("file:{}", objects.display());
    let status = dir.path("status.json");
    for (file, key, value, needles) in [
        // The current name, another value size.
        (lb_common::map_names::SERVICES, 8, 16, &["does not match this lb's layout", "lb cleanup"][..]),
        // An older layout's name.
        ("lb4_svc_v0", 8, 16, &["lb4_svc_v0 is pinned state of map layout v0", "lb cleanup"][..]),
    ] {
        let bpffs = PrivateBpffs::new()?;
        pin_foreign_hash_map(&bpffs.path().join(file), key, value)?;
        let before = fingerprint(bpffs.path())?;
        // The one map (a bpffs also shows maps.debug and progs.debug).
        ensure!(before.values().filter(|p| matches!(p, Pin::Map { .. })).count() == 1, "{before:?}");
        let cmd = lb_cmd(bpffs.path(), &status, &["agent", "--source", &source]);
        refused(&format!("foreign {file}"), cmd, needles, bpffs.path(), &before)?;
    }
    Ok(())
}

/// A bpffs that cannot be prepared: under a plain file, inside /proc, or (with
/// `--mount-bpffs off`) a directory that is not a bpffs. Nothing is created there.
#[test]
fn a_bpffs_that_cannot_be_prepared_is_refused() -> Result<()> {
    let dir = Scratch::new("bpffs")?;
    let objects = dir.path("objects.yaml");
    std::fs::write(&objects, GOOD)?;
    let source = format!("file:{}", objects.display());
    let status = dir.path("status.json");
    let plain = dir.path("plain-file");
    std::fs::write(&plain, "not a directory")?;
    let plain_dir = dir.path("plain-dir");
    std::fs::create_dir(&plain_dir)?;
    let proc_dir = PathBuf::from(format!("/proc/lb-cli-test-{}", std::process::id()));
    let cases: [(&str, PathBuf, &[&str], &[&str]); 3] = [
        ("bpffs under a plain file", plain.join("lb"), &[], &["preparing bpffs", "pick another --bpffs"]),
        ("bpffs inside /proc", proc_dir.join("lb"), &[], &["preparing bpffs", "pick another --bpffs"]),
        (
            "not a bpffs, --mount-bpffs off",
            plain_dir.join("lb"),
            &["--mount-bpffs", "off"],
            &["is not on a bpffs and --mount-bpffs is off", "mount -t bpf"],
        ),
    ];
    for (what, bpffs, extra, needles) in cases {
        let mut args = vec!["agent", "--source", source.as_str()];
        args.extend_from_slice(extra);
        let (code, err) = run_lb(lb_cmd(&bpffs, &status, &args))?;
        ensure!(code != 0, "{what}: exit code 0; stderr:\n{err}");
        for n in needles {
            ensure!(err.contains(n), "{what}: stderr should contain {n:?}:\n{err}");
        }
        ensure!(!bpffs.exists(), "{what}: {} was created", bpffs.display());
        eprintln!("{what}: exit {code}, {}", err.lines().next().unwrap_or_default());
    }
    ensure!(std::fs::read_to_string(&plain)? == "not a directory");
    ensure!(std::fs::read_dir(&plain_dir)?.next().is_none(), "{} is not empty", plain_dir.display());
    Ok(())
}
