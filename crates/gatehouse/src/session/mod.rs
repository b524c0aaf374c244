//! Server-side sessions: the record, its opaque id and hashed key, and the `SessionStore`
//! abstraction with its backends. The raw session id lives only in the cookie and in transit;
//! stores see `SHA-256(id)`, so a store dump cannot be replayed.

pub mod embedded;
pub mod observed;
pub mod redis;
mod wire;

use std::fmt;

use async_trait::async_trait;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::{Deserialize, Serialize};

use crate::clock::UnixTime;
use crate::crypto::{self, CryptoError};
use crate::oidc::UserClaims;

/// Longest cookie value we even look at; real ids are 43 characters.
const MAX_ID_LEN: usize = 64;

/// The opaque session id the browser holds. Not `Debug`, not `Display`: it is a secret.
pub struct SessionId(String);

impl SessionId {
    pub fn generate() -> Result<Self, CryptoError> {
        crypto::random_token().map(Self)
    }

    /// Accept only the exact shape we mint (43 base64url characters, 32 bytes); anything else is
    /// refused before it reaches the store.
    pub fn parse(raw: &str) -> Option<Self> {
        if raw.len() > MAX_ID_LEN || raw.len() != 43 {
            return None;
        }
        let bytes = URL_SAFE_NO_PAD.decode(raw).ok()?;
        (bytes.len() == 32).then(|| Self(raw.to_owned()))
    }

    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn key(&self) -> SessionKey {
        SessionKey(crypto::sha256(self.0.as_bytes()))
    }
}

/// `SHA-256(session id)`: what stores key by. Printing shows only a short prefix.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct SessionKey(pub [u8; 32]);

impl SessionKey {
    /// First 8 hex characters, for logs, audit lines and admin listings.
    pub fn prefix(&self) -> String {
        crypto::hex(&self.0[..4])
    }
}

impl fmt::Debug for SessionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SessionKey({}…)", self.prefix())
    }
}

impl fmt::Display for SessionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.prefix())
    }
}

/// What a store keeps per session. Tokens are sealed (AES-256-GCM, AAD = the session key).
#[derive(Clone, Serialize, Deserialize)]
pub struct SessionRecord {
    /// Bumped on every write; updates are compare-and-set on it.
    pub version: u64,
    pub claims: UserClaims,
    /// Keycloak's session id (`sid`), for back-channel logout.
    pub provider_sid: Option<String>,
    pub created_at: UnixTime,
    pub last_seen: UnixTime,
    pub idle_expires_at: UnixTime,
    pub absolute_expires_at: UnixTime,
    /// When the access token expires (not secret; decides when to refresh without decrypting).
    pub access_expires_at: UnixTime,
    /// When the refresh token expires, if the provider said.
    pub refresh_expires_at: Option<UnixTime>,
    /// When the current access token was received; with `access_expires_at` it gives the token's
    /// lifetime, which bounds the refresh skew. Absent in records written before it existed.
    #[serde(default)]
    pub access_issued_at: Option<UnixTime>,
    /// Stored after the JSON metadata as raw bytes (see `encode`), never inside the JSON.
    #[serde(skip)]
    pub sealed_tokens: Vec<u8>,
    #[serde(default)]
    pub client_ip: Option<String>,
    #[serde(default)]
    pub user_agent: Option<String>,
    /// HMAC tag (base64url) over the session key, the fields the token envelope's AAD binds and
    /// the envelope's nonce and GCM tag (see `Exchange::meta_tag`): lets a request that needs no
    /// token authenticate the record without decrypting the envelope. Absent in records written
    /// before it existed; those are checked by opening the envelope, as before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub meta_tag: Option<String>,
}

/// A session's two deadlines, as answers show them.
#[derive(Serialize, Clone, Copy)]
pub struct SessionTimes {
    pub expires_at: UnixTime,
    pub idle_expires_at: UnixTime,
}

impl SessionRecord {
    pub fn times(&self) -> SessionTimes {
        SessionTimes { expires_at: self.absolute_expires_at, idle_expires_at: self.idle_expires_at }
    }

    /// The moment the session ends unless used again.
    pub fn expires_at(&self) -> UnixTime {
        self.idle_expires_at.min(self.absolute_expires_at)
    }

    pub fn is_expired(&self, now: UnixTime) -> bool {
        now >= self.expires_at()
    }

