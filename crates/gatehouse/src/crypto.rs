//! Small cryptographic building blocks: random opaque ids, SHA-256, and an AES-256-GCM keyring
//! for sealing tokens at rest and the login cookie. Keys carry an id (a hash prefix) so old keys
//! keep opening old records while new ones are sealed with the primary key. Each key also yields
//! an HMAC-SHA256 key (derived, never the AES key itself) for tags that authenticate small data
//! without encrypting it: a session record's metadata, checked on every request, is a few hundred
//! bytes, while its token envelope is kilobytes.

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use aws_lc_rs::{digest, hmac};
use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use secrecy::{ExposeSecret, SecretString};
use zeroize::Zeroizing;

#[derive(Debug, thiserror::Error)]
pub enum CryptoError {
    #[error("the operating system's random generator failed")]
    Random,
    #[error("encryption key is not 32 bytes of base64")]
    BadKey,
    #[error("sealed data could not be opened (wrong key, tampered or truncated)")]
    Open,
    #[error("sealing failed")]
    Seal,
}

/// `n` bytes from the OS CSPRNG.
pub fn random_bytes<const N: usize>() -> Result<[u8; N], CryptoError> {
    let mut buf = [0u8; N];
    getrandom::fill(&mut buf).map_err(|_| CryptoError::Random)?;
    Ok(buf)
}

/// A fresh 256-bit opaque token, base64url without padding (43 characters).
pub fn random_token() -> Result<String, CryptoError> {
    Ok(URL_SAFE_NO_PAD.encode(random_bytes::<32>()?))
}

pub fn sha256(data: &[u8]) -> [u8; 32] {
    let d = digest::digest(&digest::SHA256, data);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// Constant-time equality for secrets (state, CSRF values, hashes).
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    use subtle::ConstantTimeEq;
    a.len() == b.len() && bool::from(a.ct_eq(b))
}

const ENVELOPE_VERSION: u8 = 1;
const KEY_ID_LEN: usize = 8;

struct Key {
    id: [u8; KEY_ID_LEN],
    key: LessSafeKey,
    /// `HMAC-SHA256` key derived from the same secret: `SHA-256("gatehouse-mac-key:" ‖ key)`.
    mac: hmac::Key,
}

/// A tag from [`Keyring::tag`]: key id ‖ HMAC-SHA256.
pub const TAG_LEN: usize = KEY_ID_LEN + 32;

/// AES-256-GCM keys: one primary for sealing, any number for opening.
/// Envelope: version ‖ key id ‖ nonce ‖ ciphertext+tag; the AAD binds it to its purpose and record.
pub struct Keyring {
    keys: Vec<Key>,
}

impl Keyring {
    /// `primary` first, then older keys still accepted for opening.
    pub fn new(primary: &SecretString, previous: &[SecretString]) -> Result<Self, CryptoError> {
        let keys = std::iter::once(primary).chain(previous).map(Self::load).collect::<Result<_, _>>()?;
        Ok(Self { keys })
    }

