//! A loaded datapath on a private bpffs, with map helpers and `BPF_PROG_TEST_RUN`
//! wrappers: shared by the fixture tests, `lb-dev demo` and `lb-dev bench`. It keeps
//! the tables, epoch and prefilter in step as the agent's contract says (docs/agent.md,
//! "The order of writes"), without the agent.

use std::{
    collections::{BTreeMap, HashMap as StdHashMap},
    net::Ipv4Addr,
    path::{Path, PathBuf},
    sync::atomic::{AtomicU32, Ordering},
};

use anyhow::{Context as _, Result, bail};
use aya::{
    Ebpf,
    maps::{Array, HashMap, MapData, PerCpuArray},
    programs::{SchedClassifier, TestRun as _, TestRunOptions, Xdp},
};
use lb_common::{
    AffinityKey4, AffinityValue, BackendKey, BackendValue, CT_DIR_FORWARD, Counter, CtKey4, CtValue4, DrainKey,
    FragKey4, FragValue4, IdState, Reason, ServiceKey4, ServiceValue, map_names,
};

use lb_userspace::{
    agent::table::{Addr, Table},
    datapath::{self, LoadOptions, TC_EGRESS_PROGRAM, TC_PROGRAM, XDP_PROGRAM},
};

/// A bpffs mounted on a fresh directory, unmounted and removed on drop, so that tests
/// never see each other's (or a running agent's) pinned maps.
pub struct PrivateBpffs {
    path: PathBuf,
}

impl PrivateBpffs {
    pub fn new() -> Result<Self> {
        static N: AtomicU32 = AtomicU32::new(0);
        let path =
            std::env::temp_dir().join(format!("lb-bpffs-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed)));
        std::fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        datapath::ensure_bpffs(&path).context("mounting a private bpffs; run as root")?;
        Ok(Self { path })
    }
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for PrivateBpffs {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.path, nix::mount::MntFlags::MNT_DETACH);
        let _ = std::fs::remove_dir(&self.path);
    }
}

/// Which entry point a packet goes through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    Xdp,
    Tc,
    /// `lb_tc_egress`, the reverse-NAT-only hook of pod interfaces.
    TcEgress,
}

impl Hook {
    pub const BOTH: [Hook; 2] = [Hook::Xdp, Hook::Tc];
}

/// The verdict, normalised over both hooks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// XDP_PASS, or tc TC_ACT_UNSPEC: handed on (rewritten or not).
    Pass,
    /// XDP_DROP, TC_ACT_SHOT.
    Drop,
    /// XDP_TX, or tc's bpf_redirect back out of the ingress device.
    Bounce,
    /// XDP_ABORTED.
    Aborted,
}

const XDP_ABORTED: u32 = 0;
const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;
const TC_ACT_UNSPEC: u32 = u32::MAX;
const TC_ACT_SHOT: u32 = 2;
const TC_ACT_REDIRECT: u32 = 7;

/// A loaded datapath whose helpers keep the agent's contract with it: a service's
/// lookup table follows its slots (tables are changed as the agent changes them,
/// `Table::update`), written to fresh words before the `SERVICES` entries point at
/// them; a removal bumps the epoch; and the prefilter has the bits of every ClusterIP
/// and backend written.
pub struct Datapath {
    pub ebpf: Ebpf,
    /// Service id -> its table and the first word it was written at.
    tables: StdHashMap<u32, (Table, u32)>,
    /// The next free `TABLES` word (tables are never freed here).
    next_word: u32,
    epoch: u32,
    /// `TABLES`, mapped, as the agent writes it.
    words: datapath::MappedWords,
    /// `PREFILTER` words written, to clear on `reset`.
    prefilter: BTreeMap<u32, u64>,
    /// The `SERVICES` keys of each service id, as `put_service` wrote them.
    frontends: StdHashMap<u32, Vec<ServiceKey4>>,
    // Dropped after `ebpf`, whose pinned maps live on it.
    _bpffs: PrivateBpffs,
}

pub fn ip(s: &str) -> u32 {
    u32::from_ne_bytes(s.parse::<Ipv4Addr>().expect("test address").octets())
}

impl Datapath {
    pub fn load() -> Result<Self> {
        Self::load_with(&[])
    }