    /// `format ‖ u32 metadata length ‖ metadata ‖ sealed tokens`. The sealed tokens stay out of
    /// the metadata: the hot path (`/auth/me`) decodes only the small metadata, never the token
    /// blob. Format 2's metadata is protobuf (`wire`), format 1's JSON.
    pub fn encode(&self, format: RecordFormat) -> Result<Vec<u8>, StoreError> {
        let (tag, meta) = match format {
            RecordFormat::Binary => (FORMAT_BINARY, wire::encode(self)?),
            RecordFormat::Json => {
                (FORMAT_JSON, serde_json::to_vec(self).map_err(|e| StoreError::Corrupt(e.to_string()))?)
            }
        };
        if meta.len() > MAX_METADATA_BYTES {
            return Err(StoreError::Corrupt("record metadata too large".into()));
        }
        let len = u32::try_from(meta.len()).map_err(|_| StoreError::Corrupt("record too large".into()))?;
        let mut out = Vec::with_capacity(5 + meta.len() + self.sealed_tokens.len());
        out.push(tag);
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(&meta);
        out.extend_from_slice(&self.sealed_tokens);
        Ok(out)
    }

    /// A record in either format, whichever build wrote it.
    pub fn decode(bytes: &[u8]) -> Result<Self, StoreError> {
        let corrupt = |why: &str| StoreError::Corrupt(why.to_string());
        let (&format, rest) = bytes.split_first().ok_or_else(|| corrupt("empty record"))?;
        if !matches!(format, FORMAT_JSON | FORMAT_BINARY) || rest.len() < 4 {
            return Err(corrupt("unknown record format"));
        }
        let (len, rest) = rest.split_at(4);
        let len = u32::from_be_bytes([len[0], len[1], len[2], len[3]]) as usize;
        if rest.len() < len {
            return Err(corrupt("truncated record"));
        }
        // Real metadata is a few hundred bytes; a store entry crafted to be huge is refused
        // before a decoder turns it into many times its size in memory.
        if len > MAX_METADATA_BYTES {
            return Err(corrupt("record metadata too large"));
        }
        let (meta, tokens) = rest.split_at(len);
        let mut record: Self = if format == FORMAT_BINARY {
            wire::decode(meta)?
        } else {
            serde_json::from_slice(meta).map_err(|e| StoreError::Corrupt(e.to_string()))?
        };
        record.sealed_tokens = tokens.to_vec();
        Ok(record)
    }
}

const FORMAT_JSON: u8 = 1;
const FORMAT_BINARY: u8 = 2;
/// Above any real record: the claims come from provider answers, which are read up to 1 MiB
/// (`oidc::read_limited`), and their protobuf form is smaller than that JSON.
const MAX_METADATA_BYTES: usize = 1 << 20;

/// How stores write records (`session.record_format`). Both formats are always read; `json`
/// exists for the first phase of a rolling upgrade from a build that reads only JSON records
/// (docs/operations.md, "Upgrading across the record format change").
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RecordFormat {
    /// Format 2: protobuf metadata.
    #[default]
    Binary,
    /// Format 1: JSON metadata.
    Json,
}

/// The token set, sealed inside the record. Not `Debug`.
#[derive(Serialize, Deserialize)]
pub struct TokenSet {
    pub access_token: String,
    pub refresh_token: Option<String>,
    pub id_token: Option<String>,
}