    fn load(b64: &SecretString) -> Result<Key, CryptoError> {
        let text = b64.expose_secret().trim();
        let raw = Zeroizing::new(
            STANDARD
                .decode(text)
                .or_else(|_| URL_SAFE_NO_PAD.decode(text.trim_end_matches('=')))
                .map_err(|_| CryptoError::BadKey)?,
        );
        if raw.len() != 32 {
            return Err(CryptoError::BadKey);
        }
        // The key id is a hash of the key, so operators never have to name keys.
        let digest = sha256(&[b"gatehouse-key-id:".as_slice(), raw.as_slice()].concat());
        let mut id = [0u8; KEY_ID_LEN];
        id.copy_from_slice(&digest[..KEY_ID_LEN]);
        let key = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &raw).map_err(|_| CryptoError::BadKey)?);
        // Domain-separated from the key id's hash, so the (public) id reveals nothing of it.
        let mac_secret = Zeroizing::new(sha256(&[b"gatehouse-mac-key:".as_slice(), raw.as_slice()].concat()));
        let mac = hmac::Key::new(hmac::HMAC_SHA256, mac_secret.as_slice());
        Ok(Key { id, key, mac })
    }

    /// Key ids (hex), the sealing key first: safe to print, they identify keys without revealing them.
    pub fn key_ids(&self) -> Vec<String> {
        self.keys.iter().map(|k| hex(&k.id)).collect()
    }

    /// Whether one key appears twice (a rotation step that forgot to put in a new key).
    pub fn has_duplicates(&self) -> bool {
        self.keys.iter().enumerate().any(|(i, k)| self.keys[..i].iter().any(|o| o.id == k.id))
    }

    pub fn seal(&self, plaintext: &[u8], aad: &[u8]) -> Result<Vec<u8>, CryptoError> {
        let key = self.keys.first().ok_or(CryptoError::Seal)?;
        // Random 96-bit nonces: safe for far more than the 2^32 messages per key NIST allows here,
        // because keys rotate long before a single gateway seals that many records.
        let nonce_bytes = random_bytes::<NONCE_LEN>()?;
        let mut out = Vec::with_capacity(1 + KEY_ID_LEN + NONCE_LEN + plaintext.len() + 16);
        out.push(ENVELOPE_VERSION);
        out.extend_from_slice(&key.id);
        out.extend_from_slice(&nonce_bytes);
        let mut body = plaintext.to_vec();
        key.key
            .seal_in_place_append_tag(Nonce::assume_unique_for_key(nonce_bytes), Aad::from(aad), &mut body)
            .map_err(|_| CryptoError::Seal)?;
        out.extend_from_slice(&body);
        Ok(out)
    }

    /// `key id ‖ HMAC-SHA256(parts…)` under the primary key. Parts are hashed in order as given;
    /// callers length-prefix or fix the size of any part whose boundary matters.
    pub fn tag(&self, parts: &[&[u8]]) -> Result<[u8; TAG_LEN], CryptoError> {
        let key = self.keys.first().ok_or(CryptoError::Seal)?;
        let mut ctx = hmac::Context::with_key(&key.mac);
        for p in parts {
            ctx.update(p);
        }
        let mut out = [0u8; TAG_LEN];
        out[..KEY_ID_LEN].copy_from_slice(&key.id);
        out[KEY_ID_LEN..].copy_from_slice(ctx.sign().as_ref());
        Ok(out)
    }

    /// Check a [`tag`](Self::tag) under whichever key made it (constant-time comparison). A key
    /// rotated out of the ring verifies nothing, as it opens nothing.
    pub fn verify_tag(&self, tag: &[u8], parts: &[&[u8]]) -> Result<(), CryptoError> {
        if tag.len() != TAG_LEN {
            return Err(CryptoError::Open);
        }
        let (id, mac) = tag.split_at(KEY_ID_LEN);
        let key = self.keys.iter().find(|k| k.id == id).ok_or(CryptoError::Open)?;
        let mut ctx = hmac::Context::with_key(&key.mac);
        for p in parts {
            ctx.update(p);
        }
        if ct_eq(ctx.sign().as_ref(), mac) { Ok(()) } else { Err(CryptoError::Open) }
    }

    pub fn open(&self, sealed: &[u8], aad: &[u8]) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
        let header = 1 + KEY_ID_LEN + NONCE_LEN;
        if sealed.len() < header + 16 || sealed[0] != ENVELOPE_VERSION {
            return Err(CryptoError::Open);
        }
        let id = &sealed[1..1 + KEY_ID_LEN];
        let key = self.keys.iter().find(|k| k.id == id).ok_or(CryptoError::Open)?;
        let nonce = Nonce::try_assume_unique_for_key(&sealed[1 + KEY_ID_LEN..header]).map_err(|_| CryptoError::Open)?;
        let mut body = Zeroizing::new(sealed[header..].to_vec());
        let len = key.key.open_in_place(nonce, Aad::from(aad), &mut body).map_err(|_| CryptoError::Open)?.len();
        body.truncate(len);
        Ok(body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(b: u8) -> SecretString {
        SecretString::from(STANDARD.encode([b; 32]))
    }

    #[test]
    fn tokens_are_256_bit_and_distinct() {
        let a = random_token().unwrap();
        let b = random_token().unwrap();
        assert_eq!(URL_SAFE_NO_PAD.decode(&a).unwrap().len(), 32);
        assert_ne!(a, b);
    }

    #[test]
    fn seal_open_roundtrip_and_aad_binding() {
        let ring = Keyring::new(&key(1), &[]).unwrap();
        let sealed = ring.seal(b"refresh-token", b"session-a").unwrap();
        assert!(!sealed.windows(7).any(|w| w == b"refresh"), "plaintext visible in envelope");
        assert_eq!(&ring.open(&sealed, b"session-a").unwrap()[..], b"refresh-token");
        assert!(ring.open(&sealed, b"session-b").is_err(), "AAD must bind the record");
        let mut tampered = sealed.clone();
        let last = tampered.len() - 1;
        tampered[last] ^= 1;
        assert!(ring.open(&tampered, b"session-a").is_err());
        assert!(ring.open(&sealed[..10], b"session-a").is_err());
    }

    #[test]
    fn rotation_opens_old_records_and_seals_with_new_key() {
        let old = Keyring::new(&key(1), &[]).unwrap();
        let sealed_old = old.seal(b"x", b"a").unwrap();
        let rotated = Keyring::new(&key(2), &[key(1)]).unwrap();
        assert_eq!(&rotated.open(&sealed_old, b"a").unwrap()[..], b"x");
        let sealed_new = rotated.seal(b"y", b"a").unwrap();
        assert!(old.open(&sealed_new, b"a").is_err());
        let dropped = Keyring::new(&key(2), &[]).unwrap();
        assert!(dropped.open(&sealed_old, b"a").is_err());
    }

    #[test]
    fn tags_bind_data_and_key_and_follow_rotation() {
        let ring = Keyring::new(&key(1), &[]).unwrap();
        let tag = ring.tag(&[b"meta", b"data"]).unwrap();
        assert!(ring.verify_tag(&tag, &[b"meta", b"data"]).is_ok());
        assert!(ring.verify_tag(&tag, &[b"meta", b"dat4"]).is_err(), "data bound");
        let mut bad = tag;
        bad[TAG_LEN - 1] ^= 1;
        assert!(ring.verify_tag(&bad, &[b"meta", b"data"]).is_err(), "tag bound");
        assert!(ring.verify_tag(&tag[..TAG_LEN - 1], &[b"meta", b"data"]).is_err(), "truncated");
        let rotated = Keyring::new(&key(2), &[key(1)]).unwrap();
        assert!(rotated.verify_tag(&tag, &[b"meta", b"data"]).is_ok(), "old key still verifies");
        assert!(Keyring::new(&key(2), &[]).unwrap().verify_tag(&tag, &[b"meta", b"data"]).is_err(), "rotated away");
        // The MAC key is not the AES key: a tag is not a GCM tag or a plain hash of the data.
        assert_ne!(&tag[KEY_ID_LEN..], &sha256(b"metadata")[..]);
    }

    #[test]
    fn bad_keys_are_refused() {
        assert!(Keyring::new(&SecretString::from("short".to_string()), &[]).is_err());
        assert!(Keyring::new(&SecretString::from(STANDARD.encode([0u8; 16])), &[]).is_err());
    }
}
