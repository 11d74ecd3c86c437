//! A packet fuzzer for the datapath: seeded, generated packets through `lb_xdp`,
//! `lb_tc` and `lb_tc_egress` with BPF_PROG_TEST_RUN, on the fixture tests' map state
//! (`fixtures::base`) plus conntrack entries, and every run checked:
//!
//! - the kernel ran the program (an error only for a frame test_run itself refuses,
//!   see [`kernel_refuses`], and then no counter moved);
//! - exactly one verdict was counted ([`Reason::is_verdict`]), with the packet's bytes,
//!   and no socket-LB reason; the hook's return value is the one of that reason;
//! - a packet handed on unchanged is byte for byte the input; a rewritten one differs
//!   only in the NAT fields and keeps every checksum that was valid valid;
//! - the maps stay consistent ([`check_maps`]), every `check_every` packets and at the
//!   end.
//!
//! A failure is an error naming the seed, the packet index, the hook and the check,
//! with the packet as a byte array and a fixture line for lb-userspace/tests/datapath.rs.
//! `cargo xtask fuzz` runs it (lb-dev), and lb-userspace/tests/fuzz.rs in `cargo test`.

use std::{
    collections::{BTreeMap, HashMap as StdHashMap, VecDeque},
    fmt::Write as _,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use aya::maps::{HashMap, MapData};
use etherparse::{Icmpv4Type, PacketBuilder};
use lb_common::{
    BackendKey, BackendValue, CT_DIR_FORWARD, CT_DIR_REPLY, CT_F_DRAINING, CT_F_REPLIED, CT_F_STATE, CtKey4, CtValue4,
    DrainKey, IPPROTO_TCP, IPPROTO_UDP, Reason, SVC_F_AFFINITY, ServiceKey4, ServiceValue, map_names,
};

use crate::{
    Datapath, Hook, Verdict, ct_now,
    fixtures::{self, *},
    ip, run_tc_csum_complete,
};

/// What to run.
#[derive(Clone, Debug)]
pub struct Options {
    /// Generated packets; each goes through every hook of `hooks`.
    pub packets: u64,
    pub seed: u64,
    pub hooks: Vec<Hook>,
    /// Map consistency check every this many packets (and at the end).
    pub check_every: u64,
    /// Maps back to the starting state every this many packets, so that conntrack
    /// stays small enough to check and planted entries come back.
    pub reset_every: u64,
    /// tc runs with a `CHECKSUM_COMPLETE` skb (`crate::BPF_F_TEST_SKB_CHECKSUM_COMPLETE`),
    /// else `CHECKSUM_NONE` (test_run's default).
    pub csum_complete: bool,
}

impl Options {
    pub fn new(packets: u64, seed: u64) -> Self {
        Self {
            packets,
            seed,
            hooks: vec![Hook::Xdp, Hook::Tc, Hook::TcEgress],
            check_every: 2_000,
            reset_every: 20_000,
            csum_complete: true,
        }
    }
}

/// What a run saw.
#[derive(Clone, Debug, Default)]
pub struct Report {
    pub packets: u64,
    /// Hook name -> program runs.
    pub runs: BTreeMap<&'static str, u64>,
    /// Hook name -> frames test_run refused (the program did not run).
    pub refused: BTreeMap<&'static str, u64>,
    /// (hook name, reason name) -> packets; verdicts and the reasons counted besides.
    pub reasons: BTreeMap<(&'static str, &'static str), u64>,
    /// Generator -> packets.
    pub generators: BTreeMap<&'static str, u64>,
    pub map_checks: u64,
    /// Hook name -> ICMP rejections whose CHECKSUM_COMPLETE run test_run failed with
    /// EBADMSG after `bpf_skb_change_tail` (see `run`), run again as CHECKSUM_NONE.
    pub csum_exempt: BTreeMap<&'static str, u64>,
    pub elapsed: Duration,
}

impl Report {
    /// A plain-text summary: runs, verdicts per hook, generators.
    pub fn table(&self) -> String {
        let mut s = String::new();
        let secs = self.elapsed.as_secs_f64();
        let runs: u64 = self.runs.values().sum();
        let _ = writeln!(
            s,
            "{} packets, {runs} program runs in {secs:.1} s ({:.0} runs/s), {} map checks",
            self.packets,
            runs as f64 / secs.max(1e-9),
            self.map_checks
        );
        for (hook, n) in &self.runs {
            let _ = writeln!(
                s,
                "{hook}: {n} runs, {} refused by test_run, {} rejections rerun as CHECKSUM_NONE",
                self.refused.get(hook).unwrap_or(&0),
                self.csum_exempt.get(hook).unwrap_or(&0)
            );
            for ((h, r), c) in &self.reasons {
                if h == hook {
                    let _ = writeln!(s, "  {r:<22} {c:>9}");
                }
            }
        }
        let _ = writeln!(s, "generators:");
        for (g, n) in &self.generators {
            let _ = writeln!(s, "  {g:<22} {n:>9}");
        }
        s
    }
}

/// splitmix64 (Steele, Lea, Flood 2014): small, seeded, the same on every machine.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// In 0..n (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
    /// True one time in `n`.
    pub fn one_in(&mut self, n: u64) -> bool {
        self.below(n) == 0
    }
    /// In 0..n, or 0 when n is 0 (so `v.get(rng.index(v.len()))` is `None` for an
    /// empty `v`).
    pub fn index(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }
    /// True one time in `n` (n > 0).
    pub fn one_in_usize(&mut self, n: usize) -> bool {
        self.index(n) == 0
    }
    pub fn pick<T: Clone>(&mut self, v: &[T]) -> T {
        v[self.index(v.len())].clone()
    }
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next_u64() as u8).collect()
    }
    /// `min + below(extra)` random bytes.
    pub fn bytes_upto(&mut self, min: usize, extra: u64) -> Vec<u8> {
        let n = min + self.below(extra) as usize;
        self.bytes(n)
    }
}

fn hook_name(h: Hook) -> &'static str {
    match h {
        Hook::Xdp => "xdp",
        Hook::Tc => "tc_ingress",
        Hook::TcEgress => "tc_egress",
    }
}

