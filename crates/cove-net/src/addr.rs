//! Fixed addressing inside every sandbox namespace. All sandboxes use the same guest address,
//! so a snapshot restores into any namespace unchanged.

use std::net::Ipv4Addr;

/// The guest's address on its only NIC (`eth0` in the guest, `tap0` on the host side).
pub const GUEST_IP: Ipv4Addr = Ipv4Addr::new(10, 250, 0, 2);
/// The gateway, on `tap0` in the sandbox namespace; also the guest's DNS resolver.
pub const GATEWAY_IP: Ipv4Addr = Ipv4Addr::new(10, 250, 0, 1);
pub const GUEST_PREFIX: u8 = 30;
/// The guest's MAC address (same everywhere, like its IP).
pub const GUEST_MAC: &str = "52:54:00:c0:0e:02";

/// The gateway's MAC (host side of the TAP), also the same everywhere: a guest restored from
/// another sandbox's image keeps the gateway in its neighbour cache, so a different MAC would
/// black-hole its traffic until that entry expired.
pub const GATEWAY_MAC: &str = "02:c0:0e:fa:00:01";

/// Ports the runner's listeners use on the gateway address (targets of nftables redirects).
pub const DNS_PORT: u16 = 53;
pub const HTTP_PROXY_PORT: u16 = 15080;
pub const TLS_PROXY_PORT: u16 = 15443;
/// The credential proxy ([`crate::egress::lend`]), which the guest addresses directly.
pub const CREDENTIAL_PROXY_PORT: u16 = cove_proto::net::CREDENTIAL_PROXY_PORT;

/// The metadata service's address as the guest sees it (connections to it on port 80 are
/// redirected to `METADATA_PORT` on the gateway, in every network mode).
pub const METADATA_IP: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);
pub const METADATA_PORT: u16 = 15169;

/// The TAP's name inside the sandbox namespace and the veth end beside it.
pub const TAP_NAME: &str = "tap0";
pub const VETH_INNER: &str = "eth0";
