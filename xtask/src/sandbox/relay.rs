//! `cargo xtask sandbox relay` (started by `up`): a TCP relay from 127.0.0.1 in the root
//! namespace to the API server on node 1, so that kubectl and `e2e.test` on the host reach
//! the sandbox. The listener lives in the root namespace, on loopback only (the one thing
//! the sandbox puts there); every upstream socket is opened by a fresh thread that has
//! `setns`-ed into the node's network namespace first.

use std::{
    io,
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    time::Duration,
};

use anyhow::{Context as _, Result, bail};

pub fn run(listen: SocketAddr, netns: &str, upstream: SocketAddr) -> Result<()> {
    if !listen.ip().is_loopback() {
        bail!("the relay may only listen on loopback (got {listen}); try 127.0.0.1:PORT");
    }
    let l = TcpListener::bind(listen).with_context(|| format!("listening on {listen}; is the port in use?"))?;
    eprintln!("relaying {listen} -> {upstream} in netns {netns}");
    for conn in l.incoming() {
        let Ok(client) = conn else { continue };
        let netns = netns.to_owned();
        std::thread::spawn(move || {
            if let Err(e) = relay_one(client, &netns, upstream) {
                eprintln!("relay: {e:#}");
            }
        });
    }
    Ok(())
}

fn relay_one(client: TcpStream, netns: &str, upstream: SocketAddr) -> Result<()> {
    // This thread is made for this connection, so entering the namespace for good is fine.
    lb_netns::enter(netns)?;
    let up = TcpStream::connect_timeout(&upstream, Duration::from_secs(5))
        .with_context(|| format!("connecting to {upstream} in {netns}"))?;
    let _ = up.set_nodelay(true);
    let _ = client.set_nodelay(true);
    let (mut c2, mut u2) = (client.try_clone()?, up.try_clone()?);
    let t = std::thread::spawn(move || {
        let _ = io::copy(&mut u2, &mut c2);
        let _ = c2.shutdown(Shutdown::Write);
    });
    let (mut c, mut u) = (client, up);
    let _ = io::copy(&mut c, &mut u);
    let _ = u.shutdown(Shutdown::Write);
    let _ = t.join();
    Ok(())
}
