//! ICMP errors quoting NATed flows (lb-ebpf/src/icmp.rs), as packet fixtures through
//! both entry points with BPF_PROG_TEST_RUN, in the style of tests/datapath.rs: every
//! case sets up conntrack by sending the flow's first packet through the program, then
//! feeds an ICMP error built with etherparse and compares what comes out byte for byte
//! with the error as it must look after translation (built from the translated quoted
//! packet, so that etherparse computes every checksum afresh), and checks the ICMP,
//! outer and inner IPv4 checksums of the output independently.
//!
//! Needs root (BPF program load).

use etherparse::{
    Icmpv4Type, IpHeaders, IpNumber, Ipv4Header, NetHeaders, PacketBuilder, PacketHeaders, TransportHeader, VlanId,
    icmpv4::{DestUnreachableHeader, TimeExceededCode},
};
use lb_common::{Counter, IPPROTO_TCP, IPPROTO_UDP, Reason, ServiceValue, map_names};
use lb_testing::{Datapath, Hook, Verdict};

const MAC_A: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
const MAC_B: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];

const CLIENT: [u8; 4] = [10, 244, 0, 5];
/// A router between the node and the backends.
const ROUTER: [u8; 4] = [10, 244, 9, 1];
/// TCP 80 -> 10.244.1.11:8080; UDP 53 -> 10.244.1.21:5353.
const VIP: [u8; 4] = [10, 96, 0, 10];
const BE_TCP: [u8; 4] = [10, 244, 1, 11];
const BE_UDP: [u8; 4] = [10, 244, 1, 21];
/// TCP 80 whose only backend is CLIENT itself (hairpin).
const VIP_HAIRPIN: [u8; 4] = [10, 96, 0, 50];

const SVC_TCP: u32 = 1;
const SVC_UDP: u32 = 2;
const SVC_HAIRPIN: u32 = 7;

fn s(a: [u8; 4]) -> String {
    std::net::Ipv4Addr::from(a).to_string()
}

fn base(dp: &mut Datapath) {
    let svc = |id| ServiceValue { id, count: 1, ..Default::default() };
    dp.put_service(&s(VIP), 80, IPPROTO_TCP, svc(SVC_TCP)).unwrap();
    dp.put_backends(SVC_TCP, &[(101, &s(BE_TCP), 8080)]).unwrap();
    dp.put_service(&s(VIP), 53, IPPROTO_UDP, svc(SVC_UDP)).unwrap();
    dp.put_backends(SVC_UDP, &[(201, &s(BE_UDP), 5353)]).unwrap();
    dp.put_service(&s(VIP_HAIRPIN), 80, IPPROTO_TCP, svc(SVC_HAIRPIN)).unwrap();
    dp.put_backends(SVC_HAIRPIN, &[(701, &s(CLIENT), 8080)]).unwrap();
}

#[derive(Clone, Copy, Debug)]
enum L4 {
    Tcp { syn: bool },
    Udp { zero_csum: bool },
}

/// An IPv4 TCP or UDP packet: a flow's packet on the wire, or the quote of one.
#[derive(Clone, Debug)]
struct Ip {
    src: [u8; 4],
    sport: u16,
    dst: [u8; 4],
    dport: u16,
    l4: L4,
    payload: Vec<u8>,
    options: Vec<u8>,
}

fn tcp(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16) -> Ip {
    Ip { src, sport, dst, dport, l4: L4::Tcp { syn: false }, payload: vec![0x5a; 1400], options: vec![] }
}

fn syn(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16) -> Ip {
    Ip { l4: L4::Tcp { syn: true }, payload: vec![], ..tcp(src, sport, dst, dport) }
}

fn udp(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16) -> Ip {
    Ip { l4: L4::Udp { zero_csum: false }, payload: b"query?".to_vec(), ..tcp(src, sport, dst, dport) }
}