// ---- Packets ----

const ROUTER: [u8; 4] = [10, 0, 0, 1];
/// A backend of SVC_TCP that is draining (`DRAINING`, no slot), with a flow to it.
const BE_DRAIN: [u8; 4] = [10, 244, 1, 19];
const ID_DRAIN: u32 = 109;
/// Backend ids planted in conntrack entries whose backends are gone.
const ID_GONE_TCP: u32 = 999;
const ID_GONE_UDP: u32 = 998;
/// Client ports the generators reuse, so that flows hit conntrack; the planted entries
/// use some of them.
const PORTS: [u16; 6] = [40000, 40001, 40002, 40009, 40010, 40011];
const CLIENTS: [[u8; 4]; 4] = [CLIENT, CLIENT2, [10, 244, 0, 7], OTHER];
const IP_IDS: [u16; 3] = [0x1234, 0x4321, 7];

#[derive(Clone, Copy, Debug)]
struct Flow {
    src: [u8; 4],
    sport: u16,
    dst: [u8; 4],
    dport: u16,
    proto: u8,
}

fn rand_addr(rng: &mut Rng) -> [u8; 4] {
    let addrs = [
        CLIENT,
        CLIENT2,
        OTHER,
        VIP,
        VIP_AFF,
        VIP_REJECT,
        VIP_DROP,
        VIP_HAIRPIN,
        BE_TCP,
        BE_UDP,
        BE_AFF[0],
        BE_AFF[1],
        BE_AFF[2],
        BE_DRAIN,
        ROUTER,
    ];
    if rng.one_in(8) { rng.bytes(4).try_into().expect("4 bytes") } else { rng.pick(&addrs) }
}

fn client_port(rng: &mut Rng) -> u16 {
    if rng.one_in(4) { rng.next_u64() as u16 } else { rng.pick(&PORTS) }
}

/// A flow as the fixtures know them: to a frontend, to another port or address, or
/// a backend's reply.
fn flow(rng: &mut Rng) -> Flow {
    let client = rng.pick(&CLIENTS);
    let cport = client_port(rng);
    let (t, u) = (IPPROTO_TCP, IPPROTO_UDP);
    let fwd = [
        (VIP, 80, t),
        (VIP, 53, u),
        (VIP_AFF, 80, t),
        (VIP_REJECT, 80, t),
        (VIP_REJECT, 53, u),
        (VIP_DROP, 80, t),
        (VIP_HAIRPIN, 80, t),
        (VIP, 81, t),
        (VIP, 80, u),
        (OTHER, 80, t),
        (OTHER, 53, u),
    ];
    let rev = [
        (BE_TCP, 8080, t),
        (BE_UDP, 5353, u),
        (BE_AFF[0], 8080, t),
        (BE_AFF[1], 8080, t),
        (BE_AFF[2], 8080, t),
        (BE_DRAIN, 8080, t),
        (BE_TCP, 8081, t),
    ];
    match rng.below(10) {
        0..=5 => {
            let (dst, dport, proto) = rng.pick(&fwd);
            Flow { src: client, sport: cport, dst, dport, proto }
        }
        6..=8 => {
            let (src, sport, proto) = rng.pick(&rev);
            Flow { src, sport, dst: client, dport: cport, proto }
        }
        _ => {
            if rng.one_in(2) {
                // The hairpin flow's reply: the client, as its own backend, to the ClusterIP.
                Flow { src: CLIENT, sport: 8080, dst: VIP_HAIRPIN, dport: cport, proto: t }
            } else {
                let proto = rng.pick(&[t, u]);
                Flow {
                    src: rand_addr(rng),
                    sport: rng.next_u64() as u16,
                    dst: rand_addr(rng),
                    dport: rng.next_u64() as u16,
                    proto,
                }
            }
        }
    }
}

const TCP_FLAGS: [u8; 8] = [0x02, 0x10, 0x18, 0x11, 0x04, 0x12, 0x14, 0x01];

/// A well-formed frame of `f` (etherparse), TCP flags as given.
fn frame(f: &Flow, tcp_flags: u8, payload: &[u8]) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(MAC_CLIENT, MAC_NODE).ipv4(f.src, f.dst, 64);
    let mut out = Vec::with_capacity(64 + payload.len());
    if f.proto == IPPROTO_TCP {
        b.tcp(f.sport, f.dport, 1000, 64240).write(&mut out, payload).expect("tcp frame");
        out[14 + 20 + 13] = tcp_flags;
        fix_l4(&mut out, 14);
    } else if f.proto == IPPROTO_UDP {
        b.udp(f.sport, f.dport).write(&mut out, payload).expect("udp frame");
    } else {
        b.udp(1, 2).write(&mut out, payload).expect("frame");
        out[14 + 9] = f.proto;
        fix_ipv4(&mut out, 14);
    }
    out
}

/// Ones' complement sum of `b` (RFC 1071), folded, not inverted.
fn sum(mut acc: u32, b: &[u8]) -> u32 {
    let mut chunks = b.chunks_exact(2);
    for c in &mut chunks {
        acc += u16::from_be_bytes([c[0], c[1]]) as u32;
    }
    if let [x] = chunks.remainder() {
        acc += (*x as u32) << 8;
    }
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc
}

/// The parts of an IPv4 packet at `l3` that checksums cover: header length, total
/// length, protocol, and whether it is a fragment. `None` unless a whole header is in
/// the frame.
fn ipv4_at(p: &[u8], l3: usize) -> Option<(usize, usize, u8, bool)> {
    let h = p.get(l3..l3 + 20)?;
    let ihl = (h[0] & 15) as usize * 4;
    if h[0] >> 4 != 4 || ihl < 20 || p.len() < l3 + ihl {
        return None;
    }
    let tot = u16::from_be_bytes([h[2], h[3]]) as usize;
    let frag = u16::from_be_bytes([h[6], h[7]]) & 0x3fff != 0;
    Some((ihl, tot, h[9], frag))
}

fn ipv4_ok(p: &[u8], l3: usize) -> Option<bool> {
    let (ihl, ..) = ipv4_at(p, l3)?;
    Some(sum(0, &p[l3..l3 + ihl]) == 0xffff)
}

