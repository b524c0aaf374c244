//! The refresh lock across replicas: `SET NX PX` with a random token and a lease, renewed while
//! the holder waits for the provider, released by compare-and-delete that also `PUBLISH`es the
//! release (see `notify`). A waiter sleeps until that message, not on a timer: it re-checks by
//! itself only when the lease would run out (a holder that died blocks the session only until
//! then) or, while the subscription is down, on a short poll.

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
/// How often a waiter re-checks while the release subscription is down (degraded mode only).
const DEGRADED_POLL: Duration = Duration::from_millis(50);

pub(super) fn lock_key(hex: &str) -> String {
    format!("{}:lock:{{{hex}}}", super::PREFIX)
}

/// Releases the lock (compare-and-delete) and stops renewing it when dropped.
struct RedisLock {
    renewer: tokio::task::JoinHandle<()>,
    /// Connection, release script, lock key, lock token, session key hex (the release message).
    release: Option<(Conn, Script, String, String, String)>,
}

impl Drop for RedisLock {
    fn drop(&mut self) {
        self.renewer.abort();
        if let Some((mut c, script, key, token, hex)) = self.release.take() {
            tokio::spawn(async move {
                // A lost release is not fatal: waiters re-check when the lease runs out.
                let _ = tokio::time::timeout(
                    Duration::from_secs(2),
                    script.key(key).arg(token).arg(super::notify::CHANNEL).arg(hex).invoke_async::<i64>(&mut c),
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
        let hex = key_hex(key);
        self.released.start();
        // Registered before the first attempt, so a release between a failed attempt and the wait
        // is not missed.
        let notify = self.released.waiter(&hex);
        let mut c = self.conn().await?;
        loop {
            let released = notify.notified();
            tokio::pin!(released);
            released.as_mut().enable();
            // `[1, 0]` when taken, else `[0, remaining lease in ms]`.
            let (got, pttl): (i64, i64) =
                self.run(self.acquire.key(&name).arg(&token).arg(lease_ms).invoke_async(&mut c)).await?;
            if got == 1 {
                break;
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return Err(StoreError::Unavailable("timed out waiting for another replica's token refresh".into()));
            }
            // The normal wake-up is the holder's release message. The timer is only the fallback:
            // when the lease would run out (a dead holder), or a short poll while unsubscribed.
            let fallback = if self.released.subscribed() {
                Duration::from_millis(u64::try_from(pttl).unwrap_or(0).clamp(1, lease_ms) + 5)
            } else {
                DEGRADED_POLL
            };
            if tokio::time::timeout(fallback.min(deadline - now), released).await.is_err() {
                tracing::debug!(session = %key, "refresh lock re-checked without a release message");
            }
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
        Ok(Box::new(RedisLock { renewer, release: Some((self.conn().await?, self.release.clone(), name, token, hex)) }))
    }
}
