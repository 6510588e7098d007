//! The wiring of a sandbox's network namespace, and the nftables rules that decide what its
//! guest may reach.
//!
//! ```text
//!  guest 10.250.0.2 ── tap0 (10.250.0.1) ─[ netns cove-<id>: table inet cove ]─ eth0 ══ veth ══ cv<slot> ─[ host: table inet cove_host ]─ uplink
//! ```
//!
//! Every sandbox has the same guest address; what tells them apart on the host is the veth
//! pair, numbered by a slot (`cv<slot>`, transit 10.251.0.0/16 in /30s). The sandbox side
//! masquerades to its transit address and the host side masquerades again to the uplink, so
//! only allow-all traffic and allowed CIDRs take the kernel path; names are judged by the
//! runner's listeners on the gateway address (see [`crate::egress`]). IPv6 is off in the
//! namespace and dropped by the rules.

use std::io;
use std::net::Ipv4Addr;
use std::path::PathBuf;

use cove_api::sandbox::NetworkMode;
use ipnet::Ipv4Net;

use crate::addr::{
    CREDENTIAL_PROXY_PORT, DNS_PORT, GATEWAY_IP, GATEWAY_MAC, GUEST_IP, GUEST_PREFIX, HTTP_PROXY_PORT,
    METADATA_IP, METADATA_PORT, TAP_NAME, TLS_PROXY_PORT,
};
use crate::netns::{self, run};

/// Prefix of the host-side veth names; the host table matches on it.
const HOST_VETH_PREFIX: &str = "cv";
const TRANSIT_NET: Ipv4Net = match Ipv4Net::new(Ipv4Addr::new(10, 251, 0, 0), 16) {
    Ok(n) => n,
    Err(_) => panic!("bad transit net"),
};
const MAX_SLOTS: u32 = 1 << 14;
const NS_PREFIX: &str = "cove-";

/// What the kernel rules need to know of a policy (the names are the runner's business).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rules {
    pub mode: NetworkMode,
    pub allow_cidrs: Vec<Ipv4Net>,
}

/// A sandbox's network as it exists on the host.
#[derive(Debug, Clone)]
pub struct SandboxNet {
    pub ns_name: String,
    pub slot: u32,
}

impl SandboxNet {
    pub fn netns(&self) -> PathBuf {
        netns::path(&self.ns_name)
    }

    pub fn host_veth(&self) -> String {
        format!("{HOST_VETH_PREFIX}{}", self.slot)
    }

    /// (host side, sandbox side) transit addresses.
    pub fn transit(&self) -> (Ipv4Addr, Ipv4Addr) {
        let base = u32::from(TRANSIT_NET.network()) + self.slot * 4;
        (Ipv4Addr::from(base + 1), Ipv4Addr::from(base + 2))
    }
}

pub fn ns_name(id: &str) -> String {
    format!("{NS_PREFIX}{id}")
}

/// The addresses nothing in a sandbox may reach, in any mode, as nftables set elements.
fn denied_elements(denied: &[&str]) -> String {
    denied.join(", ")
}

/// Installs the host-wide table (masquerade for sandbox transit traffic; sandboxes may not
/// reach the host itself, each other, or denied ranges) and turns on IPv4 forwarding.
/// Idempotent: the table is replaced in one transaction.
pub async fn ensure_host(denied: &[&str]) -> io::Result<()> {
    std::fs::write("/proc/sys/net/ipv4/ip_forward", "1")
        .map_err(|e| io::Error::new(e.kind(), format!("enabling IPv4 forwarding: {e}")))?;
    let veths = format!("{HOST_VETH_PREFIX}*");
    let rules = format!(
        r#"table inet cove_host {{}}
delete table inet cove_host
table inet cove_host {{
    set denied4 {{ type ipv4_addr; flags interval; auto-merge; elements = {{ {denied} }} }}
    chain input {{
        type filter hook input priority filter - 10; policy accept;
        iifname "{veths}" ct state established,related accept
        iifname "{veths}" meta l4proto tcp reject with tcp reset
        iifname "{veths}" reject with icmpx admin-prohibited
    }}
    chain forward {{
        type filter hook forward priority filter - 10; policy accept;
        iifname "{veths}" meta nfproto ipv6 drop
        iifname "{veths}" oifname "{veths}" drop
        iifname "{veths}" ip daddr @denied4 meta l4proto tcp reject with tcp reset
        iifname "{veths}" ip daddr @denied4 reject with icmpx admin-prohibited
    }}
    chain postrouting {{
        type nat hook postrouting priority srcnat; policy accept;
        ip saddr {transit} oifname != "{veths}" masquerade
    }}
}}
"#,
        denied = denied_elements(denied),
        transit = TRANSIT_NET,
    );
    run("nft", &["-f", "-"], Some(&rules)).await
}

