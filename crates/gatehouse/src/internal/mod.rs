//! The East-West face: internal services exchange a session id for the user's access token and
//! claims. Reachable only on the internal listener (mutual TLS, or behind an Envoy sidecar on
//! loopback), only by callers on the exact allow-list, rate-limited and audited per caller.

mod exchange;
pub(crate) mod xfcc;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::{ConnectInfo, Request};
use axum::response::{IntoResponse, Response};
use axum::routing::post;

use crate::Core;
use crate::config::{InternalConfig, InternalMode};
use crate::error::ApiError;
use crate::limit::Kind;
use crate::pipeline::{Pipeline, Steps, Templates};
use crate::tls::identity::Caller;

pub struct InternalState {
    pub core: Arc<Core>,
    mode: InternalMode,
    allow: HashSet<String>,
}

/// The internal face: its pipeline (observe → caller check and per-caller limit) in front of the
/// router.
pub fn router(core: Arc<Core>, config: &InternalConfig) -> Pipeline<InternalState> {
    // The per-caller limit is the core's `Limiter` (`Kind::InternalCaller`), shared across replicas
    // with the Redis store; its idle local buckets are pruned by the public face's cleanup task.
    let observe = core.observer(crate::metrics::Face::internal);
    let state = Arc::new(InternalState { core, mode: config.mode, allow: config.allow.iter().cloned().collect() });
    let mut templates = Templates::default();
    let mut router = Router::new();
    for (path, handler) in [
        ("/internal/v1/session/exchange", post(exchange::exchange_json)),
        ("/internal/v1/token", post(exchange::token_exchange)),
    ] {
        templates.add(path);
        router = router.route(path, handler);
    }
    let router = router
        .fallback(|| async { ApiError::NotFound })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .with_state(state.clone());
    Pipeline::new(state, router, observe, templates)
}

impl Steps for InternalState {
    async fn admit(&self, req: &mut Request) -> Option<Response> {
        match authorize(self, req.uri().path(), req.headers(), req.extensions()).await {
            Ok(id) => {
                req.extensions_mut().insert(id);
                axum::extract::DefaultBodyLimit::max(8 * 1024).apply(req);
                None
            }
            Err(refused) => Some(refused),
        }
    }
}

/// Who is calling, and may they? Runs before any body is read. (Takes the request's parts, not the
/// request: its body is not `Sync`, and the check awaits.)
async fn authorize(
    st: &InternalState,
    path: &str,
    headers: &axum::http::HeaderMap,
    extensions: &axum::http::Extensions,
) -> Result<crate::tls::identity::CallerIdentity, Response> {
    let caller = match st.mode {
        // In mtls mode the identity comes from the verified certificate only; any
        // `x-forwarded-client-cert` header is ignored (SECURITY 21).
        InternalMode::Mtls => extensions.get::<Caller>().cloned().map_or(Err("no client certificate"), |c| c.0),
        InternalMode::Envoy => {
            let from_loopback = extensions.get::<ConnectInfo<SocketAddr>>().is_some_and(|c| c.0.ip().is_loopback());
            if from_loopback {
                xfcc::caller(headers)
            } else {
                Err("x-forwarded-client-cert accepted only from loopback")
            }
        }
    };
    let id = match caller {
        Ok(id) if st.allow.contains(id.as_str()) => id,
        Ok(id) => {
            tracing::warn!(target: "gatehouse::audit", caller = %id, path, outcome = "forbidden", "caller not on internal.allow");
            // An unlisted caller's name is not a label value (the set would be unbounded).
            st.core.metrics.exchange_refused(crate::metrics::ExchangeOutcome::CallerForbidden);
            return Err(ApiError::Forbidden("forbidden", "caller is not allowed".into()).into_response());
        }
        Err(why) => {
            tracing::warn!(target: "gatehouse::audit", reason = why, path, outcome = "forbidden", "caller has no valid identity");
            st.core.metrics.exchange_refused(crate::metrics::ExchangeOutcome::CallerForbidden);
            return Err(ApiError::Forbidden("forbidden", "caller is not allowed".into()).into_response());
        }
    };
    match st.core.limiter.check(Kind::InternalCaller, id.as_str()).await {
        Ok(d) if d.allowed => {}
        Ok(d) => {
            tracing::warn!(target: "gatehouse::audit", caller = %id, outcome = "rate_limited", "internal rate limit hit");
            st.core.metrics.exchange_refused(crate::metrics::ExchangeOutcome::RateLimited);
            return Err(ApiError::TooManyRequests(d).into_response());
        }
        Err(_) => return Err(ApiError::StoreUnavailable.into_response()),
    }
    Ok(id)
}