fn fix_ipv4(p: &mut [u8], l3: usize) {
    let Some((ihl, ..)) = ipv4_at(p, l3) else { return };
    p[l3 + 10..l3 + 12].fill(0);
    let c = !(sum(0, &p[l3..l3 + ihl]) as u16);
    p[l3 + 10..l3 + 12].copy_from_slice(&c.to_be_bytes());
}

/// The L4 segment of an unfragmented IPv4 packet (TCP, UDP, ICMP) and the offset of
/// its checksum in the frame, if the frame holds all of it.
fn l4_at(p: &[u8], l3: usize) -> Option<(usize, usize, usize)> {
    let (ihl, tot, proto, frag) = ipv4_at(p, l3)?;
    if frag || tot < ihl || p.len() < l3 + tot {
        return None;
    }
    let (l4, len) = (l3 + ihl, tot - ihl);
    let csum = match proto {
        6 if len >= 20 => 16,
        17 if len >= 8 => 6,
        1 if len >= 4 => 2,
        _ => return None,
    };
    Some((l4, len, csum))
}

/// Whether the L4 checksum verifies; `None`: not checkable (or UDP without one).
fn l4_ok(p: &[u8], l3: usize) -> Option<bool> {
    let (l4, len, _) = l4_at(p, l3)?;
    let proto = p[l3 + 9];
    if proto == 17 && p[l4 + 6..l4 + 8] == [0, 0] {
        return None;
    }
    let mut acc = 0;
    if proto != 1 {
        acc = sum(0, &p[l3 + 12..l3 + 20]);
        acc = sum(acc, &[0, proto]);
        acc = sum(acc, &(len as u16).to_be_bytes());
    }
    Some(sum(acc, &p[l4..l4 + len]) == 0xffff)
}

fn fix_l4(p: &mut [u8], l3: usize) {
    let Some((l4, len, c)) = l4_at(p, l3) else { return };
    let proto = p[l3 + 9];
    p[l4 + c..l4 + c + 2].fill(0);
    let mut acc = 0;
    if proto != 1 {
        acc = sum(0, &p[l3 + 12..l3 + 20]);
        acc = sum(acc, &[0, proto]);
        acc = sum(acc, &(len as u16).to_be_bytes());
    }
    let mut v = !(sum(acc, &p[l4..l4 + len]) as u16);
    if proto == 17 && v == 0 {
        v = 0xffff;
    }
    p[l4 + c..l4 + c + 2].copy_from_slice(&v.to_be_bytes());
}

/// Where the IPv4 header starts, behind the Ethernet header and up to 3 tags; `None`
/// for no IPv4 frame.
fn l3_of(p: &[u8]) -> Option<usize> {
    let mut off = 12;
    for _ in 0..4 {
        let t = u16::from_be_bytes([*p.get(off)?, *p.get(off + 1)?]);
        match t {
            0x0800 => return Some(off + 2),
            0x8100 | 0x88a8 => off += 4,
            _ => return None,
        }
    }
    None
}

/// Inserts `bytes` at `at`.
fn insert(p: &mut Vec<u8>, at: usize, bytes: &[u8]) {
    let at = at.min(p.len());
    p.splice(at..at, bytes.iter().copied());
}

fn set_u16(p: &mut [u8], off: usize, v: u16) {
    if let Some(s) = p.get_mut(off..off + 2) {
        s.copy_from_slice(&v.to_be_bytes());
    }
}

/// An ICMP error (or echo) from somewhere, quoting a packet of one of our flows as it
/// looks on the other side of the NAT, or garbage, whole or cut short.
fn icmp_packet(rng: &mut Rng) -> Vec<u8> {
    let f = flow(rng);
    // The quoted packet: after DNAT (client -> backend), or as the datapath sent the
    // reply (ClusterIP -> client); or just a flow of the catalogue.
    let quoted_flow = match rng.below(3) {
        0 => match f.proto {
            IPPROTO_UDP => Flow { dst: BE_UDP, dport: 5353, ..f },
            _ => Flow { dst: rng.pick(&[BE_TCP, BE_AFF[0], BE_DRAIN, CLIENT]), dport: 8080, ..f },
        },
        1 => Flow { src: rng.pick(&[VIP, VIP_HAIRPIN]), sport: rng.pick(&[80, 53]), dst: f.src, dport: f.sport, ..f },
        _ => f,
    };
    let inner = frame(&quoted_flow, rng.pick(&TCP_FLAGS), &rng.bytes_upto(0, 40));
    let mut quote = inner[14..].to_vec();
    match rng.below(6) {
        0 => quote.truncate(28),
        1 => quote.truncate(rng.below(quote.len() as u64 + 1) as usize),
        2 => quote = rng.bytes_upto(0, 64),
        3 => {
            let i = rng.below(quote.len() as u64) as usize;
            quote[i] = rng.next_u64() as u8;
        }
        _ => {}
    }
    let ty = match rng.below(8) {
        0 => Icmpv4Type::TimeExceeded(etherparse::icmpv4::TimeExceededCode::TtlExceededInTransit),
        1 => Icmpv4Type::ParameterProblem(etherparse::icmpv4::ParameterProblemHeader::PointerIndicatesError(4)),
        2 => Icmpv4Type::EchoRequest(etherparse::IcmpEchoHeader { id: 7, seq: 1 }),
        3 => Icmpv4Type::DestinationUnreachable(etherparse::icmpv4::DestUnreachableHeader::FragmentationNeeded {
            next_hop_mtu: 1400,
        }),
        _ => Icmpv4Type::DestinationUnreachable(etherparse::icmpv4::DestUnreachableHeader::Port),
    };
    let (src, dst) = match rng.below(4) {
        // Toward the quoted packet's sender, from its destination or a router.
        0 | 1 => (rng.pick(&[quoted_flow.dst, ROUTER]), quoted_flow.src),
        2 => (rng.pick(&[ROUTER, quoted_flow.dst]), rng.pick(&[VIP, VIP_HAIRPIN, CLIENT])),
        _ => (rand_addr(rng), rand_addr(rng)),
    };
    let mut out = Vec::new();
    PacketBuilder::ethernet2(MAC_CLIENT, MAC_NODE)
        .ipv4(src, dst, 64)
        .icmpv4(ty)
        .write(&mut out, &quote)
        .expect("icmp frame");
    if rng.one_in(10) {
        out[14 + 20] = rng.next_u64() as u8;
        fix_l4(&mut out, 14);
    }
    out
}

