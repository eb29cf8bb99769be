//! The addresses the IM will use: ours, static, and what public means.

use super::*;

/// Where `ip` lives on the host: the interface, the address entry and
/// whether it is merely covered by a loopback prefix (127/8 on `lo`).
pub(super) fn find_address(
    inv: &HostInventory,
    ip: IpAddr,
) -> Option<(String, AddressOrigin, String, bool)> {
    for iface in &inv.interfaces {
        for a in &iface.addresses {
            if a.address.parse::<IpAddr>().ok() == Some(ip) {
                let origin = AddressOrigin::try_from(a.origin).unwrap_or(AddressOrigin::Unknown);
                return Some((iface.name.clone(), origin, a.origin_source.clone(), false));
            }
        }
    }
    // Linux answers for every address of a loopback interface's prefix.
    for iface in inv.interfaces.iter().filter(|i| i.loopback) {
        for a in &iface.addresses {
            if let Ok(net) = a.address.parse::<IpAddr>()
                && in_prefix(ip, net, a.prefix)
            {
                return Some((
                    iface.name.clone(),
                    AddressOrigin::Unknown,
                    "loopback prefix".into(),
                    true,
                ));
            }
        }
    }
    None
}

pub(super) fn in_prefix(ip: IpAddr, net: IpAddr, prefix: u32) -> bool {
    match (ip, net) {
        (IpAddr::V4(a), IpAddr::V4(b)) => {
            let mask = if prefix == 0 {
                0
            } else {
                u32::MAX << (32 - prefix.min(32))
            };
            u32::from(a) & mask == u32::from(b) & mask
        }
        (IpAddr::V6(a), IpAddr::V6(b)) => {
            let mask = if prefix == 0 {
                0
            } else {
                u128::MAX << (128 - prefix.min(128))
            };
            u128::from(a) & mask == u128::from(b) & mask
        }
        _ => false,
    }
}

pub(super) fn address_checks(inv: &HostInventory, params: &PreflightParams, out: &mut Vec<Check>) {
    let ip = params.private_ip;
    let required = "assigned to an interface and statically configured";
    out.push(match find_address(inv, ip) {
        None => check(
            "net.private-ip",
            Verdict::Fail,
            format!("{ip} is not assigned to any interface"),
            required,
            "check -a: it must be an address of the IM host itself",
        ),
        Some((iface, _, _, true)) => check(
            "net.private-ip",
            Verdict::Warn,
            format!("{ip} is only covered by the loopback prefix of {iface}"),
            required,
            "use the host's private LAN address (loopback is for local testing only)",
        ),
        Some((iface, AddressOrigin::Static, source, _)) => check("net.private-ip", Verdict::Pass, format!("{ip} on {iface}, static ({source})"), required, ""),
        Some((iface, AddressOrigin::Dhcp, source, _)) => check(
            "net.private-ip",
            Verdict::Fail,
            format!("{ip} on {iface} is DHCP-assigned ({source})"),
            required,
            "configure the address statically (netplan: dhcp4: false, addresses: [...]) so it cannot change",
        ),
        Some((iface, AddressOrigin::LinkLocal, _, _)) => check(
            "net.private-ip",
            Verdict::Fail,
            format!("{ip} on {iface} is link-local"),
            required,
            "use a routable private address",
        ),
        Some((iface, _, source, _)) => check(
            "net.private-ip",
            Verdict::Warn,
            format!("{ip} on {iface}; origin unknown: {source}"),
            required,
            "make the address permanent in the host's network configuration (netplan)",
        ),
    });
    let public = params.public_ip;
    out.push(match find_address(inv, public) {
        Some((iface, ..)) => check("net.public-ip", Verdict::Pass, format!("{public} on {iface}"), "assigned, or reachable through NAT", ""),
        None => check(
            "net.public-ip",
            Verdict::Warn,
            format!("{public} is not on any interface"),
            "assigned, or reachable through NAT",
            format!("fine behind NAT or a cloud 1:1 mapping: make sure {public}:{IM_CLIENT_PORT}/tcp reaches this host"),
        ),
    });
}