impl Drop for TokenSet {
    fn drop(&mut self) {
        use zeroize::Zeroize;
        self.access_token.zeroize();
        if let Some(t) = &mut self.refresh_token {
            t.zeroize();
        }
        if let Some(t) = &mut self.id_token {
            t.zeroize();
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("session store unavailable: {0}")]
    Unavailable(String),
    #[error("session record corrupt: {0}")]
    Corrupt(String),
}

/// Where sessions live. Every backend has the same semantics (one conformance suite tests them).
#[async_trait]
pub trait SessionStore: Send + Sync + 'static {
    /// Store a new session (its key is fresh, so this never overwrites).
    async fn insert(&self, key: &SessionKey, record: &SessionRecord) -> Result<(), StoreError>;
    async fn get(&self, key: &SessionKey) -> Result<Option<SessionRecord>, StoreError>;
    /// Replace the record if its stored version is still `expected`; `false` if someone else won.
    async fn compare_and_swap(
        &self,
        key: &SessionKey,
        expected: u64,
        record: &SessionRecord,
    ) -> Result<bool, StoreError>;
    /// Remove a session; returns the record that was there.
    async fn delete(&self, key: &SessionKey) -> Result<Option<SessionRecord>, StoreError>;
    /// Every session of a user (`UserClaims::user_key`).
    async fn list_by_user(&self, user_key: &str) -> Result<Vec<(SessionKey, SessionRecord)>, StoreError>;
    async fn delete_by_user(&self, user_key: &str) -> Result<Vec<(SessionKey, SessionRecord)>, StoreError>;
    /// Every session of a Keycloak session (`sid`).
    async fn delete_by_provider_sid(&self, sid: &str) -> Result<Vec<(SessionKey, SessionRecord)>, StoreError>;
    /// Remove sessions that expired before `now`; returns how many.
    async fn sweep(&self, now: UnixTime) -> Result<usize, StoreError>;
    /// Cheap liveness probe for readiness.
    async fn ping(&self) -> Result<(), StoreError>;
    /// Sessions whose key's hex form starts with `hex_prefix` (admin revocation by prefix).
    async fn find_by_prefix(&self, hex_prefix: &str) -> Result<Vec<(SessionKey, SessionRecord)>, StoreError>;
    /// Remove every session; returns the removed records.
    async fn delete_all(&self) -> Result<Vec<(SessionKey, SessionRecord)>, StoreError>;
    /// Remember `(kind, id)` until `until`; `true` if it was not already remembered. Used for the
    /// back-channel `jti` replay cache and logout tombstones, shared by every replica.
    async fn mark(&self, kind: &str, id: &str, until: UnixTime) -> Result<bool, StoreError>;
    /// Forget a mark (a step that marked first and then failed, so it can be retried).
    async fn unmark(&self, kind: &str, id: &str) -> Result<(), StoreError>;
    async fn is_marked(&self, kind: &str, id: &str, now: UnixTime) -> Result<bool, StoreError>;
    /// Hold the refresh lock of one session across replicas until the guard is dropped. Waits
    /// while another holder has it. Backends serving one process may return a no-op guard (the
    /// exchange already serialises refreshes inside a process).
    async fn lock_refresh(&self, key: &SessionKey) -> Result<RefreshGuard, StoreError>;
    /// How many session records exist (expired ones not yet removed included), for the
    /// `gatehouse_sessions_active` gauge; `None` when the backend cannot say. Called by the
    /// sweeper, not per request.
    async fn count(&self) -> Result<Option<u64>, StoreError> {
        Ok(None)
    }
}

/// Releases a refresh lock when dropped.
pub type RefreshGuard = Box<dyn std::any::Any + Send>;

/// Hex form of a key, for prefix matching and Redis key names.
pub fn key_hex(key: &SessionKey) -> String {
    crypto::hex(&key.0)
}

#[cfg(test)]
pub(crate) mod conformance {
    //! The store contract, run against every backend.
    use super::*;

    pub fn record(user: &str, sid: &str, now: UnixTime) -> SessionRecord {
        SessionRecord {
            version: 1,
            claims: UserClaims { iss: "https://idp".into(), sub: user.into(), ..Default::default() },
            provider_sid: Some(sid.into()),
            created_at: now,
            last_seen: now,
            idle_expires_at: now + 1800,
            absolute_expires_at: now + 43200,
            access_expires_at: now + 300,
            refresh_expires_at: None,
            access_issued_at: Some(now),
            sealed_tokens: vec![1, 2, 3],
            client_ip: None,
            user_agent: None,
            meta_tag: None,
        }
    }

    fn key() -> SessionKey {
        SessionId::generate().unwrap().key()
    }

