//! The check face: a gateway in front of the application (nginx `auth_request`, ingress-nginx
//! `auth-url`, Traefik ForwardAuth, Caddy `forward_auth`, Envoy ext_authz over HTTP or gRPC) asks
//! "who is this browser?" and, when allowed, gets the user's access token to forward upstream.
//! Because an allowed answer carries a token, this face lives on its own listener (`[check]`),
//! never the public one, and authenticates its caller first: mutual TLS with an identity on
//! `check.allow`, or a shared key in `X-Gatehouse-Check-Key` (a header, or gRPC metadata)
//! compared in constant time. Two thin adapters (`http`, `grpc`) over one decision (`decide`):
//! the session is resolved (and refreshed, single-flight) by `Exchange::resolve`, nothing else.

pub(crate) mod decide;
pub(crate) mod grpc;
mod http;

use std::collections::HashSet;
use std::sync::Arc;

use axum::Router;
use axum::extract::Request;
use axum::http::{HeaderName, header};
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use secrecy::ExposeSecret;

use crate::Core;
use crate::config::{CheckConfig, CookieSettings};
use crate::error::ApiError;
use crate::pipeline::{Pipeline, Steps, Templates, mark_sensitive};
use crate::tls::identity::Caller;

/// The header a gateway without a client certificate sends the shared key in.
pub const KEY_HEADER: &str = "x-gatehouse-check-key";
/// The path of the HTTP check.
pub const PATH: &str = "/check";

pub struct CheckState {
    pub core: Arc<Core>,
    mtls: bool,
    allow: HashSet<String>,
    key_file: Option<std::path::PathBuf>,
    /// SHA-256 of the shared key, read at start and again every `reload_interval` (the file is
    /// not read on the per-request path); `None` when it could not be read: nobody gets in by key.
    key_hash: arc_swap::ArcSwapOption<[u8; 32]>,
    pub(crate) cookie: CookieSettings,
    pub(crate) origin: String,
    pub(crate) claim_headers: Vec<String>,
}

/// `all` is read here, at start-up, for the cookie and the origin the CSRF rule compares.
pub fn router(core: Arc<Core>, all: &crate::config::Config, config: &CheckConfig) -> Pipeline<CheckState> {
    let state = Arc::new(CheckState {
        cookie: all.cookie(),
        origin: all.public_origin(),
        core,
        mtls: config.mtls(),
        allow: config.allow.iter().cloned().collect(),
        key_file: config.key_file.clone(),
        key_hash: arc_swap::ArcSwapOption::empty(),
        claim_headers: config.claim_headers.clone(),
    });
    if state.key_file.is_some() {
        load_key(&state);
        // A rotated key file takes effect within `reload_interval`; the task ends with the state.
        let (weak, every) = (Arc::downgrade(&state), config.reload_interval);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.tick().await;
            loop {
                tick.tick().await;
                let Some(st) = weak.upgrade() else { break };
                load_key(&st);
            }
        });
    }
    let mut templates = Templates::default();
    let mut router = Router::new();
    // Any method: nginx's `auth_request` subrequest keeps the original request's method; Envoy's
    // ext_authz `http_service` with `path_prefix: /check` appends the original path.
    for path in [PATH, "/check/{*original}"] {
        templates.add(path);
        router = router.route(path, any(http::check));
    }
    // Envoy ext_authz v3 over gRPC (HTTP/2), on the same listener and behind the same caller check.
    templates.add(&grpc::route());
    let router = router
        .route_service(&grpc::route(), grpc::service(state.clone()))
        .fallback(|| async { ApiError::NotFound })
        .with_state(state.clone());
    let observe = state.core.observer(crate::metrics::Face::check);
    Pipeline::new(state, router, observe, templates)
}

/// Secrets a log line must never show, in requests and answers.
const SENSITIVE: [HeaderName; 4] = [
    header::COOKIE,
    header::AUTHORIZATION,
    HeaderName::from_static(KEY_HEADER),
    HeaderName::from_static(http::COOKIE_OUT),
];

impl Steps for CheckState {
    /// Is the caller a gateway we trust? Runs before anything else; refusals are audited.
    async fn admit(&self, req: &mut Request) -> Option<Response> {
        mark_sensitive(req.headers_mut(), &SENSITIVE);
        axum::extract::DefaultBodyLimit::max(0).apply(req);
        refusal(self, req)
    }

    fn finish(&self, resp: &mut Response) {
        mark_sensitive(resp.headers_mut(), &SENSITIVE);
    }
}

/// The caller check: `None` lets the request through; a refusal is audited and answered in the
/// caller's protocol.
fn refusal(st: &CheckState, req: &Request) -> Option<Response> {
    match caller(st, req) {
        Ok(_) => None,
        Err(why) => {
            tracing::warn!(target: "gatehouse::audit", reason = why, path = req.uri().path(), outcome = "forbidden", "check caller not authenticated");
            if is_grpc(req) {
                // A gRPC error, not an ext_authz answer: this caller is not an Envoy we trust, so
                // it gets no `CheckResponse` (an Envoy with a wrong key or certificate fails
                // closed with its `status_on_error`).
                return Some(tonic::Status::permission_denied("caller is not allowed").into_http::<axum::body::Body>());
            }
            Some(ApiError::Forbidden("forbidden", "caller is not allowed".into()).into_response())
        }
    }
}

fn is_grpc(req: &Request) -> bool {
    req.headers().get(axum::http::header::CONTENT_TYPE).is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// Either credential is enough when both are configured; with neither (a loopback listener,
/// which `check-config` insists on) the socket itself is the boundary.
fn caller(st: &CheckState, req: &Request) -> Result<String, &'static str> {
    if !st.mtls && st.key_file.is_none() {
        return Ok("loopback".into());
    }
    let mut why = "no credential";
    if st.mtls {
        match req.extensions().get::<Caller>().map(|c| &c.0) {
            Some(Ok(id)) if st.allow.contains(id.as_str()) => return Ok(id.to_string()),
            Some(Ok(_)) => why = "caller not on check.allow",
            Some(Err(e)) => why = e,
            None => why = "no client certificate",
        }
    }
    if let (Some(_), Some(sent)) = (&st.key_file, req.headers().get(KEY_HEADER)) {
        let key = st.key_hash.load_full().ok_or("check.key_file unreadable")?;
        // Hashes of equal length on both sides: neither timing nor length says anything about the key.
        if crate::crypto::ct_eq(&crate::crypto::sha256(sent.as_bytes()), key.as_ref()) {
            return Ok("shared-key".into());
        }
        return Err("wrong check key");
    }
    Err(why)
}

/// (Re)read the shared key; an unreadable or too short file leaves no key (fail closed).
fn load_key(st: &CheckState) {
    let Some(path) = &st.key_file else { return };
    match crate::config::read_check_key(path) {
        Ok(key) => st.key_hash.store(Some(Arc::new(crate::crypto::sha256(key.expose_secret().as_bytes())))),
        Err(e) => {
            tracing::error!(error = %e, "check.key_file unreadable: no gateway can authenticate by key");
            st.key_hash.store(None);
        }
    }
}
