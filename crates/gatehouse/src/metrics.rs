//! Prometheus metrics, served on the admin listener. Labels never carry users, sessions or raw paths.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Outcome {
    pub outcome: String,
}

impl Outcome {
    pub fn new(outcome: &str) -> Self {
        Self { outcome: outcome.to_owned() }
    }
}

/// A proxied request: the route's prefix (from config, never the request path) and the outcome.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteOutcome {
    pub route: String,
    pub outcome: String,
}

impl RouteOutcome {
    pub fn new(route: &str, outcome: &str) -> Self {
        Self { route: route.to_owned(), outcome: outcome.to_owned() }
    }
}

/// A composed view's answer: the view's name (from config) and the outcome.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ViewOutcome {
    pub view: String,
    pub outcome: String,
}

/// A failed part of a composed view: view and part names (from config) and the reason.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ViewPartFailure {
    pub view: String,
    pub part: String,
    pub reason: String,
}

#[derive(Default)]
pub struct Metrics {
    pub sessions_created: Counter,
    /// Calls to the provider's token endpoint with a refresh token, by outcome.
    pub refreshes: Family<Outcome, Counter>,
    /// Logins (code flow and password), by outcome.
    pub logins: Family<Outcome, Counter>,
    /// Session exchanges on the internal listener, by outcome.
    pub exchanges: Family<Outcome, Counter>,
    /// Requests through the API proxy, by route and outcome (`ok`, `4xx`, `5xx`, `upgraded`).
    pub proxied: Family<RouteOutcome, Counter>,
    /// Composed views answered, by view and outcome (`ok`, `partial`, `not_modified`,
    /// `part_failed`, `4xx`, `5xx`).
    pub views: Family<ViewOutcome, Counter>,
    /// Failed parts of composed views, by view, part and reason.
    pub view_part_failures: Family<ViewPartFailure, Counter>,
}

impl Metrics {
    pub fn register(&self, registry: &mut Registry) {
        // Counter names get `_total` appended by the encoder; registering a name that already ends
        // in `_total` would panic.
        registry.register("gatehouse_sessions_created", "Sessions created", self.sessions_created.clone());
        registry.register(
            "gatehouse_token_refreshes",
            "Refresh-token grants sent to the provider",
            self.refreshes.clone(),
        );
        registry.register("gatehouse_logins", "Login attempts by outcome", self.logins.clone());
        registry.register("gatehouse_exchanges", "Internal session exchanges by outcome", self.exchanges.clone());
        registry.register(
            "gatehouse_proxied_requests",
            "API proxy requests by route and outcome",
            self.proxied.clone(),
        );
        registry.register("gatehouse_views", "Composed view requests by view and outcome", self.views.clone());
        registry.register(
            "gatehouse_view_part_failures",
            "Failed parts of composed views by view, part and reason",
            self.view_part_failures.clone(),
        );
    }
}
