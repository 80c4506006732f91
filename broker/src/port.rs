//! Who holds a TCP port: telling a live process apart from the listening sockets a
//! crashed one leaves behind.
//!
//! After `kill -9`, a process's io_uring instance is torn down by a kernel worker,
//! and sockets with requests still pending in it (a listener's `accept`) stay in
//! LISTEN state, owned by no process, until that teardown finishes — seen here for
//! about a second, and for longer on a busy machine. A restart must not take those
//! for "another broker", or a supervisor's restart loop turns one crash into an
//! outage; but it must still refuse a port that a live process listens on (every
//! shard binds with SO_REUSEPORT, which would otherwise let two brokers share it).

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// What holds listening sockets on an address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PortHolder {
    /// Nothing listens there.
    Free,
    /// Only sockets no process holds (a crashed process's, being torn down).
    Orphaned,
    /// A live process listens there.
    Live(u32),
}

/// Looks up the listening sockets whose address overlaps `addr` and who holds them.
pub fn holder(addr: SocketAddr) -> PortHolder {
    let inodes = listening_inodes(addr);
    if inodes.is_empty() {
        return PortHolder::Free;
    }
    match owner_of_any(&inodes) {
        Some(pid) => PortHolder::Live(pid),
        None => PortHolder::Orphaned,
    }
}

/// Inodes of LISTEN sockets in `/proc/net/tcp{,6}` that conflict with `addr`.
fn listening_inodes(addr: SocketAddr) -> HashSet<u64> {
    let mut inodes = HashSet::new();
    for (file, v6) in [("/proc/net/tcp", false), ("/proc/net/tcp6", true)] {
        let Ok(table) = std::fs::read_to_string(file) else {
            continue;
        };
        for line in table.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode
            let (Some(local), Some(state), Some(inode)) =
                (fields.get(1), fields.get(3), fields.get(9))
            else {
                continue;
            };
            if *state != "0A" {
                continue;
            }
            let Some(listening) = parse_address(local, v6) else {
                continue;
            };
            if overlaps(listening, addr) {
                if let Ok(inode) = inode.parse::<u64>() {
                    inodes.insert(inode);
                }
            }
        }
    }
    inodes
}

/// Parses `/proc/net/tcp`'s `HEXADDR:HEXPORT` (address words in host byte order).
fn parse_address(field: &str, v6: bool) -> Option<SocketAddr> {
    let (address, port) = field.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let word = |i: usize| -> Option<[u8; 4]> {
        let hex = address.get(i * 8..i * 8 + 8)?;
        Some(u32::from_str_radix(hex, 16).ok()?.to_ne_bytes())
    };
    let ip = if v6 {
        let mut bytes = [0u8; 16];
        for i in 0..4 {
            bytes[i * 4..i * 4 + 4].copy_from_slice(&word(i)?);
        }
        IpAddr::V6(Ipv6Addr::from(bytes))
    } else {
        IpAddr::V4(Ipv4Addr::from(word(0)?))
    };
    Some(SocketAddr::new(ip, port))
}

/// Whether a socket listening on `listening` would conflict with binding `wanted`.
fn overlaps(listening: SocketAddr, wanted: SocketAddr) -> bool {
    if listening.port() != wanted.port() {
        return false;
    }
    let canonical = |ip: IpAddr| match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    };
    let (a, b) = (canonical(listening.ip()), canonical(wanted.ip()));
    a.is_unspecified() || b.is_unspecified() || a == b
}

/// The pid of a process holding one of `inodes` open, if any does.
fn owner_of_any(inodes: &HashSet<u64>) -> Option<u32> {
    let wanted: HashSet<String> = inodes.iter().map(|i| format!("socket:[{i}]")).collect();
    for process in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = process
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(process.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            let Ok(target) = std::fs::read_link(fd.path()) else {
                continue;
            };
            if target.to_str().is_some_and(|t| wanted.contains(t)) {
                return Some(pid);
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_net_addresses_parse() {
        let v4 = parse_address("0100007F:2F44", false).unwrap();
        assert_eq!(v4, "127.0.0.1:12100".parse().unwrap());
        let any6 = parse_address("00000000000000000000000000000000:1F90", true).unwrap();
        assert_eq!(any6, "[::]:8080".parse().unwrap());
    }

    #[test]
    fn wildcards_and_mapped_addresses_overlap() {
        let p = |s: &str| s.parse::<SocketAddr>().unwrap();
        assert!(overlaps(p("0.0.0.0:9"), p("127.0.0.1:9")));
        assert!(overlaps(p("[::ffff:127.0.0.1]:9"), p("127.0.0.1:9")));
        assert!(!overlaps(p("127.0.0.2:9"), p("127.0.0.1:9")));
        assert!(!overlaps(p("127.0.0.1:8"), p("127.0.0.1:9")));
    }

    #[test]
    fn a_live_listener_is_seen_with_its_pid() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        assert_eq!(holder(addr), PortHolder::Live(std::process::id()));
        drop(listener);
        assert_eq!(holder(addr), PortHolder::Free);
    }
}