    pub fn load_with(max_entries: &[(&'static str, u32)]) -> Result<Self> {
        Self::load_opts(max_entries, false)
    }

    /// `ct_bypass`: benchmarks of the new-flow path only (see `LoadOptions`).
    pub fn load_opts(max_entries: &[(&'static str, u32)], ct_bypass: bool) -> Result<Self> {
        Self::load_full(max_entries, ct_bypass, 0)
    }

    fn loaded(ebpf: Ebpf, bpffs: PrivateBpffs) -> Result<Self> {
        let tables = match ebpf.map(map_names::TABLES).context("TABLES map")? {
            aya::maps::Map::Array(d) => MapData::from_id(d.info()?.id())?,
            _ => bail!("TABLES is not an array"),
        };
        let words = datapath::MappedWords::new(tables, map_names::TABLES)?;
        let mut dp = Self {
            ebpf,
            words,
            tables: StdHashMap::new(),
            next_word: 0,
            epoch: 0,
            prefilter: BTreeMap::new(),
            frontends: StdHashMap::new(),
            _bpffs: bpffs,
        };
        // Epoch 1, so that a conntrack entry written with the default epoch 0 is
        // validated on its first packet, as one from before the last removal would be.
        dp.bump_epoch()?;
        Ok(dp)
    }

    /// The backend epoch the helpers last wrote.
    pub fn epoch(&self) -> u32 {
        self.epoch
    }

    /// Moves the backend epoch on, as the agent does after removing backends.
    pub fn bump_epoch(&mut self) -> Result<()> {
        self.epoch += 1;
        let mut m: Array<&mut MapData, IdState> =
            Array::try_from(self.ebpf.map_mut(map_names::IDS).expect("ids map")).expect("array");
        let cur = m.get(&0, 0).unwrap_or_default();
        // The conntrack clock, as the agent writes it.
        let clock = lb_userspace::agent::conntrack::clock()
            .map_err(anyhow::Error::msg)
            .context("the kernel's jiffies clock")?;
        m.set(0, IdState { epoch: self.epoch, jiffy_recip: clock.recip(), ..cur }, 0)?;
        Ok(())
    }

    /// Sets the prefilter bit of `addr_be` (`backend`: in the backend half).
    pub fn prefilter_allow(&mut self, addr_be: u32, backend: bool) -> Result<()> {
        let (i, mask) = lb_common::prefilter_word(addr_be, backend);
        let word = self.prefilter.entry(i).or_default();
        if *word & mask != 0 {
            return Ok(());
        }
        *word |= mask;
        let w = *word;
        let mut m: Array<&mut MapData, u64> =
            Array::try_from(self.ebpf.map_mut(map_names::PREFILTER).expect("prefilter map")).expect("array");
        m.set(i, w, 0)?;
        Ok(())
    }

    /// Writes `words` as a new table at fresh words; returns the first.
    pub fn put_table_words(&mut self, words: &[u64]) -> Result<u32> {
        let off = self.next_word;
        self.words.write(off, words)?;
        self.next_word += words.len() as u32;
        Ok(off)
    }

    /// Points every `SERVICES` entry of `svc_id` at table words `off` of `size`
    /// buckets, as one write each (the agent's table switch).
    pub fn point_at_table(&mut self, svc_id: u32, off: u32, size: u32) -> Result<()> {
        let keys = self.frontends.get(&svc_id).cloned().unwrap_or_default();
        let mut m = self.hash::<ServiceKey4, ServiceValue>(map_names::SERVICES);
        for k in keys {
            if let Ok(v) = m.get(&k, 0)
                && v.id == svc_id
            {
                m.insert(k, ServiceValue { table_off: off, table_size: size, ..v }, 0)?;
            }
        }
        Ok(())
    }

    /// The table of `svc_id` as the helpers last wrote it.
    pub fn table(&self, svc_id: u32) -> Option<&Table> {
        self.tables.get(&svc_id).map(|(t, _)| t)
    }

    /// Changes the table of `svc_id` to the backends `slots` lists ((slot, backend)), as
    /// the agent would after changing the slots, and publishes it.
    fn retable(&mut self, svc_id: u32, slots: &[(u32, Addr)]) -> Result<()> {
        // The lowest slot of a backend listed twice wins.
        let mut slot_of: StdHashMap<Addr, u32> = StdHashMap::new();
        for (slot, a) in slots {
            slot_of.entry(*a).or_insert(*slot);
        }
        let addrs: Vec<Addr> = slot_of.keys().copied().collect();
        let table = match self.tables.get(&svc_id) {
            Some((t, _)) => t.update(&addrs),
            None => Table::build(&addrs),
        };
        let words = table.words(&slot_of).context("a table backend without a slot")?;
        // Written anew even when the buckets are the same: their slots may have moved.
        let off = self.put_table_words(&words)?;
        self.point_at_table(svc_id, off, table.size())?;
        self.tables.insert(svc_id, (table, off));
        Ok(())
    }

    /// `load_opts`, with the conntrack map created by us with `ct_flags` (e.g.
    /// [`BPF_F_NO_COMMON_LRU`]) and pinned before the loader runs, which then reuses it
    /// instead of creating its own (aya creates maps from the object's definition only,
    /// flags included). `ct_flags` 0: the loader's map, as in production. Fails unless
    /// the loaded programs really use a map with the flags.
    pub fn load_full(max_entries: &[(&'static str, u32)], ct_bypass: bool, ct_flags: u32) -> Result<Self> {
        let bpffs = PrivateBpffs::new()?;
        let ct_path = bpffs.path().join(map_names::CONNTRACK);
        if ct_flags != 0 {
            let n = max_entries
                .iter()
                .rev()
                .find(|(name, _)| *name == map_names::CONNTRACK)
                .map_or(lb_common::limits::CONNTRACK, |(_, n)| *n);
            pin_conntrack_map(&ct_path, n, ct_flags)?;
        }
        let mut opts = LoadOptions::new(bpffs.path());
        opts.max_entries = max_entries.to_vec();
        opts.bench_ct_bypass = ct_bypass;
        let ebpf = datapath::load(&opts).context("loading the datapath")?;
        if ct_flags != 0 {
            check_conntrack_reused(&ebpf, &ct_path, ct_flags)?;
        }
        Self::loaded(ebpf, bpffs)
    }

    /// Per CPU (indexed by CPU number) values of one `STATS` counter.
    pub fn stat_per_cpu(&mut self, reason: Reason) -> Vec<Counter> {
        let m: PerCpuArray<&mut MapData, Counter> =
            PerCpuArray::try_from(self.ebpf.map_mut(map_names::STATS).expect("stats map")).expect("per-cpu array");
        m.get(&(reason as u32), 0).expect("stats index").iter().copied().collect()
    }

    /// The bpffs directory the maps are pinned in (for `lb_userspace::inspect`).
    pub fn pin_dir(&self) -> &Path {
        self._bpffs.path()
    }

    fn hash<K: aya::Pod, V: aya::Pod>(&mut self, name: &str) -> HashMap<&mut MapData, K, V> {
        HashMap::try_from(self.ebpf.map_mut(name).expect("map in object")).expect("hash map type")
    }

    /// Adds or replaces a frontend and its address marker. A `value` without a table
    /// gets the one the helpers keep for its service id, if any.
    pub fn put_service(&mut self, vip: &str, port: u16, proto: u8, mut value: ServiceValue) -> Result<()> {
        if value.table_size == 0
            && let Some((t, off)) = self.tables.get(&value.id)
        {
            (value.table_off, value.table_size) = (*off, t.size());
        }
        self.prefilter_allow(ip(vip), false)?;
        let key = ServiceKey4::new(ip(vip), port.to_be(), proto);
        let keys = self.frontends.entry(value.id).or_default();
        if !keys.contains(&key) {
            keys.push(key);
        }
        let mut m = self.hash::<ServiceKey4, ServiceValue>(map_names::SERVICES);
        m.insert(key, value, 0)?;
        m.insert(ServiceKey4::address_marker(ip(vip)), ServiceValue::default(), 0)?;
        Ok(())
    }

    /// Writes slots 1..=n of `svc_id`: (backend id, address, port); then its lookup
    /// table over them, changed from the previous one as the agent changes it.
    pub fn put_backends(&mut self, svc_id: u32, backends: &[(u32, &str, u16)]) -> Result<()> {
        let mut listed = Vec::with_capacity(backends.len());
        let mut replaced = false;
        {
            let mut m = self.hash::<BackendKey, BackendValue>(map_names::BACKENDS);
            for (i, (id, addr, port)) in backends.iter().enumerate() {
                let v = BackendValue { backend_id: *id, addr_be: ip(addr), port_be: port.to_be(), _pad: [0; 2] };
                let key = BackendKey { svc_id, slot: i as u32 + 1 };
                replaced |= m.get(&key, 0).is_ok_and(|old| old.backend_id != *id);
                m.insert(key, v, 0)?;
                listed.push((v.addr_be, v.port_be));
            }
        }
        for (a, _) in &listed {
            self.prefilter_allow(*a, true)?;
        }
        let slots: Vec<(u32, Addr)> = listed.iter().enumerate().map(|(i, a)| (i as u32 + 1, *a)).collect();
        self.retable(svc_id, &slots)?;
        // A backend overwritten in its slot is a removal.
        if replaced { self.bump_epoch() } else { Ok(()) }
    }

    /// Marks backend `id` of `svc_id` as draining: it exists, takes no new flows.
    pub fn put_draining(&mut self, svc_id: u32, id: u32, addr: &str, port: u16) -> Result<()> {
        self.prefilter_allow(ip(addr), true)?;
        let mut m = self.hash::<DrainKey, BackendValue>(map_names::DRAINING);
        let v = BackendValue { backend_id: id, addr_be: ip(addr), port_be: port.to_be(), _pad: [0; 2] };
        m.insert(DrainKey { svc_id, backend_id: id }, v, 0)?;
        Ok(())
    }

    /// Deletes a slot, as the agent does after lowering `count`: the table follows the
    /// slots left (1..=count of the service's entry), and the epoch moves on.
    pub fn remove_backend_slot(&mut self, svc_id: u32, slot: u32) -> Result<()> {
        {
            let mut m = self.hash::<BackendKey, BackendValue>(map_names::BACKENDS);
            m.remove(&BackendKey { svc_id, slot })?;
        }
        let keys = self.frontends.get(&svc_id).cloned().unwrap_or_default();
        let count = {
            let m = self.hash::<ServiceKey4, ServiceValue>(map_names::SERVICES);
            keys.iter().find_map(|k| m.get(k, 0).ok().filter(|v| v.id == svc_id)).map_or(0, |v| v.count)
        };
        let slots: Vec<(u32, Addr)> = {
            let m = self.hash::<BackendKey, BackendValue>(map_names::BACKENDS);
            (1..=count)
                .filter_map(|s| m.get(&BackendKey { svc_id, slot: s }, 0).ok().map(|b| (s, (b.addr_be, b.port_be))))
                .collect()
        };
        self.retable(svc_id, &slots)?;
        self.bump_epoch()
    }

    pub fn conntrack(&mut self) -> Vec<(CtKey4, CtValue4)> {
        let m = self.hash::<CtKey4, CtValue4>(map_names::CONNTRACK);
        m.iter().filter_map(|r| r.ok()).collect()
    }

    /// Writes a conntrack entry, with the prefilter bits its packets need (the agent
    /// has them set for every flow it can have created): the ClusterIP and the backend
    /// of a forward half, the backend of a reply half.
    pub fn put_conntrack(&mut self, key: CtKey4, value: CtValue4) -> Result<()> {
        if value.dir == CT_DIR_FORWARD {
            self.prefilter_allow(key.dst_addr_be, false)?;
            self.prefilter_allow(value.nat_addr_be, true)?;
        } else {
            self.prefilter_allow(key.src_addr_be, true)?;
        }
        self.hash::<CtKey4, CtValue4>(map_names::CONNTRACK).insert(key, value, 0)?;
        Ok(())
    }

    /// Writes a conntrack entry without the prefilter bits the agent would have set:
    /// for the tests that show the prefilter keeps such packets from every lookup.
    pub fn put_conntrack_unfiltered(&mut self, key: CtKey4, value: CtValue4) -> Result<()> {
        self.hash::<CtKey4, CtValue4>(map_names::CONNTRACK).insert(key, value, 0)?;
        Ok(())
    }

    pub fn remove_conntrack(&mut self, key: &CtKey4) -> Result<()> {
        self.hash::<CtKey4, CtValue4>(map_names::CONNTRACK).remove(key)?;
        Ok(())
    }

    pub fn frags(&mut self) -> Vec<(FragKey4, FragValue4)> {
        let m = self.hash::<FragKey4, FragValue4>(map_names::FRAGS);
        m.iter().filter_map(|r| r.ok()).collect()
    }

    pub fn affinity(&mut self) -> Vec<(AffinityKey4, AffinityValue)> {
        let m = self.hash::<AffinityKey4, AffinityValue>(map_names::AFFINITY);
        m.iter().filter_map(|r| r.ok()).collect()
    }

    pub fn put_affinity(&mut self, key: AffinityKey4, value: AffinityValue) -> Result<()> {
        let mut m = self.hash::<AffinityKey4, AffinityValue>(map_names::AFFINITY);
        m.insert(key, value, 0)?;
        Ok(())
    }

    pub fn clear_conntrack(&mut self) -> Result<()> {
        clear(&mut self.hash::<CtKey4, CtValue4>(map_names::CONNTRACK))
    }

    /// Empties every hash map (the counters keep counting: compare deltas).
    pub fn reset(&mut self) -> Result<()> {
        clear(&mut self.hash::<ServiceKey4, ServiceValue>(map_names::SERVICES))?;
        clear(&mut self.hash::<BackendKey, BackendValue>(map_names::BACKENDS))?;
        clear(&mut self.hash::<DrainKey, BackendValue>(map_names::DRAINING))?;
        clear(&mut self.hash::<AffinityKey4, AffinityValue>(map_names::AFFINITY))?;
        clear(&mut self.hash::<FragKey4, FragValue4>(map_names::FRAGS))?;
        self.tables.clear();
        self.frontends.clear();
        let words: Vec<u32> = std::mem::take(&mut self.prefilter).into_keys().collect();
        let mut m: Array<&mut MapData, u64> =
            Array::try_from(self.ebpf.map_mut(map_names::PREFILTER).expect("prefilter map")).expect("array");
        for i in words {
            m.set(i, 0, 0)?;
        }
        self.clear_conntrack()
    }

    /// Sum over CPUs of one `STATS` counter.
    pub fn stat(&mut self, reason: Reason) -> Counter {
        let m: PerCpuArray<&mut MapData, Counter> =
            PerCpuArray::try_from(self.ebpf.map_mut(map_names::STATS).expect("stats map")).expect("per-cpu array");
        datapath::counter_total(&m, reason as u32).expect("stats index")
    }

    pub fn stats(&mut self) -> Vec<(Reason, Counter)> {
        Reason::ALL.iter().map(|&r| (r, self.stat(r))).collect()
    }

    /// Runs `packet` through one entry point `repeat` times; returns the verdict, the
    /// packet as the program left it, and the mean run time in ns.
    pub fn run(&mut self, hook: Hook, packet: &[u8], repeat: u32) -> Result<(Verdict, Vec<u8>, u64)> {
        run_on(&self.ebpf, hook, packet, repeat)
    }

    /// Loads another copy of the programs on the same pinned maps (for benchmarks: a
    /// `bench_ct_bypass` copy next to the normal one).
    pub fn load_sharing_maps(&self, ct_bypass: bool) -> Result<Ebpf> {
        let mut opts = LoadOptions::new(self._bpffs.path());
        opts.bench_ct_bypass = ct_bypass;
        datapath::load(&opts).context("loading a second copy of the datapath")
    }
}

/// `Datapath::run` for any loaded copy of the datapath.
pub fn run_on(ebpf: &Ebpf, hook: Hook, packet: &[u8], repeat: u32) -> Result<(Verdict, Vec<u8>, u64)> {
    let mut out = vec![0u8; packet.len() + 256];
    let opts = TestRunOptions { data_in: Some(packet), data_out: Some(&mut out), repeat, ..Default::default() };
    let res = match hook {
        Hook::Xdp => {
            let p: &Xdp = ebpf.program(XDP_PROGRAM).context("lb_xdp")?.try_into()?;
            p.test_run(opts)?
        }
        Hook::Tc => {
            let p: &SchedClassifier = ebpf.program(TC_PROGRAM).context("lb_tc")?.try_into()?;
            p.test_run(opts)?
        }
        Hook::TcEgress => {
            let p: &SchedClassifier = ebpf.program(TC_EGRESS_PROGRAM).context("lb_tc_egress")?.try_into()?;
            p.test_run(opts)?
        }
    };
    let verdict = match (hook, res.return_value) {
        // tc hands every packet it does not drop on to the next program (TCX_NEXT),
        // rewritten or not; TC_ACT_OK would end the chain.
        (Hook::Xdp, XDP_PASS) | (Hook::Tc | Hook::TcEgress, TC_ACT_UNSPEC) => Verdict::Pass,
        (Hook::Xdp, XDP_DROP) | (Hook::Tc | Hook::TcEgress, TC_ACT_SHOT) => Verdict::Drop,
        (Hook::Xdp, XDP_TX) | (Hook::Tc, TC_ACT_REDIRECT) => Verdict::Bounce,
        (Hook::Xdp, XDP_ABORTED) => Verdict::Aborted,
        (h, v) => bail!("{h:?} returned unexpected {v}"),
    };
    out.truncate(res.data_size_out as usize);
    Ok((verdict, out, res.duration.as_nanos() as u64))
}

/// `BPF_F_TEST_SKB_CHECKSUM_COMPLETE` (include/uapi/linux/bpf.h): test_run gives the
/// skb `CHECKSUM_COMPLETE` with `skb->csum` over the packet from the network header, and
/// fails the run with EBADMSG if the program left `skb->csum` disagreeing with the
/// packet it hands back (net/bpf/test_run.c, `bpf_prog_test_run_skb`). Without it the
/// skb is `CHECKSUM_NONE`; test_run has no way to make a `CHECKSUM_PARTIAL` skb.
pub const BPF_F_TEST_SKB_CHECKSUM_COMPLETE: u32 = 1 << 2;

/// A tc run (`lb_tc` or `lb_tc_egress`) of `packet` as a `CHECKSUM_COMPLETE` skb, as a
/// NIC with full receive checksums hands it to the stack. Raw `BPF_PROG_TEST_RUN`:
/// aya's `TestRunOptions` cannot set the flag. An `Err` of kind `InvalidData` is the
/// kernel's EBADMSG: the program left `skb->csum` stale.
pub fn run_tc_csum_complete(ebpf: &Ebpf, hook: Hook, packet: &[u8]) -> Result<std::io::Result<(Verdict, Vec<u8>)>> {
    use std::os::fd::{AsFd as _, AsRawFd as _};
    // include/uapi/linux/bpf.h
    const BPF_PROG_TEST_RUN: u32 = 10;
    let name = match hook {
        Hook::Tc => TC_PROGRAM,
        Hook::TcEgress => TC_EGRESS_PROGRAM,
        Hook::Xdp => bail!("CHECKSUM_COMPLETE is an skb state: tc hooks only"),
    };
    let p: &SchedClassifier = ebpf.program(name).with_context(|| format!("{name} in object"))?.try_into()?;
    let fd = p.fd()?.as_fd().as_raw_fd();
    let mut out = vec![0u8; packet.len() + 256];
    // `union bpf_attr`'s `test` member.
    let mut attr = [0u8; 128];
    put(&mut attr, 0, (fd as u32).to_ne_bytes());
    put(&mut attr, 8, (packet.len() as u32).to_ne_bytes());
    put(&mut attr, 12, (out.len() as u32).to_ne_bytes());
    put(&mut attr, 16, (packet.as_ptr() as u64).to_ne_bytes());
    put(&mut attr, 24, (out.as_mut_ptr() as u64).to_ne_bytes());
    put(&mut attr, 32, 1u32.to_ne_bytes());
    put(&mut attr, 64, BPF_F_TEST_SKB_CHECKSUM_COMPLETE.to_ne_bytes());
    if let Err(e) = bpf_sys(BPF_PROG_TEST_RUN, &mut attr) {
        return Ok(Err(e));
    }
    let retval = u32::from_ne_bytes(attr[4..8].try_into().expect("4 bytes"));
    let size = u32::from_ne_bytes(attr[12..16].try_into().expect("4 bytes"));
    let verdict = match retval {
        TC_ACT_UNSPEC => Verdict::Pass,
        TC_ACT_SHOT => Verdict::Drop,
        TC_ACT_REDIRECT if hook == Hook::Tc => Verdict::Bounce,
        v => bail!("{hook:?} returned unexpected {v}"),
    };
    out.truncate(size as usize);
    Ok(Ok((verdict, out)))
}

fn clear<K: aya::Pod, V: aya::Pod>(m: &mut HashMap<&mut MapData, K, V>) -> Result<()> {
    let keys: Vec<K> = m.keys().filter_map(|k| k.ok()).collect();
    for k in keys {
        m.remove(&k)?;
    }
    Ok(())
}

pub use lb_userspace::datapath::monotonic_ns;

/// Now in conntrack ticks, the clock of `CtValue4::seen`.
pub fn ct_now() -> u32 {
    lb_userspace::agent::conntrack::now_tick()
}

/// Creates a plain BPF hash map and pins it at `path`, as another (older or broken)
/// build of lb might have left it: for the layout-refusal tests. Raw `bpf(2)`, since
/// aya only creates maps from an object file.
pub fn pin_foreign_hash_map(path: &Path, key_size: u32, value_size: u32) -> Result<()> {
    const BPF_MAP_TYPE_HASH: u32 = 1;
    // union bpf_attr, zero-filled beyond the fields we set (include/uapi/linux/bpf.h).
    let mut attr = [0u8; 128];
    for (i, v) in [BPF_MAP_TYPE_HASH, key_size, value_size, 16].iter().enumerate() {
        put(&mut attr, i * 4, v.to_ne_bytes());
    }
    create_and_pin(&mut attr, path).context("a foreign hash map")
}

/// `BPF_F_NO_COMMON_LRU` (include/uapi/linux/bpf.h): an LRU hash with one LRU list
/// per CPU instead of one shared by all.
pub const BPF_F_NO_COMMON_LRU: u32 = 1 << 1;

/// Creates an LRU hash of the conntrack layout (`CtKey4` -> `CtValue4`) with
/// `map_flags` and pins it at `path`, for `datapath::load` to reuse: the object's map
/// definition has no way to set the flags per load. Raw `bpf(2)`, as
/// [`pin_foreign_hash_map`].
pub fn pin_conntrack_map(path: &Path, max_entries: u32, flags: u32) -> Result<()> {
    // include/uapi/linux/bpf.h
    const BPF_MAP_TYPE_LRU_HASH: u32 = 9;
    const BPF_OBJ_NAME_LEN: usize = 16;
    let mut attr = [0u8; 128];
    put(&mut attr, 0, BPF_MAP_TYPE_LRU_HASH.to_ne_bytes());
    put(&mut attr, 4, (std::mem::size_of::<CtKey4>() as u32).to_ne_bytes());
    put(&mut attr, 8, (std::mem::size_of::<CtValue4>() as u32).to_ne_bytes());
    put(&mut attr, 12, max_entries.to_ne_bytes());
    put(&mut attr, 16, flags.to_ne_bytes());
    // map_name at offset 28, so that bpftool and `MapInfo::name` show what it is; the
    // kernel takes at most 15 bytes and a NUL.
    let name = map_names::CONNTRACK.as_bytes();
    let len = name.len().min(BPF_OBJ_NAME_LEN - 1);
    attr[28..28 + len].copy_from_slice(&name[..len]);
    create_and_pin(&mut attr, path).with_context(|| format!("the conntrack map with flags {flags:#x}"))
}

/// BPF_MAP_CREATE with `attr`, then BPF_OBJ_PIN of the new map at `path`; the fd is
/// closed after (the pin holds the map).
fn create_and_pin(attr: &mut [u8; 128], path: &Path) -> Result<()> {
    use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
    // include/uapi/linux/bpf.h
    const BPF_MAP_CREATE: u32 = 0;
    const BPF_OBJ_PIN: u32 = 6;
    // SAFETY: BPF_MAP_CREATE returns a new fd, which we own from here on.
    let fd = unsafe { OwnedFd::from_raw_fd(bpf_sys(BPF_MAP_CREATE, attr).context("BPF_MAP_CREATE")?) };
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())?;
    let mut pin = [0u8; 128];
    put(&mut pin, 0, (c.as_ptr() as u64).to_ne_bytes());
    put(&mut pin, 8, (fd.as_raw_fd() as u32).to_ne_bytes());
    bpf_sys(BPF_OBJ_PIN, &mut pin).with_context(|| format!("BPF_OBJ_PIN {}", path.display()))?;
    Ok(())
}

/// The kernel's view (id, flags, size) of the conntrack map a loaded copy of the
/// datapath uses.
pub fn conntrack_map_info(ebpf: &Ebpf) -> Result<aya::maps::MapInfo> {
    let map = ebpf.map(map_names::CONNTRACK).context("conntrack map in object")?;
    let aya::maps::Map::LruHashMap(data) = map else { bail!("conntrack map is not an LRU hash") };
    data.info().context("conntrack map info")
}

/// That the map pinned at `path` has `flags`, and is the conntrack map of `ebpf` and
/// of every program in it: aya reuses a pinned map of the same name, but only the map
/// ids the kernel reports for the programs prove the programs were relocated to it.
fn check_conntrack_reused(ebpf: &Ebpf, path: &Path, flags: u32) -> Result<()> {
    let pinned = MapData::from_pin(path)
        .and_then(|m| m.info())
        .with_context(|| format!("inspecting the pinned conntrack map {}", path.display()))?;
    anyhow::ensure!(
        pinned.map_flags() & flags == flags,
        "pinned conntrack map has flags {:#x}, expected {flags:#x}",
        pinned.map_flags()
    );
    let used = conntrack_map_info(ebpf)?;
    anyhow::ensure!(
        used.id() == pinned.id(),
        "the loader created conntrack map {} instead of reusing the pinned {}",
        used.id(),
        pinned.id()
    );
    for name in [XDP_PROGRAM, TC_PROGRAM, TC_EGRESS_PROGRAM] {
        let info = ebpf.program(name).with_context(|| format!("{name} in object"))?.info()?;
        let ids = info.map_ids().with_context(|| format!("map ids of {name}"))?.unwrap_or_default();
        anyhow::ensure!(ids.contains(&pinned.id()), "{name} does not use the pinned conntrack map {}", pinned.id());
    }
    Ok(())
}

/// A second tc program, attached with tcx after whatever is on the hook already, that
/// counts the packets it sees and then either hands them on or drops them: a stand-in
/// for a network-policy program running after the datapath. Built from raw
/// instructions through the bpf(2) syscall (eight instructions; no ELF needed), and
/// detached when dropped.
pub struct TcxProbe {
    map_fd: std::os::fd::OwnedFd,
    _prog_fd: std::os::fd::OwnedFd,
    _link_fd: std::os::fd::OwnedFd,
}

/// What a [`TcxProbe`] does with a packet after counting it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProbeVerdict {
    /// TCX_NEXT.
    Next,
    /// TC_ACT_SHOT.
    Drop,
}

pub(crate) fn bpf_sys(cmd: u32, attr: &mut [u8; 128]) -> std::io::Result<i32> {
    // SAFETY: `attr` is a zero-padded `union bpf_attr` of the size we pass.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), attr.len()) };
    if rc < 0 { Err(std::io::Error::last_os_error()) } else { Ok(rc as i32) }
}

pub(crate) fn put<const N: usize>(attr: &mut [u8; 128], off: usize, v: [u8; N]) {
    attr[off..off + N].copy_from_slice(&v);
}

impl TcxProbe {
    /// Attaches to `iface` (in the calling thread's network namespace), on ingress or
    /// egress, after the programs already there.
    pub fn attach(iface: &str, egress: bool, verdict: ProbeVerdict) -> Result<Self> {
        use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
        // include/uapi/linux/bpf.h
        const BPF_MAP_CREATE: u32 = 0;
        const BPF_PROG_LOAD: u32 = 5;
        const BPF_LINK_CREATE: u32 = 28;
        const BPF_MAP_TYPE_ARRAY: u32 = 2;
        const BPF_PROG_TYPE_SCHED_CLS: u32 = 3;
        const BPF_TCX_INGRESS: u32 = 46;
        const BPF_TCX_EGRESS: u32 = 47;
        let ifindex = nix::net::if_::if_nametoindex(iface).with_context(|| format!("no interface {iface}"))?;

        let mut attr = [0u8; 128];
        put(&mut attr, 0, BPF_MAP_TYPE_ARRAY.to_ne_bytes());
        put(&mut attr, 4, 4u32.to_ne_bytes());
        put(&mut attr, 8, 8u32.to_ne_bytes());
        put(&mut attr, 12, 1u32.to_ne_bytes());
        // SAFETY: a new fd the kernel handed us.
        let map_fd =
            unsafe { OwnedFd::from_raw_fd(bpf_sys(BPF_MAP_CREATE, &mut attr).context("creating the probe's map")?) };

        let insn = |code: u8, dst: u8, src: u8, off: i16, imm: i32| -> [u8; 8] {
            let o = off.to_ne_bytes();
            let i = imm.to_ne_bytes();
            [code, dst | (src << 4), o[0], o[1], i[0], i[1], i[2], i[3]]
        };
        let action: i32 = match verdict {
            ProbeVerdict::Next => -1,
            ProbeVerdict::Drop => 2,
        };
        let prog: Vec<[u8; 8]> = vec![
            insn(0x62, 10, 0, -4, 0),                // *(u32 *)(r10 - 4) = 0
            insn(0xbf, 2, 10, 0, 0),                 // r2 = r10
            insn(0x07, 2, 0, 0, -4),                 // r2 += -4
            insn(0x18, 1, 1, 0, map_fd.as_raw_fd()), // r1 = map (BPF_PSEUDO_MAP_FD) ...
            insn(0, 0, 0, 0, 0),                     // ... upper half of the imm64
            insn(0x85, 0, 0, 0, 1),                  // call bpf_map_lookup_elem
            insn(0x15, 0, 0, 2, 0),                  // if r0 == 0 goto +2
            insn(0xb7, 1, 0, 0, 1),                  // r1 = 1
            insn(0xdb, 0, 1, 0, 0),                  // lock *(u64 *)(r0 + 0) += r1
            insn(0xb7, 0, 0, 0, action),             // r0 = verdict
            insn(0x95, 0, 0, 0, 0),                  // exit
        ];
        let code: Vec<u8> = prog.concat();
        let license = c"GPL";
        let mut attr = [0u8; 128];
        put(&mut attr, 0, BPF_PROG_TYPE_SCHED_CLS.to_ne_bytes());
        put(&mut attr, 4, (prog.len() as u32).to_ne_bytes());
        put(&mut attr, 8, (code.as_ptr() as u64).to_ne_bytes());
        put(&mut attr, 16, (license.as_ptr() as u64).to_ne_bytes());
        // SAFETY: as above.
        let prog_fd = unsafe { OwnedFd::from_raw_fd(bpf_sys(BPF_PROG_LOAD, &mut attr).context("loading the probe")?) };

        let mut attr = [0u8; 128];
        put(&mut attr, 0, (prog_fd.as_raw_fd() as u32).to_ne_bytes());
        put(&mut attr, 4, ifindex.to_ne_bytes());
        put(&mut attr, 8, (if egress { BPF_TCX_EGRESS } else { BPF_TCX_INGRESS }).to_ne_bytes());
        // No relative program and no flags: appended after the programs on the hook.
        // SAFETY: as above.
        let link_fd = unsafe {
            OwnedFd::from_raw_fd(
                bpf_sys(BPF_LINK_CREATE, &mut attr).with_context(|| format!("attaching the probe to {iface}"))?,
            )
        };
        Ok(Self { map_fd, _prog_fd: prog_fd, _link_fd: link_fd })
    }

    /// Packets the probe has seen.
    pub fn seen(&self) -> Result<u64> {
        use std::os::fd::AsRawFd as _;
        const BPF_MAP_LOOKUP_ELEM: u32 = 1;
        let key = 0u32;
        let mut value = 0u64;
        let mut attr = [0u8; 128];
        put(&mut attr, 0, (self.map_fd.as_raw_fd() as u32).to_ne_bytes());
        put(&mut attr, 8, (&key as *const u32 as u64).to_ne_bytes());
        put(&mut attr, 16, (&mut value as *mut u64 as u64).to_ne_bytes());
        bpf_sys(BPF_MAP_LOOKUP_ELEM, &mut attr).context("reading the probe's count")?;
        Ok(value)
    }
}
