//! A face's request pipeline as one service: `observe` (metrics, server span), then the face's
//! own guards (header limits, caller checks, rate limits, CSRF) as plain code, then the router —
//! all in one future, boxed once per request.
//!
//! Why not `axum::middleware::from_fn` layers on the router: `Router::layer` wraps every route in
//! one more boxed service per layer, and each `from_fn` clones and boxes its inner service and the
//! request's future again — a dozen allocations and future moves per request before any handler
//! ran (docs/benchmarks.md, "A leaner request pipeline").

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::Router;
use axum::extract::Request;
use axum::response::{IntoResponse as _, Response};
use tower::ServiceExt as _;

use crate::telemetry::Observe;

/// What a face does to a request between `observe` and its router. The pipeline, not the face,
/// calls the router, and only after `admit` let the request through: a face cannot reach its
/// routes around its own checks.
pub trait Steps: Send + Sync + 'static {
    /// Refuse the request (the answer) or let it through (`None`); may mark it up on the way.
    fn admit(&self, req: &mut Request) -> impl Future<Output = Option<Response>> + Send;

    /// Every answer passes here on its way out, refusals included.
    fn finish(&self, _resp: &mut Response) {}
}

async fn run<S: Steps>(steps: &S, router: Router, mut req: Request) -> Response {
    use futures_util::FutureExt as _;
    let mut resp = match steps.admit(&mut req).await {
        Some(refused) => refused,
        // A handler that panics (a bug, or an extension's code) costs its request a JSON 500 and
        // nothing else: the connection, the other requests and the process go on, and the answer
        // still passes `finish` (security headers, `no-store`). Without this the connection would
        // be dropped with no answer. The panic's message is the panic hook's to print; it is not
        // copied into the log here.
        None => match std::panic::AssertUnwindSafe(router.oneshot(req)).catch_unwind().await {
            Ok(Ok(resp)) => resp,
            Ok(Err(never)) => match never {},
            Err(_) => {
                tracing::error!("a request handler panicked; answered 500");
                crate::error::ApiError::Internal.into_response()
            }
        },
    };
    steps.finish(&mut resp);
    resp
}

/// Flag header values as sensitive (`Debug` prints them redacted; HTTP/2 never indexes them).
pub fn mark_sensitive(headers: &mut http::HeaderMap, names: &[http::HeaderName]) {
    for name in names {
        if let http::header::Entry::Occupied(mut values) = headers.entry(name) {
            for value in values.iter_mut() {
                value.set_sensitive(true);
            }
        }
    }
}

/// The route templates of a face, for metrics labels and span names before the router runs (the
/// router's own `MatchedPath` exists only inside it). `matchit` is the router's own matcher, so a
/// path gets the same template here as there.
#[derive(Default)]
pub struct Templates(matchit::Router<Arc<str>>);

impl Templates {
    /// Add a template the router also serves. Templates are ours or checked by the router (which
    /// refuses conflicting ones at start-up), so a refusal here cannot happen; it would only leave
    /// that route labelled "other".
    pub fn add(&mut self, template: &str) {
        if let Err(e) = self.0.insert(template, Arc::from(template)) {
            tracing::warn!(template, error = %e, "route template not added to the metrics labels");
        }
    }

    fn find(&self, path: &str) -> Option<Arc<str>> {
        self.0.at(path).ok().map(|m| m.value.clone())
    }
}

pub struct Pipeline<S> {
    steps: Arc<S>,
    router: Router,
    observe: Arc<Observe>,
    templates: Arc<Templates>,
}

impl<S> Clone for Pipeline<S> {
    fn clone(&self) -> Self {
        Self {
            steps: self.steps.clone(),
            router: self.router.clone(),
            observe: self.observe.clone(),
            templates: self.templates.clone(),
        }
    }
}

impl<S: Steps> Pipeline<S> {
    pub fn new(steps: Arc<S>, router: Router, observe: Arc<Observe>, templates: Templates) -> Self {
        Self { steps, router, observe, templates: Arc::new(templates) }
    }
}

impl<S: Steps, B> tower::Service<http::Request<B>> for Pipeline<S>
where
    B: axum::body::HttpBody<Data = axum::body::Bytes> + Send + 'static,
    B::Error: Into<axum::BoxError>,
{
    type Response = Response;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let req = req.map(axum::body::Body::new);
        let route = self.templates.find(req.uri().path());
        let this = self.clone();
        Box::pin(async move {
            let Pipeline { steps, router, observe, .. } = this;
            Ok(crate::telemetry::observe(&observe, route.as_ref(), req, |req| run(&*steps, router, req)).await)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::Templates;

    #[test]
    fn a_path_is_labelled_with_the_template_the_router_would_match() {
        let mut t = Templates::default();
        for template in ["/auth/me", "/api/{*rest}", "/api/views/{*rest}", "/api/ext/items/{id}"] {
            t.add(template);
        }
        let label = |path| t.find(path).map(|l| l.to_string());
        assert_eq!(label("/auth/me").as_deref(), Some("/auth/me"));
        assert_eq!(label("/api/pb/records").as_deref(), Some("/api/{*rest}"));
        assert_eq!(label("/api/views/dashboard").as_deref(), Some("/api/views/{*rest}"), "the more specific wildcard");
        assert_eq!(label("/api/ext/items/42").as_deref(), Some("/api/ext/items/{id}"));
        // Unmatched paths (static files, 404s) are "other": never the raw path, an unbounded label.
        assert_eq!(label("/auth/me/extra"), None);
        assert_eq!(label("/index.html"), None);
    }
}