/// The namespace's ruleset for `rules`. Applied whole, in one transaction, so a policy change
/// never leaves a moment with a half-written table.
pub fn render(rules: &Rules, denied: &[&str]) -> String {
    let custom = rules.mode == NetworkMode::Custom;
    let allow = rules.allow_cidrs.iter().map(|c| c.to_string()).collect::<Vec<_>>().join(", ");
    let allow_set = if allow.is_empty() {
        "set allow4 { type ipv4_addr; flags interval; }".to_string()
    } else {
        format!("set allow4 {{ type ipv4_addr; flags interval; auto-merge; elements = {{ {allow} }} }}")
    };
    let proxied = if custom {
        format!(
            r#"        iifname "{TAP_NAME}" ip daddr @allow4 return
        iifname "{TAP_NAME}" ip daddr != {GATEWAY_IP} tcp dport 80 dnat ip to {GATEWAY_IP}:{HTTP_PROXY_PORT}
        iifname "{TAP_NAME}" ip daddr != {GATEWAY_IP} tcp dport 443 dnat ip to {GATEWAY_IP}:{TLS_PROXY_PORT}
"#
        )
    } else {
        String::new()
    };
    // Checked per packet, not only for new flows: a narrower policy cuts flows it no longer
    // allows at their next packet.
    let outbound = match rules.mode {
        NetworkMode::AllowAll => format!(r#"        iifname "{TAP_NAME}" oifname "eth0" accept"#),
        NetworkMode::Custom => {
            format!(r#"        iifname "{TAP_NAME}" oifname "eth0" ip daddr @allow4 accept"#)
        }
        NetworkMode::DenyAll => String::new(),
    };
    format!(
        r#"table inet cove {{}}
delete table inet cove
table inet cove {{
    set denied4 {{ type ipv4_addr; flags interval; auto-merge; elements = {{ {denied} }} }}
    {allow_set}
    chain prerouting {{
        type nat hook prerouting priority dstnat; policy accept;
        iifname "{TAP_NAME}" meta nfproto ipv6 drop
        iifname "{TAP_NAME}" ip saddr != {GUEST_IP} drop
        iifname "{TAP_NAME}" meta l4proto {{ tcp, udp }} th dport {DNS_PORT} dnat ip to {GATEWAY_IP}:{DNS_PORT}
        iifname "{TAP_NAME}" ip daddr {METADATA_IP} tcp dport 80 dnat ip to {GATEWAY_IP}:{METADATA_PORT}
{proxied}    }}
    chain postrouting {{
        type nat hook postrouting priority srcnat; policy accept;
        oifname "eth0" masquerade
    }}
    chain forward {{
        type filter hook forward priority filter; policy drop;
        oifname "{TAP_NAME}" ct state established,related accept
        iifname "{TAP_NAME}" ip daddr @denied4 meta l4proto tcp reject with tcp reset
        iifname "{TAP_NAME}" ip daddr @denied4 reject with icmpx admin-prohibited
{outbound}
        iifname "{TAP_NAME}" meta l4proto tcp reject with tcp reset
        iifname "{TAP_NAME}" reject with icmpx admin-prohibited
    }}
    chain input {{
        type filter hook input priority filter; policy drop;
        iif "lo" accept
        ct state established,related accept
        iifname "{TAP_NAME}" ip daddr {GATEWAY_IP} meta l4proto {{ tcp, udp }} th dport {DNS_PORT} accept
        iifname "{TAP_NAME}" ip daddr {GATEWAY_IP} tcp dport {{ {HTTP_PROXY_PORT}, {TLS_PROXY_PORT} }} ct status dnat accept
        iifname "{TAP_NAME}" ip daddr {GATEWAY_IP} tcp dport {CREDENTIAL_PROXY_PORT} accept
        iifname "{TAP_NAME}" ip daddr {GATEWAY_IP} tcp dport {METADATA_PORT} ct status dnat accept
        iifname "{TAP_NAME}" meta l4proto tcp reject with tcp reset
        iifname "{TAP_NAME}" reject with icmpx admin-prohibited
    }}
}}
"#,
        denied = denied_elements(denied),
    )
}

/// Creates sandbox `id`'s namespace with its TAP, veth pair, addresses, routes and rules. A
/// namespace of that name left from before is removed first.
pub async fn create(id: &str, rules: &Rules, denied: &[&str]) -> io::Result<SandboxNet> {
    create_tap(id).await?;
    finish(id, rules, denied).await
}

/// The first half of [`create`]: the namespace and its TAP, all a VM needs to start (QEMU
/// opens the TAP). A namespace of that name left from before is removed first. Until
/// [`finish`] the namespace has no way out and no rules: the guest must not run before.
pub async fn create_tap(id: &str) -> io::Result<()> {
    let name = ns_name(id);
    if netns::exists(&name) {
        destroy(id).await?;
    }
    run("ip", &["netns", "add", &name], None).await?;
    let made = async {
        // Forwarding on, and IPv6 off before any interface exists (the TAP gets no address).
        netns::within(&netns::path(&name), || {
            for (key, value) in [
                ("net/ipv4/ip_forward", "1"),
                ("net/ipv6/conf/all/disable_ipv6", "1"),
                ("net/ipv6/conf/default/disable_ipv6", "1"),
            ] {
                std::fs::write(format!("/proc/sys/{key}"), value)
                    .map_err(|e| io::Error::new(e.kind(), format!("sysctl {key}: {e}")))?;
            }
            Ok(())
        })?;
        let tap_cmds = format!(
            "tuntap add {TAP_NAME} mode tap vnet_hdr\n\
             link set {TAP_NAME} address {GATEWAY_MAC}\n\
             addr add {GATEWAY_IP}/{GUEST_PREFIX} dev {TAP_NAME}\n\
             link set {TAP_NAME} up\n\
             link set lo up\n"
        );
        run("ip", &["-n", &name, "-batch", "-"], Some(&tap_cmds)).await
    }
    .await;
    if made.is_err() {
        let _ = destroy(id).await;
    }
    made
}

/// The second half of [`create`], which may run while QEMU starts: the veth pair to the host,
/// addresses, routes, forwarding and the rules. On failure the namespace is removed.
pub async fn finish(id: &str, rules: &Rules, denied: &[&str]) -> io::Result<SandboxNet> {
    let name = ns_name(id);
    let result = async {
        let net = SandboxNet { ns_name: name.clone(), slot: add_veth(&name).await? };
        let (host_ip, ns_ip) = net.transit();
        let host_veth = net.host_veth();
        let host_cmds = format!("addr add {host_ip}/30 dev {host_veth}\nlink set {host_veth} up\n");
        run("ip", &["-batch", "-"], Some(&host_cmds)).await?;
        let ns_cmds = format!(
            "addr add {ns_ip}/30 dev eth0\n\
             link set eth0 up\n\
             route add default via {host_ip}\n"
        );
        run("ip", &["-n", &name, "-batch", "-"], Some(&ns_cmds)).await?;
        apply(&net, rules, denied).await?;
        Ok(net)
    }
    .await;
    if result.is_err() {
        let _ = destroy(id).await;
    }
    result
}

/// Finds a sandbox's network made earlier (by this or a previous runner process): its
/// namespace, with the veth end that gives its slot.
pub async fn find(id: &str) -> Option<SandboxNet> {
    let (net, _) = look(id)?;
    Some(net)
}

/// [`find`], for a network that is whole and this host namespace's: also the TAP with the
/// gateway's address, both ends up, and the veth's host end here (not in the namespace of
/// another runner of this machine, as in tests). What a paused sandbox leaves with its warm
/// entry (see `cove_runner::net`): its resume takes the namespace as it is and only applies
/// its rules again.
pub async fn find_whole(id: &str) -> Option<SandboxNet> {
    match look(id)? {
        (net, true) if nix::net::if_::if_nametoindex(net.host_veth().as_str()).is_ok() => Some(net),
        _ => None,
    }
}

/// Reads the namespace's interfaces from inside it (no `ip` process): the slot from the
/// transit address of `eth0`, and whether the TAP is up with the gateway's address.
fn look(id: &str) -> Option<(SandboxNet, bool)> {
    use nix::ifaddrs::getifaddrs;
    use nix::net::if_::InterfaceFlags;
    let name = ns_name(id);
    if !netns::exists(&name) {
        return None;
    }
    let (eth0, tap) = netns::within(&netns::path(&name), || {
        let (mut eth0, mut tap) = (None, false);
        for a in getifaddrs().map_err(io::Error::from)? {
            let up = a.flags.contains(InterfaceFlags::IFF_UP);
            let Some(ip) = a.address.as_ref().and_then(|s| s.as_sockaddr_in()).map(|s| s.ip()) else {
                continue;
            };
            match a.interface_name.as_str() {
                "eth0" => eth0 = Some((ip, up)),
                TAP_NAME => tap |= up && ip == GATEWAY_IP,
                _ => {}
            }
        }
        Ok((eth0, tap))
    })
    .ok()?;
    let (ip, eth0_up) = eth0?;
    if !TRANSIT_NET.contains(&ip) {
        return None;
    }
    let slot = (u32::from(ip) - u32::from(TRANSIT_NET.network())) / 4;
    Some((SandboxNet { ns_name: name, slot }, tap && eth0_up))
}

/// Replaces the namespace's rules (a policy change).
pub async fn apply(net: &SandboxNet, rules: &Rules, denied: &[&str]) -> io::Result<()> {
    run("ip", &["netns", "exec", &net.ns_name, "nft", "-f", "-"], Some(&render(rules, denied))).await
}

/// Whether a process runs in sandbox `id`'s namespace (a VM's QEMU). A runner's own VM of the
/// sandbox is gone before it removes the namespace, so a process there belongs to another
/// runner on this host that took the same sandbox over (namespaces are named by sandbox id on
/// the whole host).
pub fn in_use(id: &str) -> bool {
    use std::os::unix::fs::MetadataExt;
    let Ok(ns) = std::fs::metadata(netns::path(&ns_name(id))) else { return false };
    let Ok(procs) = std::fs::read_dir("/proc") else { return false };
    procs.flatten().filter(|p| p.file_name().to_string_lossy().bytes().all(|b| b.is_ascii_digit())).any(|p| {
        std::fs::metadata(p.path().join("ns/net")).is_ok_and(|m| m.dev() == ns.dev() && m.ino() == ns.ino())
    })
}

/// Removes sandbox `id`'s namespace; its TAP and veth pair go with it. Missing is fine.
pub async fn destroy(id: &str) -> io::Result<()> {
    let name = ns_name(id);
    if !netns::exists(&name) {
        return Ok(());
    }
    if let Some(net) = find(id).await {
        // Deleting the namespace deletes the pair too, but asynchronously: delete the host end
        // now so that its slot is free at once.
        let _ = run("ip", &["link", "del", &net.host_veth()], None).await;
    }
    match run("ip", &["netns", "del", &name], None).await {
        // Another task removed it meanwhile (a stopping runner and the build it stops both
        // clean up): gone is what was asked.
        Err(_) if !netns::exists(&name) => Ok(()),
        r => r,
    }
}

/// Creates the veth pair on the lowest free slot; the kernel's refusal of a name in use is
/// what arbitrates between runners creating sandboxes at the same time.
async fn add_veth(ns: &str) -> io::Result<u32> {
    let mut slot = 0;
    loop {
        while slot < MAX_SLOTS
            && std::path::Path::new(&format!("/sys/class/net/{HOST_VETH_PREFIX}{slot}")).exists()
        {
            slot += 1;
        }
        if slot >= MAX_SLOTS {
            return Err(io::Error::other("no free sandbox network slot"));
        }
        let host = format!("{HOST_VETH_PREFIX}{slot}");
        match run("ip", &["link", "add", &host, "type", "veth", "peer", "name", "eth0", "netns", ns], None)
            .await
        {
            Ok(()) => return Ok(slot),
            Err(e) if e.to_string().contains("File exists") => slot += 1,
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_map_to_distinct_transit_pairs() {
        let a = SandboxNet { ns_name: "x".into(), slot: 0 }.transit();
        let b = SandboxNet { ns_name: "x".into(), slot: 1 }.transit();
        assert_eq!(a, (Ipv4Addr::new(10, 251, 0, 1), Ipv4Addr::new(10, 251, 0, 2)));
        assert_eq!(b, (Ipv4Addr::new(10, 251, 0, 5), Ipv4Addr::new(10, 251, 0, 6)));
        let last = SandboxNet { ns_name: "x".into(), slot: MAX_SLOTS - 1 }.transit();
        assert!(TRANSIT_NET.contains(&last.1));
    }

    #[test]
    fn rules_follow_the_mode() {
        let denied = ["10.0.0.0/8", "169.254.0.0/16"];
        let deny = render(&Rules { mode: NetworkMode::DenyAll, allow_cidrs: vec![] }, &denied);
        assert!(!deny.contains("oifname \"eth0\" accept"));
        assert!(!deny.contains("dnat ip to 10.250.0.1:15443"));
        let all = render(&Rules { mode: NetworkMode::AllowAll, allow_cidrs: vec![] }, &denied);
        assert!(all.contains("oifname \"eth0\" accept"));
        assert!(!all.contains("dnat ip to 10.250.0.1:15443"));
        let custom = render(
            &Rules { mode: NetworkMode::Custom, allow_cidrs: vec!["203.0.113.0/24".parse().unwrap()] },
            &denied,
        );
        assert!(custom.contains("elements = { 203.0.113.0/24 }"));
        assert!(custom.contains("dnat ip to 10.250.0.1:15443"));
        assert!(custom.contains("ip daddr @allow4 accept"));
    }

    /// Builds a real namespace (root only) for each mode and applies its rules: nft accepts
    /// them, the TAP and veth exist, and destroy leaves nothing.
    #[tokio::test]
    async fn namespaces_are_built_and_removed() {
        let denied = ["10.0.0.0/8", "169.254.0.0/16"];
        let id = format!("sbx-toptest{}", std::process::id());
        let rules = Rules { mode: NetworkMode::Custom, allow_cidrs: vec!["203.0.113.0/24".parse().unwrap()] };
        let net = create(&id, &rules, &denied).await.unwrap();
        assert!(std::path::Path::new(&format!("/sys/class/net/{}", net.host_veth())).exists());
        let found = find(&id).await.unwrap();
        assert_eq!(found.slot, net.slot);
        assert_eq!(find_whole(&id).await.map(|n| n.slot), Some(net.slot));
        // In use while a process runs in it (as another runner's QEMU would), not after.
        assert!(!in_use(&id));
        let mut inside = std::process::Command::new("ip")
            .args(["netns", "exec", &net.ns_name, "sleep", "30"])
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while !in_use(&id) && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert!(in_use(&id), "a process in the namespace is not seen");
        inside.kill().unwrap();
        inside.wait().unwrap();
        assert!(!in_use(&id));
        for mode in [NetworkMode::AllowAll, NetworkMode::DenyAll] {
            apply(&net, &Rules { mode, allow_cidrs: vec![] }, &denied).await.unwrap();
        }
        destroy(&id).await.unwrap();
        assert!(!netns::exists(&net.ns_name));
        assert!(!std::path::Path::new(&format!("/sys/class/net/{}", net.host_veth())).exists());
        assert!(find(&id).await.is_none());

        // Whole, but its veth's host end in another namespace (another runner's on this
        // machine): not this runner's to take.
        let net = create(&id, &rules, &denied).await.unwrap();
        let other = format!("{id}-other");
        run("ip", &["netns", "add", &other], None).await.unwrap();
        run("ip", &["link", "set", &net.host_veth(), "netns", &other], None).await.unwrap();
        assert!(find(&id).await.is_some());
        assert!(find_whole(&id).await.is_none(), "a namespace wired to another host namespace is taken");
        run("ip", &["netns", "del", &other], None).await.unwrap();
        destroy(&id).await.unwrap();

        // Half made (a crash before `finish`): not whole, so a resume makes it again.
        create_tap(&id).await.unwrap();
        assert!(find_whole(&id).await.is_none());
        destroy(&id).await.unwrap();
        assert!(!netns::exists(&net.ns_name));
    }
}
