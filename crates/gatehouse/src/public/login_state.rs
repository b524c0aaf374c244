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

#[cfg(test)]
mod tests {
    use super::*;

    fn keyring(byte: u8) -> Keyring {
        let key = base64::engine::general_purpose::STANDARD.encode([byte; 32]);
        Keyring::new(&secrecy::SecretString::from(key), &[]).unwrap()
    }

    fn state() -> LoginState {
        LoginState {
            state: "s".into(),
            nonce: "n".into(),
            verifier: "v".into(),
            return_to: "/notes".into(),
            started_at: 1_000_000,
        }
    }

    /// SECURITY 11: the login in flight lives 600 s, opens only under our key, and any edit to
    /// the cookie value fails.
    #[test]
    fn a_login_state_opens_only_within_its_lifetime_under_our_key_and_unedited() {
        let ring = keyring(7);
        let sealed = state().seal(&ring).unwrap();
        let opened = LoginState::open(&sealed, &ring, 1_000_000 + LIFETIME).expect("at the limit");
        assert_eq!((opened.state.as_str(), opened.return_to.as_str()), ("s", "/notes"));
        assert!(LoginState::open(&sealed, &ring, 1_000_000 + LIFETIME + 1).is_none(), "expired");
        assert!(LoginState::open(&sealed, &ring, 1_000_000 - 1).is_none(), "from the future");
        assert!(LoginState::open(&sealed, &keyring(8), 1_000_000).is_none(), "another deployment's key");
        let mut edited = sealed.clone().into_bytes();
        let mid = edited.len() / 2;
        edited[mid] = if edited[mid] == b'A' { b'B' } else { b'A' };
        assert!(LoginState::open(std::str::from_utf8(&edited).unwrap(), &ring, 1_000_000).is_none(), "edited");
        assert!(LoginState::open(&"A".repeat(MAX_COOKIE + 1), &ring, 1_000_000).is_none(), "oversized");
        assert!(LoginState::open("not base64!", &ring, 1_000_000).is_none());
    }
}
