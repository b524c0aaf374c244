//! Composed views (`[[views]]`, `GET /api/views/<name>`): one browser request, several calls to
//! configured routes' upstreams, one shaped JSON answer. The aggregating half of the BFF.
//!
//! Order of work, each step refusing before the next costs anything: the fetch-metadata check;
//! the path parameters (a 400 before the session is even read, let alone an upstream called);
//! **one** `Exchange::resolve` for the whole view, so all parts share one access token and a
//! view whose token needs refreshing refreshes it once; then every part concurrently, each under
//! its own timeout and size limit and the view's deadline, through the route's own client
//! (`proxy::json_call`). Each answer is cut to its allow-list (`shape.rs`). A failed `required`
//! part makes the view a 502 naming the part, with no data; a failed `optional` part is `null`
//! and listed in `partial`. Upstream statuses are mapped to a reason, never passed through: an
//! upstream's 401 is that part's failure, not the end of the user's session.

pub mod config;
pub mod shape;
pub mod template;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};

use super::proxy::json_call::CallFailure;
use super::{PublicState, cookies};
use crate::config::Relay;
use crate::error::ApiError;
use crate::metrics::{ViewOutcome, ViewPartFailure};
use crate::session::SessionId;
pub use config::{PartConfig, Policy, ViewConfig};
use shape::Shape;
use template::Template;

/// One view, compiled at start-up.
struct View {
    name: String,
    /// The path split at `/`; `None` marks a parameter segment.
    segments: Vec<Option<String>>,
    deadline: Duration,
    /// Whether any part's route relays the access token (then `resolve` decrypts it).
    needs_token: bool,
    parts: Vec<Part>,
}

struct Part {
    name: String,
    key: String,
    route: String,
    /// `None` for an `@session` part (no upstream call).
    relay: Option<Relay>,
    template: Option<Template>,
    target: Option<String>,
    shape: Shape,
    policy: Policy,
    timeout: Duration,
    max_bytes: usize,
}

/// All configured views.
#[derive(Default)]
pub struct Views {
    views: Vec<View>,
}

impl Views {
    /// Compile the views; the configuration was validated, so a failure here is a bug — it
    /// refuses to start rather than serve a view it cannot check.
    pub fn new(configs: &[ViewConfig], proxy: &super::proxy::Proxy) -> Result<Self, String> {
        let mut views = Vec::new();
        for c in configs {
            let params = c.params();
            let mut parts = Vec::new();
            for p in &c.parts {
                let session = p.route == config::SESSION_SOURCE;
                let (relay, timeout, template) = if session {
                    (None, c.deadline, None)
                } else {
                    let route = proxy
                        .route_by_prefix(&p.route)
                        .ok_or_else(|| format!("view {}: no route {}", c.name, p.route))?;
                    (Some(route.relay()), route.timeout(), Some(Template::parse(&p.path, &params)?))
                };
                parts.push(Part {
                    name: p.name.clone(),
                    key: p.key.clone().unwrap_or_else(|| p.name.clone()),
                    route: p.route.clone(),
                    relay,
                    template,
                    target: p.target.clone(),
                    shape: Shape::new(&p.fields, &p.rename)?,
                    policy: p.policy,
                    timeout: p.timeout.unwrap_or(timeout).min(c.deadline),
                    max_bytes: p.max_bytes,
                });
            }
            views.push(View {
                name: c.name.clone(),
                segments: c.path().split('/').map(|s| (!s.starts_with('{')).then(|| s.to_owned())).collect(),
                deadline: c.deadline,
                needs_token: parts.iter().any(|p| p.relay == Some(Relay::Bearer)),
                parts,
            });
        }
        Ok(Self { views })
    }

    pub fn is_empty(&self) -> bool {
        self.views.is_empty()
    }

