//! The socket iterator that closes sockets of departed backends
//! (lb-userspace/src/datapath/sock_iter.rs) against the running kernel: it loads (the
//! verifier accepts the hand-assembled program and its kfunc call), closes exactly the
//! connected UDP sockets whose `SOCK_REVNAT` entry names a `SOCK_STALE` pair, leaves
//! TCP sockets of a draining pair alone and closes them once the pair is marked gone,
//! and counts what it closed. Sockets live in a throw-away network namespace.

use std::{
    io::ErrorKind,
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::fd::AsRawFd as _,
};

use lb_common::{DrainKey, IPPROTO_TCP, IPPROTO_UDP, SOCK_STALE_TCP, SockRevKey4, SockRevValue4, SockStale, map_names};
use lb_testing::{Datapath, netns::Topology};
use lb_userspace::datapath::sock_iter::SockIters;

fn cookie(fd: i32) -> u64 {
    let mut c: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: SO_COOKIE writes a u64 (socket(7)).
    let rc = unsafe { libc::getsockopt(fd, libc::SOL_SOCKET, libc::SO_COOKIE, (&mut c as *mut u64).cast(), &mut len) };
    assert_eq!(rc, 0, "SO_COOKIE: {}", std::io::Error::last_os_error());
    c
}

fn rev_key(fd: i32, peer: SocketAddr, proto: u8) -> SockRevKey4 {
    let SocketAddr::V4(p) = peer else { panic!("v4 only") };
    SockRevKey4 {
        cookie: cookie(fd),
        backend_addr_be: u32::from(*p.ip()).to_be(),
        backend_port_be: p.port().to_be(),
        proto,
        _pad: 0,
    }
}

#[test]
fn closes_the_sockets_of_stale_pairs_and_counts_them() {
    let dp = Datapath::load().unwrap();
    let pin = dp.pin_dir().to_path_buf();
    let iters = SockIters::load(&pin).unwrap();
    let mut revnat: aya::maps::HashMap<_, SockRevKey4, SockRevValue4> = aya::maps::HashMap::try_from(
        aya::maps::Map::LruHashMap(aya::maps::MapData::from_pin(pin.join(map_names::SOCK_REVNAT)).unwrap()),
    )
    .unwrap();
    let mut stale: aya::maps::HashMap<_, DrainKey, SockStale> = aya::maps::HashMap::try_from(aya::maps::Map::HashMap(
        aya::maps::MapData::from_pin(pin.join(map_names::SOCK_STALE)).unwrap(),
    ))
    .unwrap();

    let topo = Topology::new().unwrap();
    topo.node
        .run(|| {
            let lo = Ipv4Addr::LOCALHOST;
            let _ = std::process::Command::new("ip").args(["link", "set", "lo", "up"]).status();
            let server = UdpSocket::bind((lo, 0)).unwrap();
            let gone = UdpSocket::bind((lo, 0)).unwrap();
            gone.connect(server.local_addr().unwrap()).unwrap();
            let kept = UdpSocket::bind((lo, 0)).unwrap();
            kept.connect(server.local_addr().unwrap()).unwrap();
            let listener = TcpListener::bind((lo, 0)).unwrap();
            let tcp = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
            let (_accepted, _) = listener.accept().unwrap();

            let v = |backend_id| SockRevValue4 { vip_addr_be: 1, vip_port_be: 2, _pad: 0, svc_id: 7, backend_id };
            let peer = server.local_addr().unwrap();
            revnat.insert(rev_key(gone.as_raw_fd(), peer, IPPROTO_UDP), v(1), 0).unwrap();
            revnat.insert(rev_key(kept.as_raw_fd(), peer, IPPROTO_UDP), v(2), 0).unwrap();
            revnat.insert(rev_key(tcp.as_raw_fd(), listener.local_addr().unwrap(), IPPROTO_TCP), v(1), 0).unwrap();

            // Pair (7, 1) draining: its UDP socket goes, its TCP connection stays.
            stale.insert(DrainKey { svc_id: 7, backend_id: 1 }, SockStale::default(), 0).unwrap();
            iters.run(false).unwrap();
            iters.run(true).unwrap();
            assert_eq!(stale.get(&DrainKey { svc_id: 7, backend_id: 1 }, 0).unwrap().destroyed, 1);
            let e = gone.send(b"x").and_then(|_| gone.recv(&mut [0; 8])).unwrap_err();
            assert!(
                matches!(e.raw_os_error(), Some(libc::ECONNABORTED) | Some(libc::EDESTADDRREQ)),
                "a destroyed UDP socket fails: {e}"
            );
            kept.send(b"y").unwrap();
            assert_eq!(server.recv(&mut [0; 8]).unwrap(), 1, "the other UDP socket still sends");
            tcp.set_nonblocking(true).unwrap();
            assert_eq!(std::io::Read::read(&mut &tcp, &mut [0; 8]).unwrap_err().kind(), ErrorKind::WouldBlock);

            // The pair's pod is gone: TCP too.
            let flags = SockStale { flags: SOCK_STALE_TCP, ..SockStale::default() };
            stale.insert(DrainKey { svc_id: 7, backend_id: 1 }, flags, 0).unwrap();
            iters.run(false).unwrap();
            iters.run(true).unwrap();
            assert_eq!(stale.get(&DrainKey { svc_id: 7, backend_id: 1 }, 0).unwrap().destroyed, 1);
            let e = std::io::Read::read(&mut &tcp, &mut [0; 8]).unwrap_err();
            assert_eq!(e.raw_os_error(), Some(libc::ECONNABORTED), "a destroyed TCP socket: {e}");
            Ok(())
        })
        .unwrap();
}
