//! Egress policies: checks beyond the API's validation, and live replacement.

use super::*;

/// What the API's validation cannot see: CIDRs over ranges no sandbox may reach, wildcards
/// over a whole top-level domain, headers that cannot be set. `field` prefixes the error's
/// field.
pub(super) fn check_policy(policy: Option<&NetworkPolicy>, field: &str) -> Result<(), ApiError> {
    cove_net::policy::Policy::compile(policy).map(|_| ()).map_err(|e| {
        let rest = e.field.strip_prefix("network_policy").unwrap_or(&e.field);
        let name = format!("{field}{rest}");
        ApiError::field(name.trim_start_matches('.'), e.message)
    })
}

/// Header values given for injection are write-only.
pub(super) fn redact_policy(mut p: cove_api::sandbox::NetworkPolicy) -> cove_api::sandbox::NetworkPolicy {
    for t in &mut p.transforms {
        for v in t.inject_headers.values_mut() {
            *v = "[redacted]".into();
        }
    }
    p
}

impl Core {
    /// Replaces a sandbox's egress policy. A running sandbox gets it at once (flows it forbids
    /// are cut); a paused or stopped one when it next runs.
    pub async fn set_network_policy(
        &self,
        org: &str,
        id: &str,
        policy: NetworkPolicy,
    ) -> Result<SandboxRecord, ApiError> {
        check_policy(Some(&policy), "")?;
        let _op = self.lock_sandbox(id).await;
        let rec = self.get(org, id)?;
        match rec.state {
            S::Running => {
                self.host
                    .set_network_policy(id, Some(&policy))
                    .await
                    .map_err(|e| ApiError::unavailable(id, "applying the network policy failed", &e))?;
            }
            S::Paused | S::Stopped => {}
            other => return Err(not_in(id, other, "running, paused or stopped")),
        }
        self.store.set_network_policy(id, self.seal_policy(Some(policy.clone())).as_ref())?;
        tracing::info!(sandbox_id = %id, mode = ?policy.mode, "network policy replaced");
        self.get(org, id)
    }
}
