//! The registry of a sandbox's proxied connections, so that a policy update can cut the ones
//! the new policy no longer allows, and detach can cut all of them.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use nix::sys::socket::{setsockopt, shutdown, sockopt, Shutdown};
use tokio_util::sync::CancellationToken;

use crate::policy::Policy;

/// What a flow's permission rests on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FlowKey {
    /// Accepted, not decided yet.
    Pending,
    /// Allowed by name (TLS SNI, HTTP Host).
    Name(String),
    /// Allowed by destination address (allow_cidrs, or allow-all).
    Ip(Ipv4Addr),
}

impl FlowKey {
    pub fn allowed_by(&self, p: &Policy) -> bool {
        match self {
            FlowKey::Pending => true,
            FlowKey::Name(n) => p.allows_name(n),
            FlowKey::Ip(ip) => super::ip_allowed(p, *ip),
        }
    }
}

struct Entry {
    key: FlowKey,
    cancel: CancellationToken,
    fds: Vec<OwnedFd>,
}

pub struct Flows {
    cap: usize,
    next: AtomicU64,
    map: Mutex<HashMap<u64, Entry>>,
}

/// One registered flow; unregisters itself when dropped.
pub struct Flow {
    flows: Arc<Flows>,
    id: u64,
    pub cancel: CancellationToken,
}

fn cut(e: &Entry) {
    for fd in &e.fds {
        let _ = setsockopt(fd, sockopt::Linger, &libc::linger { l_onoff: 1, l_linger: 0 });
        let _ = shutdown(fd.as_raw_fd(), Shutdown::Both);
    }
    e.cancel.cancel();
}

impl Flows {
    pub fn new(cap: usize) -> Arc<Flows> {
        Arc::new(Flows { cap, next: AtomicU64::new(1), map: Mutex::new(HashMap::new()) })
    }

    pub fn len(&self) -> usize {
        self.map.lock().expect("flows").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Registers a new flow for the guest-side socket `guest`; `None` when the sandbox is at its cap.
    pub fn register(self: &Arc<Self>, guest: &impl AsFd, parent: &CancellationToken) -> Option<Flow> {
        let mut map = self.map.lock().expect("flows");
        if map.len() >= self.cap {
            return None;
        }
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let cancel = parent.child_token();
        let fds = guest.as_fd().try_clone_to_owned().into_iter().collect();
        map.insert(id, Entry { key: FlowKey::Pending, cancel: cancel.clone(), fds });
        Some(Flow { flows: self.clone(), id, cancel })
    }

    /// Cuts every flow whose key `keep` rejects; returns how many.
    pub fn cut_where(&self, keep: impl Fn(&FlowKey) -> bool) -> usize {
        let map = self.map.lock().expect("flows");
        let mut n = 0;
        for e in map.values().filter(|e| !keep(&e.key)) {
            cut(e);
            n += 1;
        }
        n
    }

    pub fn cut_all(&self) -> usize {
        self.cut_where(|_| false)
    }
}

impl Flow {
    /// Records the decision and re-checks it against the current policy under the registry
    /// lock, so a concurrent update either sees the key or this check sees the new policy.
    pub fn decide(&self, key: FlowKey, policy: &ArcSwap<Policy>) -> bool {
        let mut map = self.flows.map.lock().expect("flows");
        let Some(e) = map.get_mut(&self.id) else { return false };
        e.key = key;
        let ok = e.key.allowed_by(&policy.load());
        if !ok {
            cut(e);
        }
        ok && !e.cancel.is_cancelled()
    }

    /// Adds another socket (the upstream one) to be shut down when the flow is cut.
    pub fn add_socket(&self, s: &impl AsFd) {
        let mut map = self.flows.map.lock().expect("flows");
        if let Some(e) = map.get_mut(&self.id) {
            if let Ok(fd) = s.as_fd().try_clone_to_owned() {
                if e.cancel.is_cancelled() {
                    let _ = shutdown(fd.as_raw_fd(), Shutdown::Both);
                }
                e.fds.push(fd);
            }
        }
    }
}

impl Drop for Flow {
    fn drop(&mut self) {
        self.flows.map.lock().expect("flows").remove(&self.id);
    }
}
