//! `[[views]]` as written in the configuration file, and the checks `check-config` runs on them:
//! every part names an existing route, every template placeholder is known, every allow-listed
//! field, rename and key is well formed. A view that passes here cannot build an ambiguous path
//! at request time (see `template.rs`).

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Deserializer};

use super::template::Template;
use crate::config::{ConfigError, RouteConfig};

/// One composed view: `GET <path>` answers one JSON object merged from its parts.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ViewConfig {
    /// Name for logs and errors; the default path is `/api/views/<name>`.
    pub name: String,
    /// `/api/views/...`, segments of letters, digits, `-._~`, or a whole-segment `{param}`.
    #[serde(default)]
    pub path: Option<String>,
    /// Longest time the whole view may take; parts still running then count as timed out.
    #[serde(default = "default_deadline", deserialize_with = "de_duration")]
    pub deadline: Duration,
    pub parts: Vec<PartConfig>,
}

/// What happens to the view when a part fails.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Policy {
    /// The view answers 502 naming the part; no partial data.
    #[default]
    Required,
    /// The part's key is `null` and the part is listed in `partial`.
    Optional,
}

/// One upstream call of a view and how its answer is shaped.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartConfig {
    pub name: String,
    /// The `prefix` of an existing `[[routes]]` entry: the call inherits its upstream, relay,
    /// TLS, connection pool and in-flight limit. Or `@session`: the signed-in user's claims and
    /// session expiries (as `/auth/me`), without an upstream call.
    pub route: String,
    /// Path (and optional query) relative to the route's upstream URL, with `{param}` and
    /// `{claim.sub}` / `{claim.preferred_username}` placeholders. Empty for `@session`.
    #[serde(default)]
    pub path: String,
    /// Where the part lands in the answer (default: the part's name).
    #[serde(default)]
    pub key: Option<String>,
    /// Dotted path of the sub-tree to take from the upstream's answer before the allow-list.
    #[serde(default)]
    pub target: Option<String>,
    /// Allow-list of dotted field paths; nothing else reaches the browser. Arrays are shaped
    /// element by element.
    pub fields: Vec<String>,
    /// Dotted source path (one of `fields`, or an interior object of one) → new key name.
    #[serde(default)]
    pub rename: BTreeMap<String, String>,
    #[serde(default)]
    pub policy: Policy,
    /// Longest wait for this part (headers and body); default: the route's `timeout`.
    #[serde(default, deserialize_with = "de_opt_duration")]
    pub timeout: Option<Duration>,
    /// Largest upstream answer accepted for this part.
    #[serde(default = "default_max_bytes")]
    pub max_bytes: usize,
}

fn default_deadline() -> Duration {
    Duration::from_secs(10)
}

fn default_max_bytes() -> usize {
    1024 * 1024
}

fn parse_duration(t: &str) -> Result<Duration, String> {
    humantime::parse_duration(t.trim()).map_err(|e| format!("`{t}` is not a duration like 500ms or 2s: {e}"))
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RawDuration {
    Text(String),
    Seconds(u64),
}

fn de_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    match RawDuration::deserialize(d)? {
        RawDuration::Seconds(s) => Ok(Duration::from_secs(s)),
        RawDuration::Text(t) => parse_duration(&t).map_err(serde::de::Error::custom),
    }
}

fn de_opt_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    de_duration(d).map(Some)
}

/// The prefix under which views live; no `[[routes]]` prefix may start with it.
pub const VIEWS_PREFIX: &str = "/api/views/";

/// Longest accepted value of one path parameter.
pub const MAX_PARAM_LEN: usize = 128;

pub(crate) fn is_plain_segment(s: &str) -> bool {
    !s.is_empty() && s != "." && s != ".." && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"-._~".contains(&b))
}

/// A field name, key or rename target: letters, digits, `_`, `-` (dots separate path steps).
fn is_field_name(s: &str) -> bool {
    !s.is_empty() && s.len() <= 64 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"_-$".contains(&b))
}

fn is_field_path(s: &str) -> bool {
    s.split('.').all(is_field_name)
}

/// An allow-list entry: field names, or `*` for every key of a map.
fn is_field_pattern(s: &str) -> bool {
    s.split('.').all(|step| step == "*" || is_field_name(step))
}

/// The `route` of a part that reads the signed-in user's session instead of calling an upstream.
pub const SESSION_SOURCE: &str = "@session";

impl ViewConfig {
    /// The request path pattern.
    pub fn path(&self) -> String {
        self.path.clone().unwrap_or_else(|| format!("{VIEWS_PREFIX}{}", self.name))
    }

