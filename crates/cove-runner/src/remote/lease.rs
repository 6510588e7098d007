//! How a runner renews its lease with a control plane: `POST` [`PATH`] with what it says of
//! itself as JSON, signed with the cluster's token in
//! `Authorization: Cove-Lease t=<unix ms>,mac=<hex>`, where `mac` is HMAC-SHA256 of
//! `"<t>\n<body>"` under the token. The token never travels, so plain HTTP to the control plane
//! reveals only what a lease says (an address and a certificate fingerprint, which are public);
//! a signature holds for [`SKEW_MS`] either side of its time, and a replay within it only
//! renews a lease its runner asked for.

use sha2::{Digest, Sha256};

pub const PATH: &str = "/internal/v1/runners/lease";

/// How far a signature's time may be from the control plane's clock.
pub const SKEW_MS: i64 = 30_000;

fn hmac(key: &[u8], message: &[u8]) -> [u8; 32] {
    let mut block = [0u8; 64];
    if key.len() > 64 {
        block[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        block[..key.len()].copy_from_slice(key);
    }
    let pad = |b: u8| block.map(|k| k ^ b);
    let inner = Sha256::new().chain_update(pad(0x36)).chain_update(message).finalize();
    Sha256::new().chain_update(pad(0x5c)).chain_update(inner).finalize().into()
}

fn mac(token: &str, t_ms: i64, body: &[u8]) -> [u8; 32] {
    let mut message = format!("{t_ms}\n").into_bytes();
    message.extend_from_slice(body);
    hmac(token.as_bytes(), &message)
}

/// The `Authorization` value for `body` sent at `t_ms`.
pub fn sign(token: &str, t_ms: i64, body: &[u8]) -> String {
    format!("Cove-Lease t={t_ms},mac={}", hex::encode(mac(token, t_ms, body)))
}

/// Whether `authorization` signs `body` under `token`, at a time within [`SKEW_MS`] of `now_ms`.
pub fn verify(token: &str, authorization: &str, body: &[u8], now_ms: i64) -> bool {
    let Some(rest) = authorization.strip_prefix("Cove-Lease t=") else { return false };
    let Some((t, given)) = rest.split_once(",mac=") else { return false };
    let (Ok(t), Ok(given)) = (t.parse::<i64>(), hex::decode(given)) else { return false };
    if (now_ms - t).abs() > SKEW_MS {
        return false;
    }
    let want = mac(token, t, body);
    given.len() == want.len() && given.iter().zip(want).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hmac_matches_rfc_4231() {
        // Test case 2.
        let mac = hmac(b"Jefe", b"what do ya want for nothing?");
        assert_eq!(hex::encode(mac), "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843");
    }

    #[test]
    fn a_signature_holds_for_its_body_token_and_time_only() {
        let now = 1_800_000_000_000;
        let auth = sign("secret", now, b"{\"id\":\"runner-a\"}");
        assert!(verify("secret", &auth, b"{\"id\":\"runner-a\"}", now + 1_000));
        assert!(!verify("secret", &auth, b"{\"id\":\"runner-b\"}", now));
        assert!(!verify("other", &auth, b"{\"id\":\"runner-a\"}", now));
        assert!(!verify("secret", &auth, b"{\"id\":\"runner-a\"}", now + SKEW_MS + 1));
        assert!(!verify("secret", "Bearer secret", b"", now));
        assert!(!auth.contains("secret"));
    }
}