impl Ip {
    fn header(&self, proto: IpNumber) -> Ipv4Header {
        let mut h = Ipv4Header::new(0, 64, proto, self.src, self.dst).unwrap();
        h.identification = 0x4321;
        h.dont_fragment = true;
        h.options = self.options.as_slice().try_into().unwrap();
        h
    }

    /// The IPv4 packet without L2.
    fn ip_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        match self.l4 {
            L4::Tcp { syn } => {
                let b = PacketBuilder::ip(IpHeaders::Ipv4(self.header(IpNumber::TCP), Default::default()));
                let mut b = b.tcp(self.sport, self.dport, 1000, 64240);
                b = if syn { b.syn() } else { b.ack(5000) };
                b.write(&mut out, &self.payload).unwrap();
            }
            L4::Udp { zero_csum } => {
                let b = PacketBuilder::ip(IpHeaders::Ipv4(self.header(IpNumber::UDP), Default::default()));
                b.udp(self.sport, self.dport).write(&mut out, &self.payload).unwrap();
                if zero_csum {
                    let off = 20 + self.options.len() + 6;
                    out[off..off + 2].copy_from_slice(&[0, 0]);
                }
            }
        }
        out
    }

    /// As an Ethernet frame, for the packets that set up conntrack.
    fn frame(&self) -> Vec<u8> {
        let mut out = [0u8; 14].to_vec();
        out[..6].copy_from_slice(&MAC_B);
        out[6..12].copy_from_slice(&MAC_A);
        out[12..14].copy_from_slice(&[0x08, 0x00]);
        out.extend(self.ip_bytes());
        out
    }
}

/// An ICMP error from `src` to `dst` quoting the first `quote` bytes of `inner`.
#[derive(Clone, Debug)]
struct IcmpErr {
    src: [u8; 4],
    dst: [u8; 4],
    icmp: Icmpv4Type,
    inner: Ip,
    /// `None`: the whole packet.
    quote: Option<usize>,
    options: Vec<u8>,
    vlan: Option<u16>,
}

fn frag_needed(src: [u8; 4], dst: [u8; 4], inner: Ip, quote: Option<usize>) -> IcmpErr {
    IcmpErr {
        src,
        dst,
        icmp: Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::FragmentationNeeded { next_hop_mtu: 1300 }),
        inner,
        quote,
        options: vec![],
        vlan: None,
    }
}

fn port_unreachable(src: [u8; 4], dst: [u8; 4], inner: Ip) -> IcmpErr {
    IcmpErr {
        icmp: Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::Port),
        ..frag_needed(src, dst, inner, None)
    }
}

impl IcmpErr {
    /// The error as it must leave: outer addresses and the quoted packet replaced.
    fn translated(&self, src: [u8; 4], dst: [u8; 4], inner: Ip) -> IcmpErr {
        IcmpErr { src, dst, inner, ..self.clone() }
    }

    fn build(&self) -> Vec<u8> {
        let mut quote = self.inner.ip_bytes();
        if let Some(n) = self.quote {
            quote.truncate(n);
        }
        let mut h = Ipv4Header::new(0, 64, IpNumber::ICMP, self.src, self.dst).unwrap();
        h.identification = 0x0777;
        h.options = self.options.as_slice().try_into().unwrap();
        let eth = PacketBuilder::ethernet2(MAC_A, MAC_B);
        let ip = match self.vlan {
            Some(v) => eth.single_vlan(VlanId::try_new(v).unwrap()).ip(IpHeaders::Ipv4(h, Default::default())),
            None => eth.ip(IpHeaders::Ipv4(h, Default::default())),
        };
        let mut out = Vec::new();
        ip.icmpv4(self.icmp.clone()).write(&mut out, &quote).unwrap();
        out
    }
}

