//! The map state the packet fixtures (lb-userspace/tests/datapath.rs) start from, and
//! their addresses: shared with the fuzzer (`fuzz`), so that a packet it finds can be
//! pasted into the fixture table as it is.

use anyhow::Result;
use lb_common::{IPPROTO_TCP, IPPROTO_UDP, NO_BACKENDS_DROP, NO_BACKENDS_REJECT, SVC_F_AFFINITY, ServiceValue};

use crate::Datapath;

pub const MAC_CLIENT: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
pub const MAC_NODE: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];

pub const CLIENT: [u8; 4] = [10, 244, 0, 5];
pub const CLIENT2: [u8; 4] = [10, 244, 0, 6];
pub const OTHER: [u8; 4] = [192, 0, 2, 7];
/// TCP 80 -> backend 101 (10.244.1.11:8080); UDP 53 -> backend 201 (10.244.1.21:5353).
pub const VIP: [u8; 4] = [10, 96, 0, 10];
pub const BE_TCP: [u8; 4] = [10, 244, 1, 11];
pub const BE_UDP: [u8; 4] = [10, 244, 1, 21];
/// TCP 80, ClientIP affinity with a 1 s timeout, backends 301..=303.
pub const VIP_AFF: [u8; 4] = [10, 96, 0, 20];
pub const BE_AFF: [[u8; 4]; 3] = [[10, 244, 1, 31], [10, 244, 1, 32], [10, 244, 1, 33]];
/// No backends: TCP 80 and UDP 53 reject.
pub const VIP_REJECT: [u8; 4] = [10, 96, 0, 30];
/// No backends: TCP 80 drops.
pub const VIP_DROP: [u8; 4] = [10, 96, 0, 31];
/// TCP 80 whose only backend is CLIENT itself (hairpin).
pub const VIP_HAIRPIN: [u8; 4] = [10, 96, 0, 50];

pub const SVC_TCP: u32 = 1;
pub const SVC_UDP: u32 = 2;
pub const SVC_AFF: u32 = 3;
pub const SVC_REJECT: u32 = 4;
pub const SVC_DROP: u32 = 5;
pub const SVC_REJECT_UDP: u32 = 6;
pub const SVC_HAIRPIN: u32 = 7;

pub fn s(a: [u8; 4]) -> String {
    std::net::Ipv4Addr::from(a).to_string()
}

pub fn svc(id: u32, count: u32) -> ServiceValue {
    ServiceValue { id, count, ..Default::default() }
}

/// The map state every case starts from.
pub fn base(dp: &mut Datapath) -> Result<()> {
    dp.put_service(&s(VIP), 80, IPPROTO_TCP, svc(SVC_TCP, 1))?;
    dp.put_backends(SVC_TCP, &[(101, &s(BE_TCP), 8080)])?;
    dp.put_service(&s(VIP), 53, IPPROTO_UDP, svc(SVC_UDP, 1))?;
    dp.put_backends(SVC_UDP, &[(201, &s(BE_UDP), 5353)])?;
    let aff =
        ServiceValue { id: SVC_AFF, count: 3, affinity_timeout_s: 1, flags: SVC_F_AFFINITY, ..Default::default() };
    dp.put_service(&s(VIP_AFF), 80, IPPROTO_TCP, aff)?;
    let be: Vec<(u32, String, u16)> = BE_AFF.iter().enumerate().map(|(i, a)| (301 + i as u32, s(*a), 8080)).collect();
    let be: Vec<(u32, &str, u16)> = be.iter().map(|(i, a, p)| (*i, a.as_str(), *p)).collect();
    dp.put_backends(SVC_AFF, &be)?;
    let reject = ServiceValue { no_backends: NO_BACKENDS_REJECT, ..svc(SVC_REJECT, 0) };
    dp.put_service(&s(VIP_REJECT), 80, IPPROTO_TCP, reject)?;
    dp.put_service(&s(VIP_REJECT), 53, IPPROTO_UDP, ServiceValue { id: SVC_REJECT_UDP, ..reject })?;
    let drop = ServiceValue { no_backends: NO_BACKENDS_DROP, ..svc(SVC_DROP, 0) };
    dp.put_service(&s(VIP_DROP), 80, IPPROTO_TCP, drop)?;
    dp.put_service(&s(VIP_HAIRPIN), 80, IPPROTO_TCP, svc(SVC_HAIRPIN, 1))?;
    dp.put_backends(SVC_HAIRPIN, &[(701, &s(CLIENT), 8080)])?;
    Ok(())
}
