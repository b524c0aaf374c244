//! The user's identity as Gatehouse exposes it: normalized from Keycloak's token claims into the
//! shape of `/auth/me` and the exchange (`realm_roles`, `client_roles`, `groups`).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct UserClaims {
    pub iss: String,
    pub sub: String,
    #[serde(default)]
    pub email: Option<String>,
    #[serde(default)]
    pub email_verified: Option<bool>,
    #[serde(default)]
    pub preferred_username: Option<String>,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub realm_roles: Vec<String>,
    #[serde(default)]
    pub client_roles: BTreeMap<String, Vec<String>>,
    #[serde(default)]
    pub groups: Vec<String>,
}

pub(super) fn has_roles(c: &Map<String, Value>) -> bool {
    c.contains_key("realm_access") || c.contains_key("resource_access")
}

fn strings(v: Option<&Value>) -> Vec<String> {
    v.and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_str).map(str::to_owned).collect())
        .unwrap_or_default()
}

/// The claims `/auth/me` and the exchange show: all but the issuer (and `email_verified`, which
/// only the exchange adds), borrowed from the record for serialising.
#[derive(Serialize)]
pub struct ShownClaims<'a> {
    sub: &'a str,
    email: Option<&'a str>,
    preferred_username: Option<&'a str>,
    name: Option<&'a str>,
    realm_roles: &'a [String],
    client_roles: &'a BTreeMap<String, Vec<String>>,
    groups: &'a [String],
}

impl UserClaims {
    pub fn shown(&self) -> ShownClaims<'_> {
        ShownClaims {
            sub: &self.sub,
            email: self.email.as_deref(),
            preferred_username: self.preferred_username.as_deref(),
            name: self.name.as_deref(),
            realm_roles: &self.realm_roles,
            client_roles: &self.client_roles,
            groups: &self.groups,
        }
    }

    /// Identity from the validated ID token; roles and groups from it, else from the verified access token.
    pub fn from_tokens(id: &Map<String, Value>, access: Option<&Map<String, Value>>) -> Self {
        let s = |k: &str| id.get(k).and_then(Value::as_str).map(str::to_owned);
        let roles_src = if has_roles(id) { id } else { access.unwrap_or(id) };
        let realm_roles = strings(roles_src.get("realm_access").and_then(|r| r.get("roles")));
        let client_roles = roles_src
            .get("resource_access")
            .and_then(Value::as_object)
            .map(|m| m.iter().map(|(client, v)| (client.clone(), strings(v.get("roles")))).collect())
            .unwrap_or_default();
        let groups = if id.contains_key("groups") {
            strings(id.get("groups"))
        } else {
            strings(access.and_then(|a| a.get("groups")))
        };
        Self {
            iss: s("iss").unwrap_or_default(),
            sub: s("sub").unwrap_or_default(),
            email: s("email"),
            email_verified: id.get("email_verified").and_then(Value::as_bool),
            preferred_username: s("preferred_username"),
            name: s("name"),
            realm_roles,
            client_roles,
            groups,
        }
    }

    /// Take roles and groups from a verified access token, keeping the identity fields: a refresh
    /// response without an ID token proves no new identity, only current authorizations. A claim
    /// the new token lacks means none: roles and groups removed at the provider are removed here.
    pub fn refresh_roles(&mut self, access: &Map<String, Value>) {
        let fresh = Self::from_tokens(access, Some(access));
        self.realm_roles = fresh.realm_roles;
        self.client_roles = fresh.client_roles;
        self.groups = strings(access.get("groups"));
    }

    /// The user key: (`iss`, `sub`), never the email (SECURITY 16).
    pub fn user_key(&self) -> String {
        format!("{}\u{1f}{}", self.iss, self.sub)
    }
}