/// The checksums a receiver checks, from scratch: outer IPv4 header, ICMP over the
/// whole message, and the quoted IPv4 header (when the quote holds all of it).
fn assert_icmp_checksums(name: &str, frame: &[u8]) {
    let h = PacketHeaders::from_ethernet_slice(frame).unwrap_or_else(|e| panic!("{name}: unparsable {e:?}"));
    let Some(NetHeaders::Ipv4(ip, _)) = &h.net else { panic!("{name}: not IPv4") };
    assert_eq!(ip.header_checksum, ip.calc_header_checksum(), "{name}: outer IPv4 header checksum");
    let Some(TransportHeader::Icmpv4(icmp)) = &h.transport else { return };
    let payload = h.payload.slice();
    assert_eq!(icmp.checksum, icmp.icmp_type.calc_checksum(payload), "{name}: ICMP checksum");
    if let Ok((inner, _)) = Ipv4Header::from_slice(payload) {
        assert_eq!(inner.header_checksum, inner.calc_header_checksum(), "{name}: quoted IPv4 header checksum");
    }
}

enum Expect {
    Unchanged,
    Packet(IcmpErr),
}

struct Case {
    name: &'static str,
    /// Sent first, to set up conntrack.
    before: Vec<Ip>,
    input: Vec<u8>,
    expect: Expect,
    /// Counters that must each grow by one.
    reasons: &'static [Reason],
    /// The service counted for the input, if any.
    svc: Option<u32>,
}

