//! A `SessionStore` decorator that measures every operation of the real backend: latency
//! (`gatehouse_session_store_operation_duration_seconds{operation}`), failures
//! (`gatehouse_session_store_errors_total{operation,kind}`) and a client span per operation for
//! traces (`db.system.name` = `redis` or `redb`; no key, id or value is ever an attribute). Wrapping
//! the trait object keeps the backends free of metrics code and covers every caller at once.

use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use tracing::Instrument;

use super::{RefreshGuard, SessionKey, SessionRecord, SessionStore, StoreError, UnixTime};
use crate::metrics::{Metrics, StoreErrorLabels, StoreOpLabels};

pub struct ObservedStore {
    inner: Arc<dyn SessionStore>,
    metrics: Arc<Metrics>,
    /// `redis` or `redb`: the span's `db.system.name`.
    system: &'static str,
}

impl ObservedStore {
    pub fn new(inner: Arc<dyn SessionStore>, metrics: Arc<Metrics>, system: &'static str) -> Self {
        Self { inner, metrics, system }
    }

    async fn run<T>(
        &self,
        operation: &'static str,
        f: impl std::future::Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        // Only under a sampled request's span (telemetry::observe decides): unsampled requests
        // and background work (sweeps, notifications) make none.
        let span = if !crate::telemetry::tracing_request() {
            tracing::Span::none()
        } else {
            tracing::debug_span!(
            "session_store",
            otel.name = operation,
            otel.kind = "client",
            db.system.name = self.system,
            db.operation.name = operation,
            otel.status_code = tracing::field::Empty,
            error.type = tracing::field::Empty,
            )
        };
        let started = Instant::now();
        let out = f.instrument(span.clone()).await;
        self.metrics
            .store_duration
            .get_or_create(&StoreOpLabels { operation })
            .observe(started.elapsed().as_secs_f64());
        if let Err(e) = &out {
            let kind = match e {
                StoreError::Unavailable(_) => "unavailable",
                StoreError::Corrupt(_) => "corrupt",
            };
            self.metrics.store_errors.get_or_create(&StoreErrorLabels { operation, kind }).inc();
            span.record("otel.status_code", "ERROR");
            span.record("error.type", kind);
        }
        out
    }
}

#[async_trait]
impl SessionStore for ObservedStore {
    async fn insert(&self, key: &SessionKey, record: &SessionRecord) -> Result<(), StoreError> {
        self.run("insert", self.inner.insert(key, record)).await
    }
    async fn get(&self, key: &SessionKey) -> Result<Option<SessionRecord>, StoreError> {
        self.run("get", self.inner.get(key)).await
    }
    async fn compare_and_swap(
        &self,
        key: &SessionKey,
        expected: u64,
        record: &SessionRecord,
    ) -> Result<bool, StoreError> {
        self.run("compare_and_swap", self.inner.compare_and_swap(key, expected, record)).await
    }
    async fn delete(&self, key: &SessionKey) -> Result<Option<SessionRecord>, StoreError> {
        self.run("delete", self.inner.delete(key)).await
    }
    async fn list_by_user(&self, user_key: &str) -> Result<Vec<(SessionKey, SessionRecord)>, StoreError> {
        self.run("list_by_user", self.inner.list_by_user(user_key)).await
    }
    async fn delete_by_user(&self, user_key: &str) -> Result<Vec<(SessionKey, SessionRecord)>, StoreError> {
        self.run("delete_by_user", self.inner.delete_by_user(user_key)).await
    }
    async fn delete_by_provider_sid(&self, sid: &str) -> Result<Vec<(SessionKey, SessionRecord)>, StoreError> {
        self.run("delete_by_provider_sid", self.inner.delete_by_provider_sid(sid)).await
    }
    async fn sweep(&self, now: UnixTime) -> Result<usize, StoreError> {
        self.run("sweep", self.inner.sweep(now)).await
    }
    async fn ping(&self) -> Result<(), StoreError> {
        self.run("ping", self.inner.ping()).await
    }
    async fn find_by_prefix(&self, hex_prefix: &str) -> Result<Vec<(SessionKey, SessionRecord)>, StoreError> {
        self.run("find_by_prefix", self.inner.find_by_prefix(hex_prefix)).await
    }
    async fn delete_all(&self) -> Result<Vec<(SessionKey, SessionRecord)>, StoreError> {
        self.run("delete_all", self.inner.delete_all()).await
    }
    async fn mark(&self, kind: &str, id: &str, until: UnixTime) -> Result<bool, StoreError> {
        self.run("mark", self.inner.mark(kind, id, until)).await
    }
    async fn unmark(&self, kind: &str, id: &str) -> Result<(), StoreError> {
        self.run("unmark", self.inner.unmark(kind, id)).await
    }
    async fn is_marked(&self, kind: &str, id: &str, now: UnixTime) -> Result<bool, StoreError> {
        self.run("is_marked", self.inner.is_marked(kind, id, now)).await
    }
    async fn lock_refresh(&self, key: &SessionKey) -> Result<RefreshGuard, StoreError> {
        self.run("lock_refresh", self.inner.lock_refresh(key)).await
    }
    async fn count(&self) -> Result<Option<u64>, StoreError> {
        self.run("count", self.inner.count()).await
    }
}