/// Fully random bytes, or random behind a plausible Ethernet and IPv4 start.
fn random_packet(rng: &mut Rng) -> Vec<u8> {
    let len = rng.below(160) as usize;
    let mut p = rng.bytes(len);
    match rng.below(4) {
        0 => {}
        1 => {
            if p.len() >= 14 {
                p[12..14].copy_from_slice(&rng.pick(&[0x0800u16, 0x8100, 0x88a8, 0x86dd, 0x0806]).to_be_bytes());
            }
        }
        _ => {
            p.resize(p.len().max(34), 0);
            p[12..14].copy_from_slice(&[0x08, 0x00]);
            p[14] = 0x45;
            let any = rng.next_u64() as u8;
            p[23] = rng.pick(&[1, 6, 17, 47, any]);
            p[26..30].copy_from_slice(&rand_addr(rng));
            p[30..34].copy_from_slice(&rand_addr(rng));
            if rng.one_in(2) {
                let tot = (p.len() - 14) as u16;
                set_u16(&mut p, 16, tot);
                fix_ipv4(&mut p, 14);
            }
        }
    }
    p
}

/// Generated packets: first every truncation of each fixture-like packet, then random
/// generators. `pending` keeps follow-ups (a fragment after its first fragment).
pub struct Generator {
    rng: Rng,
    sweep: Vec<Vec<u8>>,
    pending: VecDeque<(Vec<u8>, &'static str)>,
}

impl Generator {
    pub fn new(seed: u64) -> Self {
        let mut rng = Rng::new(seed);
        // The sweep: every truncation of a TCP SYN, a UDP datagram, an ICMP error quoting
        // a flow, each bare and behind a VLAN tag.
        let mut sweep = Vec::new();
        let tcp = frame(&Flow { src: CLIENT, sport: 40000, dst: VIP, dport: 80, proto: IPPROTO_TCP }, 0x02, b"x");
        let udp = frame(&Flow { src: CLIENT, sport: 40001, dst: VIP, dport: 53, proto: IPPROTO_UDP }, 0, b"query?");
        let icmp = icmp_packet(&mut rng);
        for base in [tcp, udp, icmp] {
            let mut tagged = base.clone();
            insert(&mut tagged, 12, &[0x81, 0x00, 0x00, 42]);
            for p in [base, tagged] {
                for n in 0..=p.len() {
                    sweep.push(p[..n].to_vec());
                }
            }
        }
        sweep.reverse();
        Self { rng, sweep, pending: VecDeque::new() }
    }

