//! The refresh lock across replicas: `SET NX PX` with a random token and a lease, renewed while
//! the holder waits for the provider, released by compare-and-delete. A holder that dies blocks
//! the session only until its lease runs out.

use std::time::Duration;

use redis::Script;

use super::RedisStore;
use super::connection::Conn;
use crate::crypto;
use crate::session::{RefreshGuard, SessionKey, StoreError, key_hex};

/// How long a refresh lock lives unless renewed; renewed every third of it while held.
pub(super) const LOCK_LEASE: Duration = Duration::from_secs(5);
/// Longest a request waits for another replica's refresh.
pub(super) const LOCK_WAIT: Duration = Duration::from_secs(20);

pub(super) fn lock_key(hex: &str) -> String {
    format!("{}:lock:{{{hex}}}", super::PREFIX)
}

/// Releases the lock (compare-and-delete) and stops renewing it when dropped.
struct RedisLock {
    renewer: tokio::task::JoinHandle<()>,
    release: Option<(Conn, Script, String, String)>,
}

impl Drop for RedisLock {
    fn drop(&mut self) {
        self.renewer.abort();
        if let Some((mut c, script, key, token)) = self.release.take() {
            tokio::spawn(async move {
                let _ = tokio::time::timeout(
                    Duration::from_secs(2),
                    script.key(key).arg(token).invoke_async::<i64>(&mut c),
                )
                .await;
            });
        }
    }
}

impl RedisStore {
    pub(super) async fn lock_refresh_session(&self, key: &SessionKey) -> Result<RefreshGuard, StoreError> {
        let name = lock_key(&key_hex(key));
        let token = crypto::random_token().map_err(|_| StoreError::Unavailable("random generator failed".into()))?;
        let lease_ms = LOCK_LEASE.as_millis() as u64;
        let deadline = tokio::time::Instant::now() + LOCK_WAIT;
        let mut c = self.conn().await?;
        loop {
            let got: Option<String> = self
                .run(redis::cmd("SET").arg(&name).arg(&token).arg("NX").arg("PX").arg(lease_ms).query_async(&mut c))
                .await?;
            if got.is_some() {
                break;
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(StoreError::Unavailable("timed out waiting for another replica's token refresh".into()));
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        // Renew while held, so a slow provider call cannot let a second replica in.
        let (renew, mut rc, rname, rtoken) = (self.renew.clone(), self.conn().await?, name.clone(), token.clone());
        let renewer = tokio::spawn(async move {
            loop {
                tokio::time::sleep(LOCK_LEASE / 3).await;
                let r = tokio::time::timeout(
                    Duration::from_secs(1),
                    renew.key(&rname).arg(&rtoken).arg(lease_ms).invoke_async::<i64>(&mut rc),
                )
                .await;
                if !matches!(r, Ok(Ok(1))) {
                    tracing::warn!("could not renew a refresh lock; another replica may refresh too");
                }
            }
        });
        Ok(Box::new(RedisLock { renewer, release: Some((self.conn().await?, self.release.clone(), name, token)) }))
    }
}