fn cases() -> Vec<Case> {
    use Reason::*;
    let web_syn = syn(CLIENT, 40000, VIP, 80);
    // The forward packet as it left the node, after DNAT.
    let web_fwd = tcp(CLIENT, 40000, BE_TCP, 8080);
    let web_orig = tcp(CLIENT, 40000, VIP, 80);
    let dns = udp(CLIENT, 40001, VIP, 53);
    let dns_fwd = udp(CLIENT, 40001, BE_UDP, 5353);
    // A reply as the client got it, after reverse NAT, and as the backend sent it.
    let dns_reply = udp(VIP, 53, CLIENT, 40001);
    let dns_reply_orig = udp(BE_UDP, 5353, CLIENT, 40001);

    let mut v = Vec::new();

    // (a) A router's "fragmentation needed" about a forward TCP segment, to the client.
    // Linux quotes up to 576 bytes of the packet (548 after its own headers), so the
    // TCP checksum is in the quote and must be updated too.
    for (name, quote) in [
        ("frag needed from a router about a forward tcp segment (548-byte quote)", Some(548)),
        ("frag needed from a router about a forward tcp segment (28-byte quote)", Some(28)),
        ("frag needed from a router quoting a whole small tcp segment", None),
    ] {
        let mut inner = web_fwd.clone();
        if quote.is_none() {
            inner.payload = b"hello".to_vec();
        }
        let err = frag_needed(ROUTER, CLIENT, inner.clone(), quote);
        let orig = Ip { payload: inner.payload.clone(), ..web_orig.clone() };
        v.push(Case {
            name,
            before: vec![web_syn.clone()],
            input: err.build(),
            expect: Expect::Packet(err.translated(ROUTER, CLIENT, orig)),
            reasons: &[IcmpErrorNat],
            svc: Some(SVC_TCP),
        });
    }
    {
        let mut inner = web_fwd.clone();
        inner.options = vec![1, 1, 1, 0];
        let mut err = frag_needed(ROUTER, CLIENT, inner.clone(), Some(24 + 8));
        err.options = vec![1, 1, 1, 1, 1, 1, 1, 0];
        err.vlan = Some(42);
        let orig = Ip { options: inner.options.clone(), ..web_orig.clone() };
        v.push(Case {
            name: "frag needed with ip options outside and inside, behind a vlan tag",
            before: vec![web_syn.clone()],
            input: err.build(),
            expect: Expect::Packet(err.translated(ROUTER, CLIENT, orig)),
            reasons: &[IcmpErrorNat],
            svc: Some(SVC_TCP),
        });
    }
    {
        let err = IcmpErr {
            icmp: Icmpv4Type::TimeExceeded(TimeExceededCode::TtlExceededInTransit),
            ..frag_needed(ROUTER, CLIENT, web_fwd.clone(), Some(28))
        };
        v.push(Case {
            name: "time exceeded from a router about a forward tcp segment",
            before: vec![web_syn.clone()],
            input: err.build(),
            expect: Expect::Packet(err.translated(ROUTER, CLIENT, web_orig.clone())),
            reasons: &[IcmpErrorNat],
            svc: Some(SVC_TCP),
        });
    }

    // (b) The backend's own port unreachable: it must seem to come from the ClusterIP.
    // The whole datagram is quoted, so the updated UDP checksum is checked too.
    for (name, zero) in [
        ("port unreachable from the backend about a forward udp datagram", false),
        ("port unreachable from the backend: a zero udp checksum stays zero", true),
    ] {
        let inner = Ip { l4: L4::Udp { zero_csum: zero }, ..dns_fwd.clone() };
        let err = port_unreachable(BE_UDP, CLIENT, inner);
        let orig = Ip { l4: L4::Udp { zero_csum: zero }, ..dns.clone() };
        v.push(Case {
            name,
            before: vec![dns.clone()],
            input: err.build(),
            expect: Expect::Packet(err.translated(VIP, CLIENT, orig)),
            reasons: &[IcmpErrorNat],
            svc: Some(SVC_UDP),
        });
    }

    // (c) The client's port unreachable about a reply: back to the backend.
    {
        let err = port_unreachable(CLIENT, VIP, dns_reply.clone());
        v.push(Case {
            name: "port unreachable from the client about a udp reply goes to the backend",
            before: vec![dns.clone()],
            input: err.build(),
            expect: Expect::Packet(err.translated(CLIENT, BE_UDP, dns_reply_orig.clone())),
            reasons: &[IcmpErrorNat],
            svc: Some(SVC_UDP),
        });
    }

    // Hairpin: the forward packet left as ClusterIP:40002 -> CLIENT:8080; a router's
    // error about it is addressed to the ClusterIP and must reach the client, quoting
    // what the client sent.
    {
        let hp_fwd = tcp(VIP_HAIRPIN, 40002, CLIENT, 8080);
        let err = frag_needed(ROUTER, VIP_HAIRPIN, hp_fwd, Some(28));
        v.push(Case {
            name: "hairpin: frag needed about a forward segment goes to the client",
            before: vec![syn(CLIENT, 40002, VIP_HAIRPIN, 80)],
            input: err.build(),
            expect: Expect::Packet(err.translated(ROUTER, CLIENT, tcp(CLIENT, 40002, VIP_HAIRPIN, 80))),
            reasons: &[IcmpErrorNat],
            svc: Some(SVC_HAIRPIN),
        });
    }

    // (d) No flow: today's verdicts, byte for byte.
    v.push(Case {
        name: "error quoting an unknown flow, to a pod, passes untouched",
        before: vec![],
        input: frag_needed(ROUTER, CLIENT, web_fwd.clone(), Some(28)).build(),
        expect: Expect::Unchanged,
        reasons: &[PassNotService],
        svc: None,
    });
    v.push(Case {
        name: "error quoting an unknown flow, to a clusterip, passes as icmp",
        before: vec![dns.clone()],
        input: port_unreachable(CLIENT, VIP, udp(VIP, 53, CLIENT, 40999)).build(),
        expect: Expect::Unchanged,
        reasons: &[PassIcmp],
        svc: None,
    });

    // (e) Cut short: no read past the end, no translation, counted as before.
    for (name, quote) in [
        ("truncated quote: half an inner ipv4 header", 12),
        ("truncated quote: inner ipv4 header without its options", 22),
        ("truncated quote: 4 bytes of inner l4", 20 + 4),
    ] {
        let mut inner = web_fwd.clone();
        if quote == 22 {
            inner.options = vec![1, 1, 1, 0];
        }
        v.push(Case {
            name,
            before: vec![web_syn.clone()],
            input: frag_needed(ROUTER, CLIENT, inner, Some(quote)).build(),
            expect: Expect::Unchanged,
            reasons: &[PassNotService],
            svc: None,
        });
    }
    {
        let mut frame = frag_needed(ROUTER, CLIENT, web_fwd.clone(), Some(28)).build();
        // Only 4 bytes of the ICMP header, IPv4 total length fixed up to match.
        frame.truncate(14 + 20 + 4);
        frame[16..18].copy_from_slice(&24u16.to_be_bytes());
        let (h, _) = Ipv4Header::from_slice(&frame[14..]).unwrap();
        frame[24..26].copy_from_slice(&h.calc_header_checksum().to_be_bytes());
        v.push(Case {
            name: "truncated icmp header",
            before: vec![web_syn.clone()],
            input: frame,
            expect: Expect::Unchanged,
            reasons: &[PassNotService],
            svc: None,
        });
    }

    // (f) Not an error.
    {
        let mut out = Vec::new();
        PacketBuilder::ethernet2(MAC_A, MAC_B)
            .ipv4(CLIENT, VIP, 64)
            .icmpv4_echo_request(7, 1)
            .write(&mut out, b"ping")
            .unwrap();
        v.push(Case {
            name: "echo request to a clusterip passes as icmp",
            before: vec![web_syn.clone()],
            input: out,
            expect: Expect::Unchanged,
            reasons: &[PassIcmp],
            svc: None,
        });
    }
    v
}