    pub fn next_packet(&mut self) -> (Vec<u8>, &'static str) {
        if let Some(p) = self.sweep.pop() {
            return (p, "truncation_sweep");
        }
        if let Some(p) = self.pending.pop_front() {
            return p;
        }
        let rng = &mut self.rng;
        let g = rng.below(100);
        if g < 10 {
            return (random_packet(rng), "random_bytes");
        }
        if g < 20 {
            return (icmp_packet(rng), "icmp_error");
        }
        let f = flow(rng);
        let any = rng.next_u64() as u8;
        let f = if rng.one_in(20) { Flow { proto: rng.pick(&[1, 47, 132, any]), ..f } } else { f };
        let payload = rng.bytes_upto(0, 48);
        let mut p = frame(&f, if rng.one_in(4) { rng.next_u64() as u8 } else { rng.pick(&TCP_FLAGS) }, &payload);
        let l3 = 14;
        let name = match g {
            20..=49 => "fixture",
            50..=54 => {
                p.truncate(rng.below(p.len() as u64 + 1) as usize);
                "truncated"
            }
            55..=59 => {
                p[l3] = (p[l3] & 0xf0) | rng.below(16) as u8;
                if rng.one_in(4) {
                    p[l3] = rng.next_u64() as u8;
                }
                fix_ipv4(&mut p, l3);
                "bad_ihl"
            }
            60..=64 => {
                let tot = (p.len() - l3) as u16;
                let any = rng.next_u64() as u16;
                let v = rng.pick(&[0, 1, 19, 20, tot - 1, tot + 1, 0xffff, any]);
                set_u16(&mut p, l3 + 2, v);
                fix_ipv4(&mut p, l3);
                "bad_total_length"
            }
            65..=74 => {
                // A first fragment, and often a later one of the same datagram after it.
                let id = rng.pick(&IP_IDS);
                set_u16(&mut p, l3 + 4, id);
                let off: u16 = rng.pick(&[0, 1, 3, 185, 0x1fff]);
                let mf = rng.one_in(2) || off == 0;
                set_u16(&mut p, l3 + 6, off | if mf { 0x2000 } else { 0 });
                fix_ipv4(&mut p, l3);
                if off == 0 && rng.one_in(2) {
                    let mut later = p.clone();
                    later.truncate(l3 + 20);
                    later.extend(rng.bytes_upto(8, 40));
                    let tot = (later.len() - l3) as u16;
                    set_u16(&mut later, l3 + 2, tot);
                    set_u16(&mut later, l3 + 6, 185 | if rng.one_in(2) { 0x2000 } else { 0 });
                    fix_ipv4(&mut later, l3);
                    self.pending.push_back((later, "fragment_later"));
                }
                "fragment"
            }
            75..=82 => {
                for _ in 0..rng.below(4) {
                    let tpid: u16 = rng.pick(&[0x8100, 0x88a8]);
                    let tci = rng.next_u64() as u16;
                    let mut tag = tpid.to_be_bytes().to_vec();
                    tag.extend(tci.to_be_bytes());
                    insert(&mut p, 12, &tag);
                }
                "vlan_stack"
            }
            83..=88 => {
                let words = 1 + rng.below(10) as usize;
                let opts = if rng.one_in(2) { vec![1u8; words * 4] } else { rng.bytes(words * 4) };
                insert(&mut p, l3 + 20, &opts);
                p[l3] = 0x40 | (5 + words as u8);
                let tot = (p.len() - l3) as u16;
                set_u16(&mut p, l3 + 2, tot);
                fix_ipv4(&mut p, l3);
                fix_l4(&mut p, l3);
                "ip_options"
            }
            89..=93 if f.proto == IPPROTO_TCP => {
                let words = rng.below(11) as usize;
                let opts = if rng.one_in(2) { [2, 4, 5, 0xb4].repeat(words) } else { rng.bytes(words * 4) };
                insert(&mut p, l3 + 40, &opts);
                p[l3 + 32] = if rng.one_in(5) { rng.next_u64() as u8 } else { ((5 + words) as u8) << 4 };
                let tot = (p.len() - l3) as u16;
                set_u16(&mut p, l3 + 2, tot);
                fix_ipv4(&mut p, l3);
                fix_l4(&mut p, l3);
                "tcp_options"
            }
            _ => {
                for _ in 0..1 + rng.below(4) {
                    let i = rng.below(p.len() as u64) as usize;
                    p[i] = rng.next_u64() as u8;
                }
                if rng.one_in(2)
                    && let Some(l3) = l3_of(&p)
                {
                    fix_ipv4(&mut p, l3);
                    fix_l4(&mut p, l3);
                }
                "byte_flips"
            }
        };
        if rng.one_in(20) {
            p.extend(rng.bytes_upto(1, 20));
        }
        (p, name)
    }
}

// ---- Map state ----

/// Conntrack entries the setup plants whose backends are gone, on purpose: key ->
/// backend id. The datapath may keep them (a dropped packet does not delete its entry).
type Planted = StdHashMap<CtKey4, u32>;

fn ct_pair(dp: &mut Datapath, key: CtKey4, fwd: CtValue4) -> Result<()> {
    let (rk, rv) = fwd.other_half(&key);
    dp.put_conntrack(key, fwd)?;
    dp.put_conntrack(rk, rv)
}

/// The fixtures' services, flows started through the datapath, and planted entries:
/// a flow to a draining backend, TCP and UDP flows whose backend is gone, expired
/// flows, and a flow that lost its reply half.
fn setup(dp: &mut Datapath) -> Result<Planted> {
    fixtures::base(dp)?;
    dp.put_draining(SVC_TCP, ID_DRAIN, &s(BE_DRAIN), 8080)?;
    for c in CLIENTS {
        for (i, port) in PORTS[..3].iter().enumerate() {
            let (dst, dport, proto) = [(VIP, 80, IPPROTO_TCP), (VIP, 53, IPPROTO_UDP), (VIP_AFF, 80, IPPROTO_TCP)][i];
            let p = frame(&Flow { src: c, sport: *port, dst, dport, proto }, 0x02, b"");
            dp.run(Hook::Xdp, &p, 1)?;
        }
    }
    let now = ct_now();
    let old_epoch = dp.epoch() - 1;
    let key = |port: u16, dst: [u8; 4], dport: u16, proto| {
        CtKey4::new(ip(&s(CLIENT)), ip(&s(dst)), port.to_be(), dport.to_be(), proto)
    };
    let val = |be: [u8; 4], port: u16, svc_id, backend_id, seen| CtValue4 {
        nat_addr_be: ip(&s(be)),
        nat_port_be: port.to_be(),
        dir: CT_DIR_FORWARD,
        flags: CT_F_REPLIED,
        svc_id,
        backend_id,
        slot: 1,
        seen,
        epoch: old_epoch,
        created: seen,
    };
    let mut planted = Planted::new();
    ct_pair(dp, key(40009, VIP, 80, IPPROTO_TCP), val(BE_DRAIN, 8080, SVC_TCP, ID_DRAIN, now))?;
    let k = key(40010, VIP, 80, IPPROTO_TCP);
    let v = val([10, 244, 1, 99], 8080, SVC_TCP, ID_GONE_TCP, now);
    ct_pair(dp, k, v)?;
    planted.insert(k, ID_GONE_TCP);
    planted.insert(v.other_half(&k).0, ID_GONE_TCP);
    let k = key(40011, VIP, 53, IPPROTO_UDP);
    let v = val([10, 244, 1, 98], 5353, SVC_UDP, ID_GONE_UDP, now);
    ct_pair(dp, k, v)?;
    planted.insert(k, ID_GONE_UDP);
    planted.insert(v.other_half(&k).0, ID_GONE_UDP);
    // Expired: a day old, on CLIENT2.
    for (port, dst, dport, proto, be, bport, svc_id, id) in [
        (40000, VIP, 80, IPPROTO_TCP, BE_TCP, 8080, SVC_TCP, 101),
        (40001, VIP, 53, IPPROTO_UDP, BE_UDP, 5353, SVC_UDP, 201),
    ] {
        let k = CtKey4::new(ip(&s(CLIENT2)), ip(&s(dst)), u16::to_be(port), u16::to_be(dport), proto);
        ct_pair(dp, k, CtValue4 { epoch: dp.epoch(), ..val(be, bport, svc_id, id, now.wrapping_sub(200_000)) })?;
    }
    // A flow whose reply half is lost.
    let k = CtKey4::new(ip("10.244.0.7"), ip(&s(VIP)), 40002u16.to_be(), 80u16.to_be(), IPPROTO_TCP);
    let v = CtValue4 { epoch: dp.epoch(), ..val(BE_TCP, 8080, SVC_TCP, 101, now) };
    ct_pair(dp, k, v)?;
    dp.remove_conntrack(&v.other_half(&k).0)?;
    Ok(planted)
}

fn draining_values(d: &[(DrainKey, BackendValue)]) -> Vec<(BackendKey, BackendValue)> {
    d.iter().map(|(k, v)| (BackendKey { svc_id: k.svc_id, slot: 0 }, *v)).collect()
}

fn all<K: aya::Pod, V: aya::Pod>(dp: &mut Datapath, name: &str) -> Vec<(K, V)> {
    let m: HashMap<&mut MapData, K, V> =
        HashMap::try_from(dp.ebpf.map_mut(name).expect("map in object")).expect("hash map type");
    m.iter().filter_map(|r| r.ok()).collect()
}

/// The map invariants the datapath must keep: every conntrack entry names a service
/// and a backend of it that exist (in its slots or draining), unless it is one the
/// setup planted dangling; a forward half validated under the current epoch (and not
/// draining) has its backend at its slot; a forward half NATs to its backend, a reply half to a
/// frontend of its service; two halves that both exist agree on service, backend and
/// state; every affinity entry names a backend at its slot of an affinity service;
/// every `FRAGS` entry names a flow in conntrack. Returns the first violation.
pub fn check_maps(dp: &mut Datapath, planted: &StdHashMap<CtKey4, u32>) -> Result<(), String> {
    let services: Vec<(ServiceKey4, ServiceValue)> = all(dp, map_names::SERVICES);
    let backends: Vec<(BackendKey, BackendValue)> = all(dp, map_names::BACKENDS);
    let draining: Vec<(DrainKey, BackendValue)> = all(dp, map_names::DRAINING);
    let by_id: StdHashMap<u32, ServiceValue> =
        services.iter().filter(|(_, v)| v.id != 0).map(|(_, v)| (v.id, *v)).collect();
    let slots: StdHashMap<(u32, u32), BackendValue> = backends.iter().map(|(k, v)| ((k.svc_id, k.slot), *v)).collect();
    let find = |svc_id: u32, id: u32| {
        backends
            .iter()
            .find(|(k, v)| k.svc_id == svc_id && v.backend_id == id)
            .map(|(_, v)| *v)
            .or_else(|| draining.iter().find(|(k, _)| k.svc_id == svc_id && k.backend_id == id).map(|(_, v)| *v))
    };
    let ct: StdHashMap<CtKey4, CtValue4> = dp.conntrack().into_iter().collect();
    let epoch = dp.epoch();
    for (k, v) in &ct {
        if v.dir != CT_DIR_FORWARD && v.dir != CT_DIR_REPLY {
            return Err(format!("conntrack {k:?} has direction {}: {v:?}", v.dir));
        }
        if !by_id.contains_key(&v.svc_id) {
            return Err(format!("conntrack {k:?} names service {} which does not exist: {v:?}", v.svc_id));
        }
        match find(v.svc_id, v.backend_id) {
            None if planted.get(k) == Some(&v.backend_id) => continue,
            None => {
                return Err(format!(
                    "conntrack {k:?} names backend {} of service {}, which does not exist: {v:?}",
                    v.backend_id, v.svc_id
                ));
            }
            Some(b) if v.dir == CT_DIR_FORWARD && (b.addr_be, b.port_be) != (v.nat_addr_be, v.nat_port_be) => {
                return Err(format!("forward conntrack {k:?} NATs elsewhere than its backend {b:?}: {v:?}"));
            }
            Some(b) if v.dir == CT_DIR_REPLY && (b.addr_be, b.port_be) != (k.src_addr_be, k.src_port_be) => {
                return Err(format!("reply conntrack {k:?} is not from its backend {b:?}: {v:?}"));
            }
            Some(_) => {}
        }
        // Validated under the current epoch and not draining: its slot holds it (the
        // datapath trusts the entry without a lookup until the epoch moves).
        if v.dir == CT_DIR_FORWARD
            && v.epoch == epoch
            && v.flags & CT_F_DRAINING == 0
            && slots.get(&(v.svc_id, v.slot)).map(|b| b.backend_id) != Some(v.backend_id)
        {
            return Err(format!("forward conntrack {k:?} is current but its slot holds another backend: {v:?}"));
        }
        if v.dir == CT_DIR_REPLY {
            let fe = ServiceKey4::new(v.nat_addr_be, v.nat_port_be, k.proto);
            if !services.iter().any(|(sk, sv)| *sk == fe && sv.id == v.svc_id) {
                return Err(format!(
                    "reply conntrack {k:?} NATs to {fe:?}, no frontend of service {}: {v:?}",
                    v.svc_id
                ));
            }
        }
        let (ok, ov) = v.other_half(k);
        if let Some(o) = ct.get(&ok)
            && (o.svc_id, o.backend_id, o.flags & CT_F_STATE, o.dir)
                != (ov.svc_id, ov.backend_id, v.flags & CT_F_STATE, ov.dir)
        {
            return Err(format!("conntrack halves disagree: {k:?} {v:?} and {ok:?} {o:?}"));
        }
    }
    for (k, v) in all::<lb_common::AffinityKey4, lb_common::AffinityValue>(dp, map_names::AFFINITY) {
        let affine = by_id.get(&k.svc_id).is_some_and(|s| s.flags & SVC_F_AFFINITY != 0);
        let at_slot = slots.get(&(k.svc_id, v.slot)).is_some_and(|b| b.backend_id == v.backend_id);
        if !affine || !at_slot {
            return Err(format!("affinity {k:?} -> {v:?}: no affinity service, or no such backend at that slot"));
        }
    }
    // A datagram's entry outlives its flow (both age out on their own), so it names
    // what the first fragment was: a packet to a frontend, or from a backend.
    let planted_from: Vec<(u32, u16)> = planted
        .keys()
        .filter_map(|k| ct.get(k).filter(|v| v.dir == CT_DIR_REPLY).map(|_| (k.src_addr_be, k.src_port_be)))
        .collect();
    for (k, v) in dp.frags() {
        let to_frontend = services
            .iter()
            .any(|(sk, sv)| *sk == ServiceKey4::new(k.dst_addr_be, v.dst_port_be, k.proto) && sv.id != 0);
        let from_backend = backends
            .iter()
            .chain(&draining_values(&draining))
            .any(|(_, b)| (b.addr_be, b.port_be) == (k.src_addr_be, v.src_port_be))
            || planted_from.contains(&(k.src_addr_be, v.src_port_be));
        if (k.proto != IPPROTO_TCP && k.proto != IPPROTO_UDP) || !(to_frontend || from_backend) {
            return Err(format!("fragment entry {k:?} -> {v:?} is of no packet to a frontend or from a backend"));
        }
    }
    Ok(())
}

// ---- Checks per packet ----

/// Whether BPF_PROG_TEST_RUN refuses the frame before the program runs: shorter than
/// an Ethernet header; and for skb programs an IPv4 (IPv6) frame that does not hold a
/// whole IPv4 (IPv6) header (net/bpf/test_run.c, `bpf_prog_test_run_skb`:
/// `pskb_may_pull` of the network header after `eth_type_trans`).
pub fn kernel_refuses(hook: Hook, p: &[u8]) -> bool {
    if p.len() < 14 {
        return true;
    }
    if hook == Hook::Xdp {
        return false;
    }
    let et = u16::from_be_bytes([p[12], p[13]]);
    (et == 0x0800 && p.len() < 14 + 20) || (et == 0x86dd && p.len() < 14 + 40)
}

fn counters(dp: &mut Datapath) -> Vec<(u64, u64)> {
    Reason::ALL.iter().map(|r| dp.stat(*r)).map(|c| (c.packets, c.bytes)).collect()
}

fn verdict_of(reason: Reason, hook: Hook) -> Option<Verdict> {
    use Reason::*;
    Some(match reason {
        PassNotIpv4 | PassNotService | PassUnknownPort | PassIcmp | PassMalformedL3 | PassOtherProto | PassEgress
        | FwdNew | FwdEstablished | RevNat | FwdDraining | IcmpErrorNat => Verdict::Pass,
        NoBackendDrop | DropFragment | DropMalformedL4 | DropBackendGone => Verdict::Drop,
        NoBackendReject => Verdict::Bounce,
        RewriteFailed => {
            if hook == Hook::Xdp {
                Verdict::Aborted
            } else {
                Verdict::Drop
            }
        }
        _ => return None,
    })
}

/// Output checks for the verdict `reason`.
fn check_output(reason: Reason, input: &[u8], out: &[u8]) -> Result<(), String> {
    use Reason::*;
    match reason {
        PassNotIpv4 | PassNotService | PassUnknownPort | PassIcmp | PassMalformedL3 | PassOtherProto | PassEgress
            if out != input =>
        {
            return Err("handed on unchanged, but the bytes differ from the input".into());
        }
        FwdNew | FwdEstablished | RevNat | FwdDraining => {
            if out.len() != input.len() {
                return Err(format!("NAT changed the length {} -> {}", input.len(), out.len()));
            }
            let l3 = l3_of(input).ok_or("NAT of a frame that is no IPv4")?;
            let (ihl, _, _, frag) = ipv4_at(input, l3).ok_or("NAT of a truncated IPv4 header")?;
            let later = u16::from_be_bytes([input[l3 + 6], input[l3 + 7]]) & 0x1fff != 0;
            let l4 = l3 + ihl;
            let csum = if input[l3 + 9] == IPPROTO_TCP { 16 } else { 6 };
            for (i, (a, b)) in input.iter().zip(out).enumerate() {
                let ip_field = (l3 + 10..l3 + 20).contains(&i);
                let l4_field = !later && ((l4..l4 + 4).contains(&i) || (l4 + csum..l4 + csum + 2).contains(&i));
                if a != b && !ip_field && !l4_field {
                    return Err(format!(
                        "NAT changed byte {i} ({a:#04x} -> {b:#04x}), outside addresses, ports, checksums"
                    ));
                }
            }
            check_sums(input, out, l3, !frag)?;
        }
        IcmpErrorNat => {
            if out.len() != input.len() {
                return Err(format!("ICMP translation changed the length {} -> {}", input.len(), out.len()));
            }
            let l3 = l3_of(input).ok_or("ICMP translation of a frame that is no IPv4")?;
            check_sums(input, out, l3, true)?;
            let (ihl, ..) = ipv4_at(input, l3).ok_or("truncated")?;
            let inner = l3 + ihl + 8;
            if ipv4_ok(input, inner) == Some(true) && ipv4_ok(out, inner) != Some(true) {
                return Err("the quoted IPv4 header checksum was valid and is not after the translation".into());
            }
        }
        NoBackendReject => {
            let l3 = l3_of(out).ok_or("the rejection is no IPv4 frame")?;
            if out[l3 + 9] != 1 || ipv4_ok(out, l3) != Some(true) || l4_ok(out, l3) != Some(true) {
                return Err("the ICMP rejection has a bad IPv4 or ICMP checksum".into());
            }
            let il3 = l3_of(input).ok_or("rejected a frame that is no IPv4")?;
            if out[l3 + 12..l3 + 16] != input[il3 + 16..il3 + 20] || out[l3 + 16..l3 + 20] != input[il3 + 12..il3 + 16]
            {
                return Err("the ICMP rejection does not go back from the ClusterIP to the client".into());
            }
        }
        _ => {}
    }
    Ok(())
}

/// Every checksum that verified in `input` verifies in `out`.
fn check_sums(input: &[u8], out: &[u8], l3: usize, l4: bool) -> Result<(), String> {
    if ipv4_ok(input, l3) == Some(true) && ipv4_ok(out, l3) != Some(true) {
        return Err("the IPv4 header checksum was valid and is not after the rewrite".into());
    }
    if l4 && l4_ok(input, l3) == Some(true) && l4_ok(out, l3) != Some(true) {
        return Err("the L4 checksum was valid and is not after the rewrite".into());
    }
    if input.get(l3 + 9) == Some(&IPPROTO_UDP)
        && let Some((o, ..)) = l4_at(input, l3)
        && input[o + 6..o + 8] == [0, 0]
        && out[o + 6..o + 8] != [0, 0]
    {
        return Err("a UDP checksum of 0 (none) was changed".into());
    }
    Ok(())
}

/// The packet as a fixture of lb-userspace/tests/datapath.rs, with what was observed.
fn fixture(p: &[u8], verdict: Option<Verdict>, reasons: &[Reason]) -> String {
    let mut bytes = String::new();
    for (i, b) in p.iter().enumerate() {
        if i % 16 == 0 {
            bytes.push_str("\n        ");
        }
        let _ = write!(bytes, "0x{b:02x}, ");
    }
    let reasons: Vec<String> = reasons.iter().map(|r| format!("{r:?}")).collect();
    format!(
        "    case(\n        \"fuzz: <what it shows>\",\n        raw(&[{bytes}\n        ]),\n        {},\n        Expect::Unchanged, // <what the program must hand on>\n        &[{}],\n    ),\n\
         (observed verdict and reasons; fix them to the expected ones. The map state was the fixtures' `base` plus \
         the fuzzer's setup and the packets before this one: `cargo xtask fuzz --seed` with the same seed replays it)",
        verdict.map_or("<verdict>".to_string(), |v| format!("{v:?}")),
        reasons.join(", ")
    )
}

/// Runs the fuzzer; the first failed check is the error.
pub fn run(opts: &Options) -> Result<Report> {
    let t0 = Instant::now();
    let mut dp = Datapath::load().context("loading the datapath; run as root")?;
    let mut planted = setup(&mut dp)?;
    let mut generator = Generator::new(opts.seed);
    let mut report = Report { packets: opts.packets, ..Default::default() };
    let mut before = counters(&mut dp);
    for i in 0..opts.packets {
        let (input, name) = generator.next_packet();
        *report.generators.entry(name).or_default() += 1;
        for &hook in &opts.hooks {
            let fail = |check: String, verdict: Option<Verdict>, reasons: &[Reason]| {
                anyhow::anyhow!(
                    "fuzz failure: seed {} packet {i} ({name}) hook {}: {check}\n{}",
                    opts.seed,
                    hook_name(hook),
                    fixture(&input, verdict, reasons)
                )
            };
            // tc runs get a CHECKSUM_COMPLETE skb, so that the kernel also checks that
            // the program kept `skb->csum` right (EBADMSG otherwise).
            let mut stale_csum = false;
            let res = if opts.csum_complete && hook != Hook::Xdp {
                match run_tc_csum_complete(&dp.ebpf, hook, &input)? {
                    Ok((v, out)) => Ok((v, out, 0)),
                    Err(e) => {
                        stale_csum = e.raw_os_error() == Some(libc::EBADMSG);
                        Err(anyhow::Error::from(e))
                    }
                }
            } else {
                dp.run(hook, &input, 1)
            };
            let after = counters(&mut dp);
            let moved: Vec<(Reason, u64, u64)> = Reason::ALL
                .iter()
                .zip(before.iter().zip(&after))
                .filter(|(_, (b, a))| a.0 != b.0)
                .map(|(r, (b, a))| (*r, a.0 - b.0, a.1 - b.1))
                .collect();
            before = after;
            let reasons: Vec<Reason> = moved.iter().map(|m| m.0).collect();
            let mut res = res;
            if stale_csum && reasons == [Reason::NoBackendReject] {
                // `bpf_skb_change_tail` drops the skb to CHECKSUM_NONE, and test_run
                // still compares `skb->csum`: no finding. The rejection writes no map,
                // so it runs again, as CHECKSUM_NONE, for the checks below.
                *report.csum_exempt.entry(hook_name(hook)).or_default() += 1;
                res = dp.run(hook, &input, 1);
                before = counters(&mut dp);
                stale_csum = false;
            }
            let (verdict, out) = match res {
                Err(_) if stale_csum => {
                    return Err(fail("skb->csum stale after the program (test_run: EBADMSG)".into(), None, &reasons));
                }
                Err(e) => {
                    if kernel_refuses(hook, &input) && moved.is_empty() {
                        *report.refused.entry(hook_name(hook)).or_default() += 1;
                        continue;
                    }
                    return Err(fail(format!("test_run failed: {e:#}"), None, &reasons));
                }
                Ok((v, out, _)) => (v, out),
            };
            if kernel_refuses(hook, &input) {
                return Err(fail("test_run ran a frame it was expected to refuse".into(), Some(verdict), &reasons));
            }
            *report.runs.entry(hook_name(hook)).or_default() += 1;
            let verdicts: Vec<&(Reason, u64, u64)> = moved.iter().filter(|m| m.0.is_verdict()).collect();
            if moved.iter().any(|m| m.0.is_socket()) {
                return Err(fail("a socket-LB reason was counted for a packet".into(), Some(verdict), &reasons));
            }
            let &[&(reason, n, bytes)] = verdicts.as_slice() else {
                return Err(fail(format!("{} verdicts counted, not one", verdicts.len()), Some(verdict), &reasons));
            };
            let want_bytes = if reason == Reason::RewriteFailed { 0 } else { input.len() as u64 };
            if n != 1 || bytes != want_bytes {
                return Err(fail(
                    format!(
                        "verdict {} counted {n} times with {bytes} bytes, not once with {want_bytes}",
                        reason.name()
                    ),
                    Some(verdict),
                    &reasons,
                ));
            }
            for &(r, n, _) in &moved {
                *report.reasons.entry((hook_name(hook), r.name())).or_default() += n;
            }
            if verdict_of(reason, hook) != Some(verdict) {
                return Err(fail(
                    format!("verdict {verdict:?} does not go with reason {}", reason.name()),
                    Some(verdict),
                    &reasons,
                ));
            }
            if let Err(e) = check_output(reason, &input, &out) {
                return Err(fail(e, Some(verdict), &reasons));
            }
        }
        let last = i + 1 == opts.packets;
        if (i + 1) % opts.check_every == 0 || last {
            report.map_checks += 1;
            if let Err(e) = check_maps(&mut dp, &planted) {
                let first = i - i % opts.check_every;
                bail!(
                    "fuzz failure: seed {} packets {first}..={i}: map check: {e}\nthe last packet ({name}), which with \
                     --check-every 1 is the one that broke the maps:\n{}",
                    opts.seed,
                    fixture(&input, None, &[])
                );
            }
        }
        if (i + 1) % opts.reset_every == 0 && !last {
            dp.reset()?;
            planted = setup(&mut dp)?;
            before = counters(&mut dp);
        }
    }
    report.elapsed = t0.elapsed();
    Ok(report)
}