    /// The view whose path pattern matches, with the raw parameter segments.
    fn find<'a>(&self, path: &'a str) -> Option<(usize, Vec<&'a str>)> {
        let segs: Vec<&str> = path.split('/').collect();
        self.views.iter().enumerate().find_map(|(i, v)| {
            (v.segments.len() == segs.len()
                && v.segments.iter().zip(&segs).all(|(want, got)| want.as_deref().is_none_or(|w| w == *got)))
            .then(|| (i, v.segments.iter().zip(&segs).filter(|(w, _)| w.is_none()).map(|(_, g)| *g).collect()))
        })
    }
}

/// `GET /api/views/...`.
pub async fn handle(
    State(st): State<Arc<PublicState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    req: Request,
) -> Response {
    let view = st.views.find(req.uri().path()).map(|(i, _)| st.views.views[i].name.clone());
    let core = st.core.clone();
    let resp = match answer(st, peer, req).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    };
    // Unknown paths are not counted: their names would come from the request.
    if let Some(view) = view {
        use crate::metrics::ViewResult as V;
        let outcome = match resp.status().as_u16() {
            304 => V::NotModified,
            200 if resp.extensions().get::<Partial>().is_some() => V::Partial,
            200 => V::Ok,
            502 if resp.extensions().get::<PartFailed>().is_some() => V::PartFailed,
            s if s < 500 => V::ClientError,
            _ => V::ServerError,
        };
        core.metrics.views.get_or_create(&ViewOutcome { view, outcome }).inc();
    }
    resp
}

/// Marks an answer with optional parts missing (for the metric).
#[derive(Clone, Copy)]
struct Partial;

/// Marks a 502 caused by a required part (for the metric).
#[derive(Clone, Copy)]
struct PartFailed;

/// A view's own failure: which part, and why, in the standard error shape.
fn part_failed(view: &str, part: &str, why: CallFailure) -> Response {
    tracing::warn!(view, part, reason = why.reason(), "required view part failed");
    let body = json!({
        "error": "view_part_failed",
        "message": format!("the required part `{part}` failed: {}", why.reason()),
        "part": part,
        "reason": why.reason(),
    });
    let mut resp = (StatusCode::BAD_GATEWAY, Json(body)).into_response();
    resp.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp.extensions_mut().insert(PartFailed);
    resp
}

