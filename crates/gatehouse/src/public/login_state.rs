//! The login in flight (`state`, `nonce`, PKCE verifier, `return_to`), sealed into a short-lived
//! `__Host-` cookie so it is bound to the browser that started the flow (SECURITY 11).

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::{Deserialize, Serialize};

use crate::clock::UnixTime;
use crate::crypto::Keyring;

const AAD: &[u8] = b"gatehouse-login-v1";
/// How long a user has to finish logging in at the provider.
pub const LIFETIME: i64 = 600;
const MAX_COOKIE: usize = 4096;

#[derive(Serialize, Deserialize)]
pub struct LoginState {
    pub state: String,
    pub nonce: String,
    pub verifier: String,
    pub return_to: String,
    pub started_at: UnixTime,
}

impl LoginState {
    pub fn seal(&self, keyring: &Keyring) -> Option<String> {
        let json = zeroize::Zeroizing::new(serde_json::to_vec(self).ok()?);
        Some(URL_SAFE_NO_PAD.encode(keyring.seal(&json, AAD).ok()?))
    }

    /// `None` for anything forged, tampered, malformed or expired.
    pub fn open(value: &str, keyring: &Keyring, now: UnixTime) -> Option<Self> {
        if value.len() > MAX_COOKIE {
            return None;
        }
        let sealed = URL_SAFE_NO_PAD.decode(value).ok()?;
        let plain = keyring.open(&sealed, AAD).ok()?;
        let s: Self = serde_json::from_slice(&plain).ok()?;
        (now >= s.started_at && now - s.started_at <= LIFETIME).then_some(s)
    }
}