    pub async fn run(store: &dyn SessionStore) {
        // Real time: Redis applies TTLs against its own clock.
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
        let (k1, k2, k3) = (key(), key(), key());
        let r1 = record("alice", "kc-1", now);
        store.insert(&k1, &r1).await.unwrap();
        store.insert(&k2, &record("alice", "kc-2", now)).await.unwrap();
        store.insert(&k3, &record("bob", "kc-3", now)).await.unwrap();
        store.ping().await.unwrap();

        // get
        let got = store.get(&k1).await.unwrap().unwrap();
        assert_eq!(got.claims.sub, "alice");
        assert!(store.get(&key()).await.unwrap().is_none());

        // compare-and-set
        let mut next = got.clone();
        next.version = 2;
        next.last_seen = now + 10;
        assert!(store.compare_and_swap(&k1, 1, &next).await.unwrap());
        assert!(!store.compare_and_swap(&k1, 1, &next).await.unwrap(), "stale version must lose");
        assert_eq!(store.get(&k1).await.unwrap().unwrap().last_seen, now + 10);
        assert!(!store.compare_and_swap(&key(), 1, &next).await.unwrap(), "CAS on a missing record fails");

        // list / delete by user
        let alice = r1.claims.user_key();
        assert_eq!(store.list_by_user(&alice).await.unwrap().len(), 2);
        assert_eq!(store.delete_by_provider_sid("kc-2").await.unwrap().len(), 1);
        assert!(store.get(&k2).await.unwrap().is_none());
        assert_eq!(store.list_by_user(&alice).await.unwrap().len(), 1, "index follows deletes");
        assert_eq!(store.delete_by_user(&alice).await.unwrap().len(), 1);
        assert!(store.get(&k1).await.unwrap().is_none());
        assert!(store.delete_by_provider_sid("kc-1").await.unwrap().is_empty(), "no orphaned index entries");

        // delete
        assert!(store.delete(&k3).await.unwrap().is_some());
        assert!(store.delete(&k3).await.unwrap().is_none());

        // sweep: idle and absolute expiry
        let (idle, abs, live) = (key(), key(), key());
        let mut r = record("carol", "kc-4", now);
        r.idle_expires_at = now + 5;
        store.insert(&idle, &r).await.unwrap();
        let mut r = record("carol", "kc-5", now);
        r.absolute_expires_at = now + 7;
        store.insert(&abs, &r).await.unwrap();
        store.insert(&live, &record("carol", "kc-6", now)).await.unwrap();
        assert_eq!(store.sweep(now + 6).await.unwrap(), 1);
        assert_eq!(store.sweep(now + 8).await.unwrap(), 1);
        assert!(store.get(&live).await.unwrap().is_some());
        let carol = record("carol", "", now).claims.user_key();
        assert_eq!(store.list_by_user(&carol).await.unwrap().len(), 1, "sweep cleans the user index");
        assert!(store.delete_by_provider_sid("kc-4").await.unwrap().is_empty(), "sweep cleans the sid index");

        // A touch that moves the idle expiry moves it in the sweep index too.
        let mut moved = store.get(&live).await.unwrap().unwrap();
        moved.version += 1;
        moved.idle_expires_at = now + 100_000;
        moved.absolute_expires_at = now + 100_000;
        assert!(store.compare_and_swap(&live, moved.version - 1, &moved).await.unwrap());
        assert_eq!(store.sweep(now + 50_000).await.unwrap(), 0);
        assert_eq!(store.sweep(now + 100_001).await.unwrap(), 1);

        // find by prefix, delete all
        let (a, b) = (key(), key());
        store.insert(&a, &record("dave", "kc-7", now)).await.unwrap();
        store.insert(&b, &record("erin", "kc-8", now)).await.unwrap();
        let found = store.find_by_prefix(&key_hex(&a)[..8]).await.unwrap();
        assert!(found.iter().any(|(k, _)| *k == a));
        assert!(found.iter().all(|(k, _)| key_hex(k).starts_with(&key_hex(&a)[..8])));
        assert_eq!(store.find_by_prefix(&key_hex(&b)).await.unwrap().len(), 1);
        assert!(store.delete_all().await.unwrap().len() >= 2);
        assert!(store.get(&a).await.unwrap().is_none() && store.get(&b).await.unwrap().is_none());
        assert!(store.list_by_user(&record("dave", "", now).claims.user_key()).await.unwrap().is_empty());

        // marks: once only, until they expire
        assert!(store.mark("jti", "j-1", now + 60).await.unwrap());
        assert!(!store.mark("jti", "j-1", now + 60).await.unwrap(), "replay detected");
        assert!(store.is_marked("jti", "j-1", now).await.unwrap());
        assert!(!store.is_marked("jti", "j-2", now).await.unwrap());
        assert!(!store.is_marked("tomb", "j-1", now).await.unwrap(), "kinds are separate");
        store.unmark("jti", "j-1").await.unwrap();
        assert!(!store.is_marked("jti", "j-1", now).await.unwrap(), "unmarked");
        assert!(store.mark("jti", "j-1", now + 60).await.unwrap(), "can be marked again after unmark");

        // the refresh lock can be taken again once released
        drop(store.lock_refresh(&a).await.unwrap());
        drop(store.lock_refresh(&a).await.unwrap());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_id_parse_accepts_only_minted_shape() {
        let id = SessionId::generate().unwrap();
        assert!(SessionId::parse(id.expose()).is_some());
        for bad in [
            "",
            "short",
            &"A".repeat(44),
            &"A".repeat(4000),
            "!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!",
            "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
            "ü",
        ] {
            assert!(SessionId::parse(bad).is_none(), "{bad:?}");
        }
    }

    /// A record with every optional field set, so a round trip that drops one shows.
    fn full_record() -> SessionRecord {
        let mut r = conformance::record("alice", "kc", 10);
        r.claims.email = Some("alice@example.com".into());
        r.claims.email_verified = Some(false);
        r.claims.preferred_username = Some("alice".into());
        r.claims.name = Some("Alice \"Ä\" Liddell".into());
        r.claims.realm_roles = vec!["admin".into(), "user".into()];
        r.claims.client_roles.insert("pb".into(), vec!["reader".into(), "writer".into()]);
        r.claims.client_roles.insert("empty".into(), vec![]);
        r.claims.groups = vec!["/staff".into()];
        r.refresh_expires_at = Some(1800);
        r.access_issued_at = Some(11);
        r.client_ip = Some("192.0.2.7".into());
        r.user_agent = Some("Mozilla/5.0".into());
        r.meta_tag = Some("dGFn".into());
        r.version = u64::MAX;
        r.sealed_tokens = vec![7; 3000];
        r
    }

    fn same(a: &SessionRecord, b: &SessionRecord) {
        // Every field: the struct has no `PartialEq` (it holds sealed secrets), so compare them as JSON.
        assert_eq!(serde_json::to_value(a).unwrap(), serde_json::to_value(b).unwrap());
        assert_eq!(a.sealed_tokens, b.sealed_tokens);
    }

    #[test]
    fn records_roundtrip_in_both_formats() {
        let r = full_record();
        for format in [RecordFormat::Binary, RecordFormat::Json] {
            let bytes = r.encode(format).unwrap();
            assert_eq!(bytes[0], if format == RecordFormat::Binary { FORMAT_BINARY } else { FORMAT_JSON });
            same(&SessionRecord::decode(&bytes).unwrap(), &r);
        }
        let minimal = conformance::record("bob", "kc", 10);
        same(&SessionRecord::decode(&minimal.encode(RecordFormat::Binary).unwrap()).unwrap(), &minimal);
        assert_eq!(RecordFormat::default(), RecordFormat::Binary, "this build writes format 2");
    }

    /// A format-1 record as builds before format 2 wrote it (no `access_issued_at`, no tag) still
    /// reads: those records outlive the upgrade.
    #[test]
    fn records_written_by_older_builds_still_read() {
        let meta = br#"{"version":3,"claims":{"iss":"https://idp","sub":"carol","email":null,"email_verified":null,"preferred_username":"carol","name":null,"realm_roles":["user"],"client_roles":{},"groups":[]},"provider_sid":"kc","created_at":1,"last_seen":2,"idle_expires_at":1801,"absolute_expires_at":43201,"access_expires_at":301,"refresh_expires_at":null,"client_ip":null,"user_agent":null}"#;
        let mut bytes = vec![FORMAT_JSON];
        bytes.extend_from_slice(&(meta.len() as u32).to_be_bytes());
        bytes.extend_from_slice(meta);
        bytes.extend_from_slice(b"sealed");
        let r = SessionRecord::decode(&bytes).unwrap();
        assert_eq!((r.version, r.claims.sub.as_str(), r.idle_expires_at), (3, "carol", 1801));
        assert_eq!((r.access_issued_at, r.meta_tag.as_deref(), &r.sealed_tokens[..]), (None, None, &b"sealed"[..]));
    }

    /// The fuzz target's seeds are real records of each format (so fuzzing starts inside both
    /// decoders, not at the format byte).
    #[test]
    fn the_fuzz_seeds_are_valid_records() {
        let binary = SessionRecord::decode(include_bytes!("../../../../fuzz/corpus/session_record/binary")).unwrap();
        assert_eq!((binary.claims.sub.as_str(), binary.claims.client_roles["c"][0].as_str()), ("s", "x"));
        assert_eq!((binary.access_issued_at, binary.meta_tag.as_deref()), (Some(1), Some("dGFn")));
        let json = SessionRecord::decode(include_bytes!("../../../../fuzz/corpus/session_record/json")).unwrap();
        assert_eq!(json.claims.sub, "s");
    }

    /// Fields protobuf leaves out read as zero: without its expiries a record is long expired
    /// (fail closed), and an empty issuer or subject is not written at all.
    #[test]
    fn binary_records_missing_fields_fail_closed() {
        // Claims only: issuer "i", subject "s"; no times, no version.
        let meta = [0x12, 0x06, 0x0a, 0x01, b'i', 0x12, 0x01, b's'];
        let mut v = vec![FORMAT_BINARY];
        v.extend_from_slice(&(meta.len() as u32).to_be_bytes());
        v.extend_from_slice(&meta);
        let r = SessionRecord::decode(&v).unwrap();
        assert_eq!((r.idle_expires_at, r.absolute_expires_at, r.version), (0, 0, 0));
        assert!(r.is_expired(1), "a record without expiries has ended");
        let mut empty = conformance::record("x", "kc", 10);
        empty.claims.iss.clear();
        assert!(empty.encode(RecordFormat::Binary).is_err(), "never written, so never unreadable");
    }

    /// A field added by a later build (an unknown field number) is skipped, not an error.
    #[test]
    fn binary_records_skip_fields_a_later_build_added() {
        let r = full_record();
        let bytes = r.encode(RecordFormat::Binary).unwrap();
        let meta_len = u32::from_be_bytes(bytes[1..5].try_into().unwrap()) as usize;
        // Field 99 (varint 7) and field 100 (a 3-byte string), appended to the metadata.
        let extra = [0x98, 0x06, 7, 0xA2, 0x06, 3, b'n', b'e', b'w'];
        let mut later = vec![FORMAT_BINARY];
        later.extend_from_slice(&((meta_len + extra.len()) as u32).to_be_bytes());
        later.extend_from_slice(&bytes[5..5 + meta_len]);
        later.extend_from_slice(&extra);
        later.extend_from_slice(&r.sealed_tokens);
        same(&SessionRecord::decode(&later).unwrap(), &r);
    }

    #[test]
    fn malformed_records_are_errors_not_panics() {
        let bytes = full_record().encode(RecordFormat::Binary).unwrap();
        let json = full_record().encode(RecordFormat::Json).unwrap();
        let binary = |meta: &[u8]| {
            let mut v = vec![FORMAT_BINARY];
            v.extend_from_slice(&(meta.len() as u32).to_be_bytes());
            v.extend_from_slice(meta);
            v
        };
        let no_claims = binary(&[0x08, 1]); // version = 1, nothing else
        let empty_sub = binary(&[0x12, 0x03, 0x0a, 0x01, b'i']); // issuer, no subject
        let huge = {
            let mut v = vec![FORMAT_BINARY];
            v.extend_from_slice(&((MAX_METADATA_BYTES + 1) as u32).to_be_bytes());
            v.resize(v.len() + MAX_METADATA_BYTES + 1, 0);
            v
        };
        for bad in [
            &huge[..],
            &[][..],
            &[1][..],
            &[2][..],
            &[3, 0, 0, 0, 0][..],
            &[2, 0, 0, 0, 9, 0x08][..],
            &[1, 0, 0, 0, 200, b'{'][..],
            &[1, 0, 0, 0, 1, b'{'][..],
            &bytes[..10],
            &json[..10],
            &binary(&[0x12, 0x05, 0x0a])[..], // claims longer than the metadata
            &binary(&[0x0f])[..],             // field 1 with an invalid wire type
            // A valid issuer first, so these fail in the decoder, not on the missing issuer.
            &binary(&[0x12, 0x06, 0x0a, 0x01, b'i', 0x12, 0x02, b's'])[..], // subject cut short
            &binary(&[0x12, 0x07, 0x0a, 0x01, b'i', 0x12, 0x02, 0xff, 0xfe])[..], // subject not UTF-8
            &binary(&[0x12, 0x05, 0x0a, 0x01, b'i', 0x12, 0x80])[..],       // length varint cut short
            &no_claims[..],
            &empty_sub[..],
        ] {
            assert!(SessionRecord::decode(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn key_is_sha256_and_prints_prefix_only() {
        let id = SessionId::generate().unwrap();
        let k = id.key();
        assert_eq!(k.0, crypto::sha256(id.expose().as_bytes()));
        assert_eq!(format!("{k}").len(), 8);
        assert!(!format!("{k:?}").contains(id.expose()));
    }
}
