//! Free loopback TCP ports for processes a test starts.

use std::collections::HashSet;
use std::net::{Ipv4Addr, TcpListener};
use std::sync::{Mutex, OnceLock};

use anyhow::{Context, bail};

/// How many kernel-chosen ports to try before giving up on finding one not yet handed out.
const MAX_ATTEMPTS: usize = 64;

/// Ports already returned by [`free_port`] in this process.
///
/// The listener is closed before the port is returned, so the kernel may offer the same
/// port again to a later call; remembering them stops two components of one test (or two
/// concurrent tests) from being told to listen on the same port.
fn handed_out() -> &'static Mutex<HashSet<u16>> {
    static HANDED_OUT: OnceLock<Mutex<HashSet<u16>>> = OnceLock::new();
    HANDED_OUT.get_or_init(|| Mutex::new(HashSet::new()))
}

/// Returns a TCP port on 127.0.0.1 that is free right now and was never returned before in
/// this process.
pub fn free_port() -> anyhow::Result<u16> {
    for _ in 0..MAX_ATTEMPTS {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .context("binding 127.0.0.1:0 to find a free port")?;
        let port = listener
            .local_addr()
            .context("reading the local address of a probe listener")?
            .port();
        drop(listener);
        // A poisoned set is still a valid set: a panic elsewhere cannot corrupt a HashSet insert.
        let mut seen = handed_out()
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if seen.insert(port) {
            return Ok(port);
        }
    }
    bail!("no unused free port found after {MAX_ATTEMPTS} attempts")
}

/// Whether something listens on TCP `127.0.0.1:port` (or the IPv4 wildcard), read from
/// `/proc/net/tcp` so the probe neither connects (which servers log) nor binds (which could
/// steal the port from a server still starting).
pub fn is_listening(port: u16) -> anyhow::Result<bool> {
    const TCP_LISTEN: &str = "0A";
    let table = std::fs::read_to_string("/proc/net/tcp").context("reading /proc/net/tcp")?;
    let wanted = [
        format!("0100007F:{port:04X}"),
        format!("00000000:{port:04X}"),
    ];
    Ok(table.lines().skip(1).any(|line| {
        let mut fields = line.split_whitespace();
        let local = fields.nth(1);
        let state = fields.nth(1);
        state == Some(TCP_LISTEN) && local.is_some_and(|l| wanted.iter().any(|w| w == l))
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_distinct_and_bindable() {
        let ports: Vec<u16> = (0..50).map(|_| free_port().expect("free port")).collect();
        let unique: HashSet<u16> = ports.iter().copied().collect();
        assert_eq!(unique.len(), ports.len(), "a port was handed out twice");
        for port in ports.iter().take(5) {
            TcpListener::bind((Ipv4Addr::LOCALHOST, *port)).expect("handed-out port is bindable");
        }
    }

    #[test]
    fn detects_a_listener() {
        // Only ports this test holds: another test may be handed any port released here.
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind");
        let port = listener.local_addr().expect("addr").port();
        assert!(is_listening(port).expect("proc readable"));
        // A connected client's local port is held by this test but not listening.
        let client = std::net::TcpStream::connect((Ipv4Addr::LOCALHOST, port)).expect("connect");
        let client_port = client.local_addr().expect("addr").port();
        assert!(!is_listening(client_port).expect("proc readable"));
        assert!(!is_listening(0).expect("proc readable"));
    }
}
