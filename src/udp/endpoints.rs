//! Our own UDP endpoints as peers should try them: what STUN saw, then interface addresses.

use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;

use crate::control::tailcfg::EndpointType;
use crate::netcheck::StunResults;

/// Our endpoints: what STUN saw first, then every interface address with our port
/// (loopback, link-local and the tailnet's own 100.64.0.0/10 and fd7a:115c:a1e0::/48 left out).
pub fn local_endpoints(port: u16, stun: &StunResults) -> Vec<(SocketAddr, EndpointType)> {
    let mut out: Vec<(SocketAddr, EndpointType)> = Vec::new();
    let mut push = |addr: SocketAddr, kind: EndpointType| {
        if !out.iter().any(|(a, _)| *a == addr) {
            out.push((addr, kind));
        }
    };
    for mapped in [stun.global_v4, stun.global_v6].into_iter().flatten() {
        push(mapped, EndpointType::STUN);
    }
    for ip in interface_addresses() {
        if usable_local_ip(ip) {
            push(SocketAddr::new(ip, port), EndpointType::LOCAL);
        }
    }
    out
}

/// Whether an interface address is worth advertising to peers.
pub fn usable_local_ip(ip: IpAddr) -> bool {
    let tailnet_v4: IpNet = "100.64.0.0/10".parse().expect("valid prefix");
    let tailnet_v6: IpNet = "fd7a:115c:a1e0::/48".parse().expect("valid prefix");
    let link_local = match ip {
        IpAddr::V4(v4) => v4.is_link_local(),
        IpAddr::V6(v6) => v6.segments()[0] & 0xffc0 == 0xfe80,
    };
    !(ip.is_loopback()
        || ip.is_unspecified()
        || ip.is_multicast()
        || link_local
        || tailnet_v4.contains(&ip)
        || tailnet_v6.contains(&ip))
}

/// Addresses of this namespace's interfaces that are up.
fn interface_addresses() -> Vec<IpAddr> {
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else {
        return Vec::new();
    };
    addrs
        .filter(|a| a.flags.contains(nix::net::if_::InterfaceFlags::IFF_UP))
        .filter_map(|a| {
            let addr = a.address?;
            if let Some(v4) = addr.as_sockaddr_in() {
                return Some(IpAddr::V4(v4.ip()));
            }
            addr.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip()))
        })
        .collect()
}
