//! The binary form of a stored record's metadata (record format 2): protobuf, through prost.
//! Every request that carries a session decodes one record, and JSON's text scanning, escape
//! handling and number parsing were the largest single cost of `/auth/me` (docs/benchmarks.md,
//! "A binary session record").
//!
//! Why protobuf and not a positional format (postcard, bincode): its field numbers let a later
//! build add a field that this one skips when reading, as `#[serde(default)]` did for the JSON
//! form (this build drops such a field when it writes the record again, as the JSON form did). Why
//! prost: it is already in the build (tonic, Envoy's ext_authz), so no new crate. Field numbers
//! are a stored format: never reuse or renumber one.

use std::collections::BTreeMap;

use prost::Message;

use super::{SessionRecord, StoreError};
use crate::oidc::UserClaims;

#[derive(Clone, PartialEq, Message)]
struct Meta {
    #[prost(uint64, tag = "1")]
    version: u64,
    #[prost(message, optional, tag = "2")]
    claims: Option<Claims>,
    #[prost(string, optional, tag = "3")]
    provider_sid: Option<String>,
    #[prost(int64, tag = "4")]
    created_at: i64,
    #[prost(int64, tag = "5")]
    last_seen: i64,
    #[prost(int64, tag = "6")]
    idle_expires_at: i64,
    #[prost(int64, tag = "7")]
    absolute_expires_at: i64,
    #[prost(int64, tag = "8")]
    access_expires_at: i64,
    #[prost(int64, optional, tag = "9")]
    refresh_expires_at: Option<i64>,
    #[prost(int64, optional, tag = "10")]
    access_issued_at: Option<i64>,
    #[prost(string, optional, tag = "11")]
    client_ip: Option<String>,
    #[prost(string, optional, tag = "12")]
    user_agent: Option<String>,
    #[prost(string, optional, tag = "13")]
    meta_tag: Option<String>,
}

#[derive(Clone, PartialEq, Message)]
struct Claims {
    #[prost(string, tag = "1")]
    iss: String,
    #[prost(string, tag = "2")]
    sub: String,
    #[prost(string, optional, tag = "3")]
    email: Option<String>,
    #[prost(bool, optional, tag = "4")]
    email_verified: Option<bool>,
    #[prost(string, optional, tag = "5")]
    preferred_username: Option<String>,
    #[prost(string, optional, tag = "6")]
    name: Option<String>,
    #[prost(string, repeated, tag = "7")]
    realm_roles: Vec<String>,
    #[prost(btree_map = "string, message", tag = "8")]
    client_roles: BTreeMap<String, Roles>,
    #[prost(string, repeated, tag = "9")]
    groups: Vec<String>,
}

#[derive(Clone, PartialEq, Message)]
struct Roles {
    #[prost(string, repeated, tag = "1")]
    roles: Vec<String>,
}

/// The metadata of `record` (everything but the sealed tokens, which follow it raw). A record
/// without issuer or subject is refused: `decode` would refuse it, so it would be written and
/// never read again.
pub fn encode(record: &SessionRecord) -> Result<Vec<u8>, StoreError> {
    let c = &record.claims;
    if c.iss.is_empty() || c.sub.is_empty() {
        return Err(StoreError::Corrupt("record without issuer or subject".into()));
    }
    Ok(Meta {
        version: record.version,
        claims: Some(Claims {
            iss: c.iss.clone(),
            sub: c.sub.clone(),
            email: c.email.clone(),
            email_verified: c.email_verified,
            preferred_username: c.preferred_username.clone(),
            name: c.name.clone(),
            realm_roles: c.realm_roles.clone(),
            client_roles: c.client_roles.iter().map(|(k, v)| (k.clone(), Roles { roles: v.clone() })).collect(),
            groups: c.groups.clone(),
        }),
        provider_sid: record.provider_sid.clone(),
        created_at: record.created_at,
        last_seen: record.last_seen,
        idle_expires_at: record.idle_expires_at,
        absolute_expires_at: record.absolute_expires_at,
        access_expires_at: record.access_expires_at,
        refresh_expires_at: record.refresh_expires_at,
        access_issued_at: record.access_issued_at,
        client_ip: record.client_ip.clone(),
        user_agent: record.user_agent.clone(),
        meta_tag: record.meta_tag.clone(),
    }
    .encode_to_vec())
}

/// A record from its metadata, without the sealed tokens (the caller adds them). Protobuf cannot
/// tell a missing number from zero: a record missing its idle or absolute expiry reads as long
/// expired; one missing a bound time (creation, token expiries) fails the metadata tag; a missing
/// last-seen time only makes the next request write the record again. Missing claims, or an
/// empty issuer or subject, are refused (the JSON form refused missing ones; no provider issues
/// empty ones).
pub fn decode(meta: &[u8]) -> Result<SessionRecord, StoreError> {
    let m = Meta::decode(meta).map_err(|e| StoreError::Corrupt(format!("record metadata: {e}")))?;
    let c = m.claims.ok_or_else(|| StoreError::Corrupt("record without claims".into()))?;
    if c.iss.is_empty() || c.sub.is_empty() {
        return Err(StoreError::Corrupt("record without issuer or subject".into()));
    }
    Ok(SessionRecord {
        version: m.version,
        claims: UserClaims {
            iss: c.iss,
            sub: c.sub,
            email: c.email,
            email_verified: c.email_verified,
            preferred_username: c.preferred_username,
            name: c.name,
            realm_roles: c.realm_roles,
            client_roles: c.client_roles.into_iter().map(|(k, v)| (k, v.roles)).collect(),
            groups: c.groups,
        },
        provider_sid: m.provider_sid,
        created_at: m.created_at,
        last_seen: m.last_seen,
        idle_expires_at: m.idle_expires_at,
        absolute_expires_at: m.absolute_expires_at,
        access_expires_at: m.access_expires_at,
        refresh_expires_at: m.refresh_expires_at,
        access_issued_at: m.access_issued_at,
        sealed_tokens: Vec::new(),
        client_ip: m.client_ip,
        user_agent: m.user_agent,
        meta_tag: m.meta_tag,
    })
}
