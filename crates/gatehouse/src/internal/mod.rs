//! The East-West face: internal services exchange a session id for the user's access token and
//! claims. Reachable only on the internal listener (mutual TLS, or behind an Envoy sidecar on
//! loopback), only by callers on the exact allow-list, rate-limited and audited per caller.

mod exchange;
pub(crate) mod xfcc;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::{ConnectInfo, Request, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::post;

use crate::Core;
use crate::config::{InternalConfig, InternalMode};
use crate::error::ApiError;
use crate::limit::Kind;
use crate::tls::identity::Caller;

pub struct InternalState {
    pub core: Arc<Core>,
    mode: InternalMode,
    allow: HashSet<String>,
}

pub fn router(core: Arc<Core>, config: &InternalConfig) -> Router {
    // The per-caller limit is the core's `Limiter` (`Kind::InternalCaller`), shared across replicas
    // with the Redis store; its idle local buckets are pruned by the public face's cleanup task.
    let state = Arc::new(InternalState { core, mode: config.mode, allow: config.allow.iter().cloned().collect() });
    Router::new()
        .route("/internal/v1/session/exchange", post(exchange::exchange_json))
        .route("/internal/v1/token", post(exchange::token_exchange))
        .fallback(|| async { ApiError::NotFound })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .layer(middleware::from_fn_with_state(state.clone(), authorize))
        .layer(axum::extract::DefaultBodyLimit::max(8 * 1024))
        .layer(middleware::from_fn_with_state(
            state.core.observer(crate::metrics::Face::internal),
            crate::telemetry::observe,
        ))
        .with_state(state)
}

/// Who is calling, and may they? Runs before any body is read.
async fn authorize(State(st): State<Arc<InternalState>>, mut req: Request, next: Next) -> Response {
    let caller = match st.mode {
        // In mtls mode the identity comes from the verified certificate only; any
        // `x-forwarded-client-cert` header is ignored (SECURITY 21).
        InternalMode::Mtls => req.extensions().get::<Caller>().cloned().map_or(Err("no client certificate"), |c| c.0),
        InternalMode::Envoy => {
            let from_loopback =
                req.extensions().get::<ConnectInfo<SocketAddr>>().is_some_and(|c| c.0.ip().is_loopback());
            if from_loopback {
                xfcc::caller(req.headers())
            } else {
                Err("x-forwarded-client-cert accepted only from loopback")
            }
        }
    };
    let id = match caller {
        Ok(id) if st.allow.contains(id.as_str()) => id,
        Ok(id) => {
            tracing::warn!(target: "gatehouse::audit", caller = %id, path = req.uri().path(), outcome = "forbidden", "caller not on internal.allow");
            // An unlisted caller's name is not a label value (the set would be unbounded).
            st.core.metrics.exchange_refused(crate::metrics::ExchangeOutcome::CallerForbidden);
            return ApiError::Forbidden("forbidden", "caller is not allowed".into()).into_response();
        }
        Err(why) => {
            tracing::warn!(target: "gatehouse::audit", reason = why, path = req.uri().path(), outcome = "forbidden", "caller has no valid identity");
            st.core.metrics.exchange_refused(crate::metrics::ExchangeOutcome::CallerForbidden);
            return ApiError::Forbidden("forbidden", "caller is not allowed".into()).into_response();
        }
    };
    match st.core.limiter.check(Kind::InternalCaller, id.as_str()).await {
        Ok(d) if d.allowed => {}
        Ok(d) => {
            tracing::warn!(target: "gatehouse::audit", caller = %id, outcome = "rate_limited", "internal rate limit hit");
            st.core.metrics.exchange_refused(crate::metrics::ExchangeOutcome::RateLimited);
            return ApiError::TooManyRequests(d).into_response();
        }
        Err(_) => return ApiError::StoreUnavailable.into_response(),
    }
    req.extensions_mut().insert(id);
    next.run(req).await
}
