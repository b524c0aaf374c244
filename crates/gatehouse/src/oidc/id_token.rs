//! ID-token (and logout-token) validation per OpenID Connect Core §3.1.3.7 and SECURITY 13:
//! signature from the pinned JWKS only, algorithm allow-list, exact issuer, audience, `azp`,
//! time claims with bounded skew, nonce, `at_hash`, and the token's kind.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, Validation};
use serde_json::{Map, Value};

use super::OidcError;
use super::jwks::SigningKey;
use crate::clock::UnixTime;

/// JWTs larger than this are refused before any parsing (SECURITY 13, 24).
pub const MAX_JWT_BYTES: usize = 16 * 1024;
/// Allowed clock skew for `exp`, `iat`, `nbf`.
pub const LEEWAY: i64 = 60;

/// What kind of token we expect; a token of another kind fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenKind {
    Id,
    Access,
    Logout,
}

pub struct Expectations<'a> {
    pub issuer: &'a str,
    pub client_id: &'a str,
    pub trusted_audiences: &'a [String],
    pub algorithms: &'a [Algorithm],
    pub kind: TokenKind,
    /// `Some` at login: the nonce we sent. Refreshed ID tokens carry none.
    pub nonce: Option<&'a str>,
    /// The access token issued alongside, for `at_hash`.
    pub access_token: Option<&'a str>,
    pub now: UnixTime,
}

/// The parts of the header we need before choosing a key.
pub struct Peeked {
    pub alg: Algorithm,
    pub kid: Option<String>,
}

/// Size, shape and header checks that need no key.
pub fn peek(token: &str, exp: &Expectations<'_>) -> Result<Peeked, OidcError> {
    if token.len() > MAX_JWT_BYTES {
        return Err(OidcError::InvalidToken("token too large"));
    }
    if token.split('.').count() != 3 {
        return Err(OidcError::InvalidToken("not a signed JWT"));
    }
    let header = jsonwebtoken::decode_header(token).map_err(|_| OidcError::InvalidToken("malformed token header"))?;
    if !exp.algorithms.contains(&header.alg) {
        return Err(OidcError::InvalidToken("signature algorithm not allowed"));
    }
    // Keys come only from the pinned jwks_uri; embedded or remote key references are ignored by
    // construction (we never read them), and `crit` extensions we do not understand are refused.
    if header.crit.is_some() {
        return Err(OidcError::InvalidToken("unsupported critical header"));
    }
    let typ_ok = matches!(
        (exp.kind, header.typ.as_deref().map(str::to_ascii_lowercase).as_deref()),
        (TokenKind::Id | TokenKind::Access, None | Some("jwt"))
            | (TokenKind::Access, Some("at+jwt"))
            | (TokenKind::Logout, Some("logout+jwt"))
    );
    if !typ_ok {
        return Err(OidcError::InvalidToken("token of the wrong kind"));
    }
    // The signature check runs over the raw parts before anything is decoded, so a garbled payload
    // would otherwise be reported as a bad signature: check the shape first and say what it is.
    let mut parts = token.split('.').skip(1);
    let payload_ok = parts
        .next()
        .and_then(|p| URL_SAFE_NO_PAD.decode(p).ok())
        .is_some_and(|p| serde_json::from_slice::<Map<String, Value>>(&p).is_ok());
    let signature_ok = parts.next().is_some_and(|sig| URL_SAFE_NO_PAD.decode(sig).is_ok_and(|b| !b.is_empty()));
    if !payload_ok || !signature_ok {
        return Err(OidcError::InvalidToken("malformed token"));
    }
    Ok(Peeked { alg: header.alg, kid: header.kid })
}

/// Verify the signature with `key` and check every claim. Returns the claims.
pub fn verify(
    token: &str,
    peeked: &Peeked,
    key: &SigningKey,
    exp: &Expectations<'_>,
) -> Result<Map<String, Value>, OidcError> {
    if let Some(pinned) = key.alg
        && pinned != peeked.alg
    {
        return Err(OidcError::InvalidToken("algorithm does not match the key"));
    }
    // jsonwebtoken checks only the signature and alg here; claim checks below use our clock.
    let mut v = Validation::new(peeked.alg);
    v.algorithms = vec![peeked.alg];
    v.required_spec_claims.clear();
    v.validate_exp = false;
    v.validate_nbf = false;
    v.validate_aud = false;
    let data = jsonwebtoken::decode::<Map<String, Value>>(token, &key.key, &v).map_err(|e| decode_error(&e))?;
    let c = data.claims;
    check_claims(&c, peeked.alg, exp)?;
    Ok(c)
}

/// Name the real reason: a token that is not even well-formed is not a bad signature, and logs
/// that say otherwise send an operator hunting for a key problem that does not exist.
fn decode_error(e: &jsonwebtoken::errors::Error) -> OidcError {
    use jsonwebtoken::errors::ErrorKind;
    OidcError::InvalidToken(match e.kind() {
        ErrorKind::InvalidSignature => "signature does not verify",
        ErrorKind::InvalidAlgorithm | ErrorKind::InvalidAlgorithmName => "algorithm does not match the key",
        ErrorKind::InvalidEcdsaKey
        | ErrorKind::InvalidEddsaKey
        | ErrorKind::InvalidRsaKey(_)
        | ErrorKind::InvalidKeyFormat => "the provider's key cannot verify this token",
        ErrorKind::Base64(_)
        | ErrorKind::Json(_)
        | ErrorKind::Utf8(_)
        | ErrorKind::InvalidToken
        | ErrorKind::InvalidClaimFormat(_) => "malformed token",
        _ => "token cannot be decoded",
    })
}