    /// Names of the `{param}` segments of the path, in order.
    pub fn params(&self) -> Vec<String> {
        self.path()
            .split('/')
            .filter_map(|s| s.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
            .map(str::to_owned)
            .collect()
    }

    pub(crate) fn validate(&self, routes: &[RouteConfig]) -> Result<(), ConfigError> {
        let bad = |key: &'static str, why: String| ConfigError::Invalid {
            key,
            problem: format!("view `{}`: {why}", self.name),
        };
        if !is_plain_segment(&self.name) {
            return Err(bad("views.name", "use letters, digits, `-._~`".into()));
        }
        let path = self.path();
        let Some(rest) = path.strip_prefix(VIEWS_PREFIX) else {
            return Err(bad("views.path", format!("`{path}` must start with {VIEWS_PREFIX}")));
        };
        let mut params = Vec::new();
        for seg in rest.split('/') {
            match seg.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
                Some(p) if is_field_name(p) && !params.contains(&p) => params.push(p),
                Some(p) => return Err(bad("views.path", format!("parameter `{{{p}}}` is not a plain, unique name"))),
                None if is_plain_segment(seg) => {}
                None => return Err(bad("views.path", format!("`{path}`: segment `{seg}` is not plain"))),
            }
        }
        if rest.split('/').next().is_some_and(|s| s.starts_with('{')) {
            return Err(bad("views.path", "the first segment after /api/views/ must be a literal name".into()));
        }
        if self.deadline.is_zero() || self.deadline > Duration::from_secs(120) {
            return Err(bad("views.deadline", "must be between 1ms and 2m".into()));
        }
        if self.parts.is_empty() || self.parts.len() > 16 {
            return Err(bad("views.parts", "a view has 1 to 16 parts".into()));
        }
        let params: Vec<String> = params.into_iter().map(str::to_owned).collect();
        let mut keys: Vec<String> = Vec::new();
        for p in &self.parts {
            let pbad = |key: &'static str, why: String| bad(key, format!("part `{}`: {why}", p.name));
            if !is_field_name(&p.name) {
                return Err(pbad("views.parts.name", "use letters, digits, `_`, `-`".into()));
            }
            if p.route == SESSION_SOURCE {
                if !p.path.is_empty() {
                    return Err(pbad("views.parts.path", format!("a `{SESSION_SOURCE}` part has no path")));
                }
            } else if !routes.iter().any(|r| r.prefix == p.route) {
                return Err(pbad(
                    "views.parts.route",
                    format!("no [[routes]] entry has prefix `{}` (or use `{SESSION_SOURCE}`)", p.route),
                ));
            } else {
                Template::parse(&p.path, &params).map_err(|why| pbad("views.parts.path", why))?;
            }
            if let Some(f) = p.fields.iter().find(|f| !is_field_pattern(f)) {
                return Err(pbad("views.parts.fields", format!("`{f}` is not a dotted field path")));
            }
            let key = p.key.clone().unwrap_or_else(|| p.name.clone());
            if !is_field_name(&key) || key == "partial" {
                return Err(pbad(
                    "views.parts.key",
                    format!("`{key}` is not a plain name (and `partial` is reserved)"),
                ));
            }
            if keys.contains(&key) {
                return Err(pbad("views.parts.key", format!("`{key}` is used by two parts")));
            }
            keys.push(key);
            if let Some(t) = &p.target
                && !is_field_path(t)
            {
                return Err(pbad("views.parts.target", format!("`{t}` is not a dotted field path")));
            }
            if p.fields.is_empty() {
                return Err(pbad("views.parts.fields", "list the fields that may reach the browser".into()));
            }
            super::shape::Shape::new(&p.fields, &p.rename).map_err(|why| pbad("views.parts.fields", why))?;
            if p.timeout.is_some_and(|t| t.is_zero()) {
                return Err(pbad("views.parts.timeout", "must be above zero".into()));
            }
            if p.max_bytes == 0 {
                return Err(pbad("views.parts.max_bytes", "must be at least 1".into()));
            }
        }
        Ok(())
    }
}

/// Checks across all views and routes: unique names and paths, no route under `/api/views/`.
pub(crate) fn validate_all(views: &[ViewConfig], routes: &[RouteConfig]) -> Result<(), ConfigError> {
    if views.is_empty() {
        return Ok(());
    }
    if let Some(r) = routes.iter().find(|r| r.prefix.starts_with(VIEWS_PREFIX)) {
        return Err(ConfigError::Invalid {
            key: "routes.prefix",
            problem: format!("`{}` is under {VIEWS_PREFIX}, which belongs to [[views]]", r.prefix),
        });
    }
    for (n, v) in views.iter().enumerate() {
        v.validate(routes)?;
        let shape = |v: &ViewConfig| -> Vec<String> {
            v.path().split('/').map(|s| if s.starts_with('{') { "{}".to_owned() } else { s.to_owned() }).collect()
        };
        if views[..n].iter().any(|o| o.name == v.name || shape(o) == shape(v)) {
            return Err(ConfigError::Invalid {
                key: "views.path",
                problem: format!("view `{}`: its name or path is used twice", v.name),
            });
        }
    }
    Ok(())
}