fn svc_packets(dp: &mut Datapath, svc_id: u32) -> u64 {
    let m: aya::maps::PerCpuArray<&mut aya::maps::MapData, Counter> =
        aya::maps::PerCpuArray::try_from(dp.ebpf.map_mut(map_names::SVC_STATS).unwrap()).unwrap();
    m.get(&svc_id, 0).unwrap().iter().map(|c| c.packets).sum()
}

#[test]
fn icmp_errors_through_both_entry_points() {
    let cases = cases();
    eprintln!("{} icmp fixtures x 2 entry points", cases.len());
    let mut dp = Datapath::load().unwrap();
    for hook in Hook::BOTH {
        for c in &cases {
            let name = format!("[{hook:?}] {}", c.name);
            dp.reset().unwrap();
            base(&mut dp);
            for p in &c.before {
                let (verdict, _, _) = dp.run(hook, &p.frame(), 1).unwrap();
                assert_eq!(verdict, Verdict::Pass, "{name}: setup packet");
            }
            assert!(c.before.is_empty() || !dp.conntrack().is_empty(), "{name}: no flow set up");
            let before: Vec<_> = c.reasons.iter().map(|r| dp.stat(*r).packets).collect();
            let nat_before = dp.stat(Reason::IcmpErrorNat).packets;
            let svc_before = c.svc.map(|id| svc_packets(&mut dp, id));

            let (verdict, out, _) = dp.run(hook, &c.input, 1).unwrap_or_else(|e| panic!("{name}: {e:?}"));
            assert_eq!(verdict, Verdict::Pass, "{name}: verdict");
            match &c.expect {
                Expect::Unchanged => assert_eq!(out, c.input, "{name}: must pass byte for byte"),
                Expect::Packet(p) => {
                    let want = p.build();
                    assert_icmp_checksums(&format!("{name} (expected)"), &want);
                    let first_diff = out.iter().zip(&want).position(|(a, b)| a != b);
                    assert!(
                        out == want,
                        "{name}: translated error differs at byte {first_diff:?} (lengths {} and {})\n got {out:02x?}\nwant {want:02x?}",
                        out.len(),
                        want.len()
                    );
                    assert_icmp_checksums(&name, &out);
                }
            }
            for (r, b) in c.reasons.iter().zip(before) {
                assert_eq!(dp.stat(*r).packets, b + 1, "{name}: counter {}", r.name());
            }
            if !c.reasons.contains(&Reason::IcmpErrorNat) {
                assert_eq!(dp.stat(Reason::IcmpErrorNat).packets, nat_before, "{name}: counted as translated");
            }
            if let (Some(id), Some(b)) = (c.svc, svc_before) {
                assert_eq!(svc_packets(&mut dp, id), b + 1, "{name}: service counter");
            }
        }
    }
}
