//! Sandbox networking, all of it decided on the host.
//!
//! Every sandbox gets its own network namespace holding a TAP (the guest's only NIC), a veth
//! to the host, and an nftables table that decides what the guest may reach ([`topology`]).
//! Traffic the policy judges by name (TLS SNI, HTTP Host, DNS) is redirected to listeners that
//! the runner binds inside that namespace ([`egress`]): a policy DNS server, an HTTP proxy, a
//! TLS proxy that splices allowed names and terminates TLS only for domains with header
//! transforms ([`mitm`]), with a per-sandbox CA ([`ca`]).

pub mod addr;
pub mod ca;
pub mod decisions;
pub mod dns;
pub mod egress;
pub mod mitm;
pub mod netns;
pub mod policy;
#[cfg(feature = "testing")]
pub mod testing;
pub mod topology;