async fn answer(st: Arc<PublicState>, peer: SocketAddr, req: Request) -> Result<Response, ApiError> {
    if let Some(refused) = super::csrf::cross_origin_read(req.headers()) {
        return Err(refused);
    }
    let path = req.uri().path();
    let Some((index, raw_params)) = st.views.find(path) else {
        return Err(ApiError::NotFound);
    };
    if req.uri().query().is_some() {
        return Err(ApiError::bad_request("bad_parameter", "views take no query string"));
    }
    let mut params = Vec::with_capacity(raw_params.len());
    for raw in raw_params {
        template::check_value(raw).map_err(|why| ApiError::bad_request("bad_parameter", why))?;
        params.push(raw.to_owned());
    }
    let view = &st.views.views[index];

    let id = cookies::read(req.headers(), &st.cookie.name)
        .and_then(|v| SessionId::parse(&v))
        .ok_or(ApiError::Unauthenticated)?;
    let resolved = st.core.exchange.resolve(&id, view.needs_token).await?;
    let claims = &resolved.record.claims;
    let username = claims.preferred_username.clone().unwrap_or_default();
    // Render every path before calling anything: one bad value refuses the whole view.
    let mut paths = Vec::with_capacity(view.parts.len());
    for part in &view.parts {
        paths.push(match &part.template {
            Some(t) => {
                t.render(&params, &claims.sub, &username).map_err(|why| ApiError::bad_request("bad_parameter", why))?
            }
            None => String::new(),
        });
    }
    let me = serde_json::to_value(super::auth::me_body(&resolved.record)).map_err(|_| ApiError::Internal)?;
    let bearer = resolved.access_token.map(|t| format!("Bearer {t}"));
    let session = id.expose().to_owned();
    let headers: HeaderMap = req.headers().clone();

    let calls = view.parts.iter().zip(&paths).map(|(part, rest)| {
        let relay = match part.relay {
            Some(Relay::Bearer) => bearer.as_deref().unwrap_or_default(),
            Some(Relay::Session) => session.as_str(),
            None => "",
        };
        let me = &me;
        let st = &st;
        let headers = &headers;
        async move {
            let trusted = &st.settings.trusted_proxies;
            let got = match part.relay {
                None => Ok(me.clone()),
                Some(_) => {
                    st.proxy
                        .get_json(&part.route, rest, relay, peer, headers, trusted, part.timeout, part.max_bytes)
                        .await
                }
            };
            got.and_then(|v| {
                let sub = match &part.target {
                    Some(t) => shape::target(&v, t).ok_or(CallFailure::NotJson)?,
                    None => &v,
                };
                Ok(part.shape.apply(sub).unwrap_or(Value::Null))
            })
        }
    });
    // All parts at once; the deadline bounds the lot (each part's own timeout is within it).
    let results = tokio::time::timeout(view.deadline, join_all(calls))
        .await
        .unwrap_or_else(|_| vec![Err(CallFailure::Timeout); view.parts.len()]);

    let mut out = Map::new();
    let mut partial = Vec::new();
    for (part, result) in view.parts.iter().zip(&results) {
        if let Err(why) = result {
            let label =
                ViewPartFailure { view: view.name.clone(), part: part.name.clone(), reason: why.reason().into() };
            st.core.metrics.view_part_failures.get_or_create(&label).inc();
        }
    }
    for (part, result) in view.parts.iter().zip(results) {
        match result {
            Ok(v) => {
                out.insert(part.key.clone(), v);
            }
            Err(why) if part.policy == Policy::Required => return Ok(part_failed(&view.name, &part.name, why)),
            Err(why) => {
                tracing::info!(view = %view.name, part = %part.name, reason = why.reason(), "optional view part failed");
                out.insert(part.key.clone(), Value::Null);
                partial.push(Value::String(part.name.clone()));
            }
        }
    }
    let partial_empty = partial.is_empty();
    out.insert("partial".into(), Value::Array(partial));
    let body = serde_json::to_vec(&Value::Object(out)).map_err(|_| ApiError::Internal)?;
    // Defence in depth: an allow-list that names a field in which an upstream echoes the relay
    // header must still not hand the session id or the access token to page script.
    let secrets = [Some(session.as_str()), bearer.as_deref().and_then(|b| b.strip_prefix("Bearer "))];
    if secrets.into_iter().flatten().any(|s| contains(&body, s.as_bytes())) {
        tracing::error!(view = %view.name, "a view's answer held the session id or access token: refused");
        let body = json!({"error": "view_leak", "message": "the view's answer was refused: it held a credential"});
        let mut resp = (StatusCode::BAD_GATEWAY, Json(body)).into_response();
        resp.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        return Ok(resp);
    }
    let etag = format!("\"{}\"", crate::crypto::hex(&crate::crypto::sha256(&body)[..16]));
    let not_modified = req
        .headers()
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().trim_start_matches("W/"))
        .any(|t| t == etag || t == "*");
    let mut resp = if not_modified {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        ([(header::CONTENT_TYPE, "application/json")], body).into_response()
    };
    if !partial_empty {
        resp.extensions_mut().insert(Partial);
    }
    let h = resp.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&etag) {
        h.insert(header::ETAG, v);
    }
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    super::proxy::json_call::security_headers(h);
    Ok(resp)
}

/// Run futures concurrently on this task and collect their outputs in order (a tiny
/// `join_all`, so the crate needs no futures dependency for it).
async fn join_all<F: std::future::Future>(futures: impl Iterator<Item = F>) -> Vec<F::Output> {
    let mut pinned: Vec<std::pin::Pin<Box<F>>> = futures.map(Box::pin).collect();
    let mut outputs: Vec<Option<F::Output>> = pinned.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (fut, out) in pinned.iter_mut().zip(outputs.iter_mut()) {
            if out.is_none() {
                match fut.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => *out = Some(v),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending { std::task::Poll::Pending } else { std::task::Poll::Ready(()) }
    })
    .await;
    outputs.into_iter().flatten().collect()
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}