fn check_claims(c: &Map<String, Value>, alg: Algorithm, exp: &Expectations<'_>) -> Result<(), OidcError> {
    let s = |k: &str| c.get(k).and_then(Value::as_str);
    let n = |k: &str| c.get(k).and_then(Value::as_i64);
    if s("iss") != Some(exp.issuer) {
        return Err(OidcError::InvalidToken("issuer mismatch"));
    }
    let auds: Vec<&str> = match c.get("aud") {
        Some(Value::String(a)) => vec![a.as_str()],
        Some(Value::Array(a)) => a.iter().filter_map(Value::as_str).collect(),
        _ => Vec::new(),
    };
    if exp.kind == TokenKind::Access {
        // An access token is issued to us (azp) for some resource server (aud): only azp is ours to check.
        if s("azp") != Some(exp.client_id) {
            return Err(OidcError::InvalidToken("access token not issued to this client"));
        }
    } else {
        if !auds.contains(&exp.client_id) {
            return Err(OidcError::InvalidToken("audience does not include this client"));
        }
        if auds.iter().any(|a| *a != exp.client_id && !exp.trusted_audiences.iter().any(|t| t == a)) {
            return Err(OidcError::InvalidToken("untrusted audience"));
        }
    }
    match s("azp") {
        Some(azp) if azp != exp.client_id => {
            return Err(OidcError::InvalidToken("azp is not this client"));
        }
        None if auds.len() > 1 && exp.kind == TokenKind::Id => {
            return Err(OidcError::InvalidToken("azp required with several audiences"));
        }
        _ => {}
    }
    let iat = n("iat").ok_or(OidcError::InvalidToken("iat missing"))?;
    if iat > exp.now + LEEWAY {
        return Err(OidcError::InvalidToken("issued in the future"));
    }
    if let Some(nbf) = n("nbf")
        && nbf > exp.now + LEEWAY
    {
        return Err(OidcError::InvalidToken("not yet valid"));
    }
    let expiry = n("exp").ok_or(OidcError::InvalidToken("exp missing"))?;
    if expiry + LEEWAY < exp.now {
        return Err(OidcError::InvalidToken("expired"));
    }
    let kind_claim = s("typ");
    match exp.kind {
        TokenKind::Id => {
            if s("sub").is_none_or(str::is_empty) {
                return Err(OidcError::InvalidToken("sub missing"));
            }
            // Keycloak marks its tokens; an access or refresh token offered as an ID token fails.
            if kind_claim.is_some_and(|t| t != "ID") {
                return Err(OidcError::InvalidToken("token of the wrong kind"));
            }
            if let Some(expected) = exp.nonce
                && !s("nonce").is_some_and(|got| crate::crypto::ct_eq(got.as_bytes(), expected.as_bytes()))
            {
                return Err(OidcError::InvalidToken("nonce mismatch"));
            }
            if let (Some(at_hash), Some(access)) = (s("at_hash"), exp.access_token)
                && !crate::crypto::ct_eq(at_hash.as_bytes(), left_half_hash(alg, access).as_bytes())
            {
                return Err(OidcError::InvalidToken("at_hash mismatch"));
            }
        }
        TokenKind::Access => {
            if kind_claim.is_some_and(|t| t != "Bearer") {
                return Err(OidcError::InvalidToken("token of the wrong kind"));
            }
        }
        TokenKind::Logout => {
            if c.contains_key("nonce") {
                return Err(OidcError::InvalidToken("logout token must not carry a nonce"));
            }
            let has_event = c.get("events").and_then(Value::as_object).is_some_and(|e| {
                e.get("http://schemas.openid.net/event/backchannel-logout").is_some_and(Value::is_object)
            });
            if !has_event {
                return Err(OidcError::InvalidToken("logout event missing"));
            }
            if s("sid").is_none_or(str::is_empty) && s("sub").is_none_or(str::is_empty) {
                return Err(OidcError::InvalidToken("sid or sub required"));
            }
            if s("jti").is_none_or(str::is_empty) {
                return Err(OidcError::InvalidToken("jti missing"));
            }
        }
    }
    Ok(())
}

/// `at_hash`: base64url of the left half of the hash of the access token, the hash matching `alg`.
fn left_half_hash(alg: Algorithm, token: &str) -> String {
    use aws_lc_rs::digest::{SHA256, SHA384, SHA512, digest};
    let h = match alg {
        Algorithm::RS384 | Algorithm::PS384 | Algorithm::ES384 | Algorithm::HS384 => digest(&SHA384, token.as_bytes()),
        Algorithm::RS512 | Algorithm::PS512 | Algorithm::HS512 | Algorithm::EdDSA => digest(&SHA512, token.as_bytes()),
        _ => digest(&SHA256, token.as_bytes()),
    };
    let bytes = h.as_ref();
    URL_SAFE_NO_PAD.encode(&bytes[..bytes.len() / 2])
}
