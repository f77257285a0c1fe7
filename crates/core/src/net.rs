//! Which local address the decode side listens on (`KVCACHE_SOCKET_IFNAME`), and which host this is.

use crate::error::{Error, Result};
use std::net::{IpAddr, Ipv4Addr};

/// The addresses a decode listens on: the address of `ifname` when given; otherwise, as the original does, the
/// first usable interface (up, not loopback, IPv4), plus loopback so that processes of one host still find each
/// other. Never every interface.
pub fn listen_addrs(ifname: Option<&str>) -> Result<Vec<IpAddr>> {
    if let Some(name) = ifname {
        return Ok(vec![listen_addr(name)?]);
    }
    let loopback = IpAddr::V4(Ipv4Addr::LOCALHOST);
    Ok(match first_usable_interface() {
        Some((_, ip)) => vec![ip, loopback],
        None => vec![loopback],
    })
}

/// The address of interface `name` (its IPv4 one, where it has one).
fn listen_addr(name: &str) -> Result<IpAddr> {
    let interfaces = if_addrs::get_if_addrs().map_err(|e| Error::config(format!("cannot list network interfaces: {e}")))?;
    if let Some(found) = interfaces.iter().find(|i| i.name == name && i.ip().is_ipv4()) {
        return Ok(found.ip());
    }
    if let Some(found) = interfaces.iter().find(|i| i.name == name) {
        return Ok(found.ip());
    }
    let mut names: Vec<&str> = interfaces.iter().map(|i| i.name.as_str()).collect();
    names.sort_unstable();
    names.dedup();
    Err(Error::config(format!(
        "KVCACHE_SOCKET_IFNAME={name:?}: no such interface with an address (this machine has: {})",
        names.join(", ")
    )))
}

/// The first interface that is up and not loopback, with its address: what "auto" means in the logs.
pub fn first_usable_interface() -> Option<(String, IpAddr)> {
    let interfaces = if_addrs::get_if_addrs().ok()?;
    interfaces.into_iter().find(|i| !i.is_loopback() && i.ip().is_ipv4()).map(|i| {
        let ip = i.ip();
        (i.name, ip)
    })
}

/// Whether `host` (a name or an address) resolves only to addresses of this machine: loopback, or an address
/// of one of its interfaces.
pub fn is_this_host(host: &str) -> bool {
    use std::net::ToSocketAddrs;
    let Ok(resolved) = (host, 0u16).to_socket_addrs() else { return false };
    let ours = own_addrs();
    let mut any = false;
    for addr in resolved {
        any = true;
        let ip = addr.ip();
        if !(ip.is_loopback() || ours.contains(&ip)) {
            return false;
        }
    }
    any
}

/// Whether `ip` is an address of this machine: loopback, or an address of one of its interfaces.
pub fn is_own_address(ip: IpAddr) -> bool {
    let ip = ip.to_canonical();
    ip.is_loopback() || own_addrs().contains(&ip)
}

fn own_addrs() -> Vec<IpAddr> {
    if_addrs::get_if_addrs().map(|list| list.into_iter().map(|i| i.ip()).collect()).unwrap_or_default()
}

/// Names this host and process namespace: two communicators with the same id can reach each other's memory
/// through the same-host transports (cuda-ipc, shm). The boot id changes with every boot of every machine;
/// the pid namespace tells containers apart.
pub fn host_id() -> Option<String> {
    let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
    let pid_ns = std::fs::read_link("/proc/self/ns/pid").ok()?;
    Some(format!("{}/{}", boot.trim(), pid_ns.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_by_name_and_unknown_names() {
        // Unset: the first usable interface and loopback, never every interface.
        let unset = listen_addrs(None).unwrap();
        assert_eq!(unset.last(), Some(&IpAddr::V4(Ipv4Addr::LOCALHOST)));
        assert!(unset.iter().all(|ip| !ip.is_unspecified()));
        assert_eq!(unset.len(), if first_usable_interface().is_some() { 2 } else { 1 });
        assert_eq!(listen_addrs(Some("lo")).unwrap(), [IpAddr::V4(Ipv4Addr::LOCALHOST)]);
        let err = listen_addrs(Some("nosuchif0")).unwrap_err();
        assert!(err.message().contains("KVCACHE_SOCKET_IFNAME") && err.message().contains("lo"), "{err}");
    }

    #[test]
    fn this_host_is_loopback_or_an_own_address() {
        assert!(is_this_host("127.0.0.1") && is_this_host("localhost"));
        if let Some((_, ip)) = first_usable_interface() {
            assert!(is_this_host(&ip.to_string()));
        }
        assert!(!is_this_host("192.0.2.250"), "TEST-NET-1 is nobody's interface here");
        assert!(!is_this_host("no-such-host.invalid"));
    }

    #[test]
    fn the_host_id_names_boot_and_namespace() {
        let id = host_id().unwrap();
        assert!(id.contains("/pid:["), "{id}");
        assert_eq!(host_id().unwrap(), id);
    }
}
