//! Back-channel logouts this replica has validated but could not apply, because the session
//! store was unavailable when they arrived.
//!
//! Keycloak does not deliver a back-channel logout again after a 5xx, so dropping one would let
//! its sessions live on after the store comes back ("resurrected" sessions) until their next
//! refresh fails. The core keeps them here — bounded, in this replica's memory — retries them in
//! the background until the store accepts them, and meanwhile treats every session they name as
//! ended. Only validly signed logout tokens get in, so only a flood of those can fill the queue;
//! when full, the oldest entry is dropped (and counted) rather than the queue growing.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

/// How many logouts one replica keeps at most.
pub const CAPACITY: usize = 10_000;

/// One validated logout token's effect, kept until it is applied. No session id, no token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PendingLogout {
    /// The provider session (`sid`) whose sessions end, when the token named one.
    pub sid: Option<String>,
    /// The user (`sub`) named by the token; it selects the sessions only when `sid` is absent.
    pub sub: Option<String>,
    /// The user key (`iss`, `sub`) for a logout by user (no `sid`): what records are matched on.
    pub user_key: Option<String>,
    /// How long the `sid` tombstone lasts, counted from when it is finally written.
    pub tombstone_for: i64,
    /// The token's `jti`, marked used once the logout is applied.
    pub jti: String,
    /// The token's `exp`: how long the `jti` mark must last.
    pub exp: i64,
}

impl PendingLogout {
    /// Whether a session of this provider session (`sid`) or user (`user_key`) is ended by it.
    fn ends(&self, provider_sid: Option<&str>, user_key: &str) -> bool {
        match (&self.sid, &self.user_key) {
            (Some(sid), _) => provider_sid == Some(sid.as_str()),
            (None, Some(user)) => user == user_key,
            (None, None) => false,
        }
    }
}

/// The bounded queue. `len` mirrors the queue's length so the request path can skip the lock
/// when nothing is pending — the normal state.
pub struct PendingLogouts {
    capacity: usize,
    len: AtomicUsize,
    queue: Mutex<VecDeque<PendingLogout>>,
    /// Wakes the retry loop when an entry is added.
    wake: tokio::sync::Notify,
}

/// What `push` did.
#[derive(Debug, PartialEq, Eq)]
pub enum Pushed {
    Added,
    /// The same token (`jti`) is already pending.
    AlreadyPending,
    /// Added; the queue was full, so this, the oldest entry, was dropped.
    DroppedOldest(PendingLogout),
}

impl PendingLogouts {
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity: capacity.max(1),
            len: AtomicUsize::new(0),
            queue: Mutex::new(VecDeque::new()),
            wake: tokio::sync::Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<PendingLogout>> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn len(&self) -> usize {
        self.len.load(Ordering::Acquire)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn push(&self, entry: PendingLogout) -> Pushed {
        let outcome = {
            let mut q = self.lock();
            if q.iter().any(|p| p.jti == entry.jti) {
                return Pushed::AlreadyPending;
            }
            let dropped = if q.len() >= self.capacity { q.pop_front() } else { None };
            q.push_back(entry);
            self.len.store(q.len(), Ordering::Release);
            dropped.map_or(Pushed::Added, Pushed::DroppedOldest)
        };
        self.wake.notify_one();
        outcome
    }

    /// A copy of the entries, oldest first (the retry loop works on it without the lock).
    pub fn snapshot(&self) -> Vec<PendingLogout> {
        if self.is_empty() {
            return Vec::new();
        }
        self.lock().iter().cloned().collect()
    }

    /// Remove the entry of this token, if it is still pending; returns whether it was.
    pub fn remove(&self, jti: &str) -> bool {
        if self.is_empty() {
            return false;
        }
        let mut q = self.lock();
        let before = q.len();
        q.retain(|p| p.jti != jti);
        self.len.store(q.len(), Ordering::Release);
        q.len() != before
    }

    /// Whether a pending logout ends a session of this provider session or user. One atomic load
    /// when nothing is pending; a scan of at most `CAPACITY` entries otherwise (only during an
    /// outage, and cheap next to the store round trip a request makes anyway).
    pub fn ends(&self, provider_sid: Option<&str>, user_key: &str) -> bool {
        if self.is_empty() {
            return false;
        }
        self.lock().iter().any(|p| p.ends(provider_sid, user_key))
    }

    /// Whether a pending logout names this provider session (a login for it must be refused).
    pub fn ends_provider_session(&self, sid: &str) -> bool {
        if self.is_empty() {
            return false;
        }
        self.lock().iter().any(|p| p.sid.as_deref() == Some(sid))
    }

    /// Wait until an entry is added (returns at once if one was added since the last wait).
    pub async fn added(&self) {
        self.wake.notified().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(jti: &str, sid: Option<&str>, user: Option<&str>) -> PendingLogout {
        PendingLogout {
            sid: sid.map(Into::into),
            sub: user.map(Into::into),
            user_key: user.map(|u| format!("iss\u{1f}{u}")),
            tombstone_for: 60,
            jti: jti.into(),
            exp: 0,
        }
    }

    #[test]
    fn matches_by_sid_or_for_a_sub_only_logout_by_user() {
        let q = PendingLogouts::new(10);
        assert!(!q.ends(Some("s1"), "iss\u{1f}alice"), "empty: nothing ends");
        q.push(entry("j1", Some("s1"), Some("alice")));
        assert!(q.ends(Some("s1"), "iss\u{1f}bob"), "by sid");
        assert!(!q.ends(Some("s2"), "iss\u{1f}alice"), "a logout with a sid ends only that provider session");
        assert!(!q.ends(None, "iss\u{1f}alice"));
        q.push(entry("j2", None, Some("carol")));
        assert!(q.ends(Some("s9"), "iss\u{1f}carol"), "a sub-only logout ends every session of the user");
        assert!(!q.ends(Some("s9"), "other-iss\u{1f}carol"), "of that user at the pinned issuer only");
        assert!(q.ends_provider_session("s1"));
        assert!(!q.ends_provider_session("s9"));
        assert!(q.remove("j1"));
        assert!(!q.remove("j1"));
        assert!(!q.ends(Some("s1"), "iss\u{1f}bob"));
        assert_eq!(q.len(), 1);
    }

    #[test]
    fn is_bounded_drops_the_oldest_and_keeps_one_entry_per_token() {
        let q = PendingLogouts::new(3);
        for i in 0..3 {
            assert_eq!(q.push(entry(&format!("j{i}"), Some(&format!("s{i}")), None)), Pushed::Added);
        }
        assert_eq!(q.push(entry("j1", Some("s1"), None)), Pushed::AlreadyPending);
        assert_eq!(q.len(), 3);
        match q.push(entry("j3", Some("s3"), None)) {
            Pushed::DroppedOldest(p) => assert_eq!(p.jti, "j0"),
            other => panic!("{other:?}"),
        }
        assert_eq!(q.len(), 3, "never grows past its capacity");
        let jtis: Vec<_> = q.snapshot().into_iter().map(|p| p.jti).collect();
        assert_eq!(jtis, ["j1", "j2", "j3"], "oldest first");
        assert!(!q.ends_provider_session("s0"));
    }
}
