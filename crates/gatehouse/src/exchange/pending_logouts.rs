//! Back-channel logouts this replica has validated but could not apply, because the session
//! store was unavailable when they arrived.
//!
//! Keycloak does not deliver a back-channel logout again after a 5xx, so dropping one would let
//! its sessions live on after the store comes back ("resurrected" sessions) until their next
//! refresh fails. The core keeps them here — bounded, in this replica's memory — retries them in
//! the background until the store accepts them, and meanwhile treats every session they name as
//! ended.
//!
//! Only validly signed logout tokens get in, but anyone who can log in and out at the provider
//! can make it send them. So a full queue never drops another user's entry to make room: it first
//! collapses the entries of one user — the one the new token names, else the one with the most —
//! into a single user-wide entry (which over-logs-out only that user), and only when no user has
//! more than one entry does it refuse the new one. Every look-up the request path makes is a hash
//! look-up, and one atomic load when nothing is pending (the normal state).

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use crate::clock::UnixTime;

/// How many logouts one replica keeps at most.
pub const CAPACITY: usize = 10_000;
/// How many recent removals are remembered for readers whose store read overlapped one.
const RECENT: usize = 1024;

/// A logout token's replay mark (`jti`), written first when the deferred logout is applied.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mark {
    pub jti: String,
    /// How long the mark must last (`exp` + leeway + margin).
    pub until: UnixTime,
    /// Whether a mark of this `jti` already in the store may be this replica's own: an earlier
    /// set-if-absent whose answer was lost, or a mark that could not be taken back. When it
    /// cannot be ours, a mark found in the store means the token was already applied (by another
    /// replica's delivery, or before: a replay) and the entry is dropped unapplied.
    pub may_be_ours: bool,
}

/// One validated logout's effect, kept until it is applied. No session id, no token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PendingLogout {
    /// The provider session (`sid`) whose sessions end (and which is tombstoned when applied).
    /// `None` for a user-wide entry.
    pub sid: Option<String>,
    /// The user (`sub`) the token named, for logs: operators revoke by it.
    pub sub: Option<String>,
    /// The user key (`iss`, `sub`) when the token named a user: the index entries are collapsed
    /// by, and for a user-wide entry what records are matched on.
    pub user_key: Option<String>,
    /// For a user-wide entry (a `sub`-only token, or collapsed entries): only the user's sessions
    /// created at or before this moment end — never one created after the logout.
    pub user_cutoff: Option<UnixTime>,
    /// How long the `sid` tombstone lasts, counted from when it is finally written.
    pub tombstone_for: i64,
    /// The token's replay mark; `None` once collapsed (see the module docs).
    pub mark: Option<Mark>,
    /// When this replica deferred it.
    pub deferred_at: UnixTime,
    /// When it is dropped unapplied: every session it could end has reached its absolute lifetime
    /// by then, and the token's `jti` would no longer need a mark.
    pub expires_at: UnixTime,
    /// Attempts the store refused with something other than "unavailable".
    pub failures: u32,
}

/// Identifies a pending entry between a snapshot and the update or removal that follows it.
pub type EntryId = u64;

#[derive(Default)]
struct UserEntries {
    ids: HashSet<EntryId>,
    /// The latest `user_cutoff` of the user's user-wide entries.
    cutoff: Option<UnixTime>,
}

#[derive(Default)]
struct Inner {
    next: EntryId,
    entries: HashMap<EntryId, PendingLogout>,
    by_jti: HashMap<String, EntryId>,
    by_sid: HashMap<String, HashSet<EntryId>>,
    by_user: HashMap<String, UserEntries>,
    /// The last `RECENT` removals with the removal count each one made: what they matched.
    recent: VecDeque<(u64, Removed)>,
}

/// What a removed entry matched, for `PendingLogouts::removed_since`.
struct Removed {
    sid: Option<String>,
    user_key: Option<String>,
    user_cutoff: Option<UnixTime>,
}

impl Removed {
    fn matches(&self, provider_sid: Option<&str>, user_key: &str, created_at: UnixTime) -> bool {
        match &self.sid {
            Some(sid) => provider_sid == Some(sid.as_str()),
            None => self.user_key.as_deref() == Some(user_key) && self.user_cutoff.is_none_or(|c| created_at <= c),
        }
    }
}

impl Inner {
    fn insert(&mut self, e: PendingLogout) -> EntryId {
        let id = self.next;
        self.next += 1;
        if let Some(m) = &e.mark {
            self.by_jti.insert(m.jti.clone(), id);
        }
        if let Some(sid) = &e.sid {
            self.by_sid.entry(sid.clone()).or_default().insert(id);
        }
        if let Some(user) = &e.user_key {
            let u = self.by_user.entry(user.clone()).or_default();
            u.ids.insert(id);
            if e.sid.is_none()
                && let Some(c) = e.user_cutoff
            {
                u.cutoff = Some(u.cutoff.map_or(c, |old| old.max(c)));
            }
        }
        self.entries.insert(id, e);
        id
    }

    fn remove(&mut self, id: EntryId) -> Option<PendingLogout> {
        let e = self.entries.remove(&id)?;
        if let Some(m) = &e.mark
            && self.by_jti.get(&m.jti) == Some(&id)
        {
            self.by_jti.remove(&m.jti);
        }
        if let Some(sid) = &e.sid
            && let Some(ids) = self.by_sid.get_mut(sid)
        {
            ids.remove(&id);
            if ids.is_empty() {
                self.by_sid.remove(sid);
            }
        }
        if let Some(user) = &e.user_key
            && let Some(u) = self.by_user.get_mut(user)
        {
            u.ids.remove(&id);
            if u.ids.is_empty() {
                self.by_user.remove(user);
            } else if e.sid.is_none() {
                // Only this user's entries: a handful, except for a user whose entries were
                // collapsed, who then has one.
                u.cutoff = u
                    .ids
                    .iter()
                    .filter_map(|i| self.entries.get(i))
                    .filter(|o| o.sid.is_none())
                    .filter_map(|o| o.user_cutoff)
                    .max();
            }
        }
        Some(e)
    }

    /// Replace every entry of `user` (and `incoming`, if given) by one user-wide entry ending the
    /// user's sessions created up to the latest of them. Returns how many entries were merged.
    fn collapse(&mut self, user: &str, incoming: Option<PendingLogout>) -> usize {
        let ids: Vec<EntryId> = self.by_user.get(user).map(|u| u.ids.iter().copied().collect()).unwrap_or_default();
        let merged: Vec<PendingLogout> = ids.into_iter().filter_map(|id| self.remove(id)).chain(incoming).collect();
        let Some(first) = merged.first() else {
            return 0;
        };
        let latest = |e: &PendingLogout| e.user_cutoff.unwrap_or(e.deferred_at).max(e.deferred_at);
        let wide = PendingLogout {
            sid: None,
            sub: merged.iter().find_map(|e| e.sub.clone()),
            user_key: Some(user.to_owned()),
            user_cutoff: merged.iter().map(latest).max(),
            tombstone_for: first.tombstone_for,
            mark: None,
            deferred_at: merged.iter().map(|e| e.deferred_at).min().unwrap_or(first.deferred_at),
            expires_at: merged.iter().map(|e| e.expires_at).max().unwrap_or(first.expires_at),
            failures: 0,
        };
        self.insert(wide);
        merged.len()
    }
}

/// The bounded, indexed queue. `len` mirrors the number of entries so the request path can skip
/// the lock when nothing is pending.
pub struct PendingLogouts {
    capacity: usize,
    len: AtomicUsize,
    /// Bumped on every removal: a reader that saw it unchanged across its store read knows no
    /// entry was applied (record deleted, entry removed) in between.
    removals: AtomicU64,
    inner: Mutex<Inner>,
    /// Wakes the retry loop when an entry is added.
    wake: tokio::sync::Notify,
}

/// What `push` did.
#[derive(Debug, PartialEq, Eq)]
pub enum Pushed {
    Added,
    /// The same token (`jti`) is already pending.
    AlreadyPending,
    /// The queue was full: this user's entries (`merged` of them, the new one included when it is
    /// the same user's) became one user-wide entry, and the new one was kept.
    Collapsed {
        sub: Option<String>,
        merged: usize,
    },
    /// The queue was full and no user had two entries to collapse: the new one was not kept.
    Refused,
}

impl PendingLogouts {
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity: capacity.max(1),
            len: AtomicUsize::new(0),
            removals: AtomicU64::new(0),
            inner: Mutex::new(Inner::default()),
            wake: tokio::sync::Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn publish(&self, inner: &Inner) {
        self.len.store(inner.entries.len(), Ordering::SeqCst);
    }

    pub fn len(&self) -> usize {
        self.len.load(Ordering::SeqCst)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The removal counter (see `removals`).
    pub fn removals(&self) -> u64 {
        self.removals.load(Ordering::SeqCst)
    }

    pub fn push(&self, entry: PendingLogout) -> Pushed {
        let outcome = {
            let mut q = self.lock();
            if let Some(m) = &entry.mark
                && q.by_jti.contains_key(&m.jti)
            {
                return Pushed::AlreadyPending;
            }
            let outcome = if q.entries.len() < self.capacity {
                q.insert(entry);
                Pushed::Added
            } else if let Some(user) = entry.user_key.clone().filter(|u| q.by_user.contains_key(u)) {
                // The user whose token this is — typically whoever floods — pays first.
                let sub = entry.sub.clone();
                let merged = q.collapse(&user, Some(entry));
                Pushed::Collapsed { sub, merged }
            } else if let Some((user, n)) =
                q.by_user.iter().map(|(u, e)| (u.clone(), e.ids.len())).max_by_key(|(_, n)| *n)
                && n >= 2
            {
                // Rare (a full queue) and O(users): frees n - 1 places at once.
                let sub = q.by_user.get(&user).and_then(|u| u.ids.iter().find_map(|i| q.entries.get(i)?.sub.clone()));
                let merged = q.collapse(&user, None);
                q.insert(entry);
                Pushed::Collapsed { sub, merged }
            } else {
                return Pushed::Refused;
            };
            // A collapse removes entries but, under the same lock, adds one that matches at least
            // their users' sessions up to them: readers need not look again.
            self.publish(&q);
            outcome
        };
        self.wake.notify_one();
        outcome
    }

    /// A copy of the entries, oldest first (the retry loop works on it without the lock).
    pub fn snapshot(&self) -> Vec<(EntryId, PendingLogout)> {
        if self.is_empty() {
            return Vec::new();
        }
        let mut all: Vec<_> = self.lock().entries.iter().map(|(id, e)| (*id, e.clone())).collect();
        all.sort_unstable_by_key(|(id, _)| *id);
        all
    }

    /// Remove an entry (applied, expired or given up); `None` if it is already gone.
    pub fn remove(&self, id: EntryId) -> Option<PendingLogout> {
        if self.is_empty() {
            return None;
        }
        let mut q = self.lock();
        let e = q.remove(id);
        if let Some(e) = &e {
            let n = self.removals.fetch_add(1, Ordering::SeqCst) + 1;
            if q.recent.len() >= RECENT {
                q.recent.pop_front();
            }
            let removed = Removed { sid: e.sid.clone(), user_key: e.user_key.clone(), user_cutoff: e.user_cutoff };
            q.recent.push_back((n, removed));
        }
        self.publish(&q);
        e
    }

    /// Whether an entry removed since the removal count was `since` matched this session — the
    /// retry may have deleted its record after the caller read it. `None` when too many were
    /// removed meanwhile to tell.
    pub fn removed_since(
        &self,
        since: u64,
        provider_sid: Option<&str>,
        user_key: &str,
        created_at: UnixTime,
    ) -> Option<bool> {
        if self.removals() == since {
            return Some(false);
        }
        let q = self.lock();
        match q.recent.front() {
            Some((first, _)) if *first <= since + 1 => {}
            _ => return None,
        }
        Some(
            q.recent
                .iter()
                .rev()
                .take_while(|(n, _)| *n > since)
                .any(|(_, r)| r.matches(provider_sid, user_key, created_at)),
        )
    }

    /// Remove the entry of this token (a redelivery applied it); returns whether there was one.
    pub fn remove_token(&self, jti: &str) -> bool {
        if self.is_empty() {
            return false;
        }
        let id = self.lock().by_jti.get(jti).copied();
        id.is_some_and(|id| self.remove(id).is_some())
    }

    /// Note that the entry's `jti` mark may now be in the store on this replica's behalf.
    pub fn mark_may_be_ours(&self, id: EntryId) {
        if let Some(Some(m)) = self.lock().entries.get_mut(&id).map(|e| e.mark.as_mut()) {
            m.may_be_ours = true;
        }
    }

    /// Count a failed attempt; returns the entry's failures so far.
    pub fn failed(&self, id: EntryId) -> u32 {
        self.lock().entries.get_mut(&id).map_or(0, |e| {
            e.failures += 1;
            e.failures
        })
    }

    /// Whether a pending logout ends a session of this provider session, or of this user created
    /// at `created_at`. One atomic load when nothing is pending; hash look-ups otherwise.
    pub fn ends(&self, provider_sid: Option<&str>, user_key: &str, created_at: UnixTime) -> bool {
        if self.is_empty() {
            return false;
        }
        let q = self.lock();
        provider_sid.is_some_and(|s| q.by_sid.contains_key(s))
            || q.by_user.get(user_key).and_then(|u| u.cutoff).is_some_and(|c| created_at <= c)
    }

    /// Whether a pending logout names this provider session (a login for it must be refused).
    pub fn ends_provider_session(&self, sid: &str) -> bool {
        if self.is_empty() {
            return false;
        }
        self.lock().by_sid.contains_key(sid)
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
            user_cutoff: if sid.is_none() { Some(100) } else { None },
            tombstone_for: 60,
            mark: Some(Mark { jti: jti.into(), until: 0, may_be_ours: false }),
            deferred_at: 100,
            expires_at: 1000,
            failures: 0,
        }
    }

    #[test]
    fn matches_by_sid_or_for_a_sub_only_logout_by_user_created_before_it() {
        let q = PendingLogouts::new(10);
        assert!(!q.ends(Some("s1"), "iss\u{1f}alice", 0), "empty: nothing ends");
        q.push(entry("j1", Some("s1"), Some("alice")));
        assert!(q.ends(Some("s1"), "iss\u{1f}bob", 0), "by sid");
        assert!(!q.ends(Some("s2"), "iss\u{1f}alice", 0), "a logout with a sid ends only that provider session");
        assert!(!q.ends(None, "iss\u{1f}alice", 0));
        q.push(entry("j2", None, Some("carol")));
        assert!(q.ends(Some("s9"), "iss\u{1f}carol", 100), "a sub-only logout ends the user's sessions");
        assert!(!q.ends(Some("s9"), "iss\u{1f}carol", 101), "but none created after it");
        assert!(!q.ends(Some("s9"), "other-iss\u{1f}carol", 0), "of that user at the pinned issuer only");
        assert!(q.ends_provider_session("s1"));
        assert!(!q.ends_provider_session("s9"));
        let removals = q.removals();
        assert_eq!(q.removed_since(removals, Some("s1"), "x", 0), Some(false), "nothing removed");
        assert!(q.remove_token("j1"));
        assert!(!q.remove_token("j1"));
        assert_eq!(q.removals(), removals + 1, "a removal is counted");
        assert_eq!(q.removed_since(removals, Some("s1"), "x", 0), Some(true), "a reader of s1 must read again");
        assert_eq!(q.removed_since(removals, Some("s2"), "x", 0), Some(false), "a reader of another need not");
        assert_eq!(q.removed_since(removals + 1, Some("s1"), "x", 0), Some(false), "nor one that read after it");
        assert!(!q.ends(Some("s1"), "iss\u{1f}bob", 0));
        assert_eq!(q.len(), 1);
        let (id, _) = q.snapshot()[0].clone();
        assert!(q.remove(id).is_some());
        assert!(!q.ends(Some("s9"), "iss\u{1f}carol", 0), "the user-wide cutoff goes with its entry");
        assert!(q.is_empty());
    }

    /// SECURITY: a full queue must not push a victim's logout out. A flood of one user's logouts
    /// collapses into one user-wide entry for that user; the victim's entry stays.
    #[test]
    fn a_flood_collapses_the_flooders_entries_and_never_drops_anothers() {
        let q = PendingLogouts::new(4);
        assert_eq!(q.push(entry("victim", Some("vs"), Some("victim"))), Pushed::Added);
        for i in 0..3 {
            assert_eq!(q.push(entry(&format!("m{i}"), Some(&format!("ms{i}")), Some("mallory"))), Pushed::Added);
        }
        assert_eq!(q.push(entry("m1", Some("ms1"), Some("mallory"))), Pushed::AlreadyPending);
        for i in 3..1000 {
            let mut e = entry(&format!("m{i}"), Some(&format!("ms{i}")), Some("mallory"));
            e.deferred_at = 100 + i;
            assert!(matches!(q.push(e), Pushed::Collapsed { .. } | Pushed::Added), "{i}");
            assert!(q.len() <= 4, "never grows past its capacity");
            assert!(q.ends(Some("vs"), "iss\u{1f}victim", 0), "the victim's logout is still pending ({i})");
        }
        assert!(q.ends(Some("anything"), "iss\u{1f}mallory", 1099), "the flooder's sessions up to the last logout end");
        assert!(!q.ends(Some("anything"), "iss\u{1f}mallory", 1100), "not one created after it");

        // Another user's logout still gets in: the flooder's entries collapse again.
        let q = PendingLogouts::new(3);
        q.push(entry("v", Some("vs"), Some("victim")));
        q.push(entry("m0", Some("ms0"), Some("mallory")));
        q.push(entry("m1", Some("ms1"), Some("mallory")));
        assert_eq!(
            q.push(entry("w", Some("ws"), Some("walter"))),
            Pushed::Collapsed { sub: Some("mallory".into()), merged: 2 }
        );
        assert!(q.ends(Some("vs"), "x", 0) && q.ends(Some("ws"), "x", 0));
        assert!(q.ends(Some("ms0"), "iss\u{1f}mallory", 100), "mallory is over-logged-out, not spared");
        assert!(!q.ends_provider_session("ms0"), "the collapsed entry names no sid any more");
    }

    #[test]
    fn a_full_queue_of_distinct_users_refuses_rather_than_drops() {
        let q = PendingLogouts::new(3);
        for i in 0..3 {
            q.push(entry(&format!("j{i}"), Some(&format!("s{i}")), Some(&format!("u{i}"))));
        }
        assert_eq!(q.push(entry("j3", Some("s3"), Some("u3"))), Pushed::Refused);
        assert_eq!(q.push(entry("j4", Some("s4"), None)), Pushed::Refused);
        assert_eq!(q.len(), 3);
        for i in 0..3 {
            assert!(q.ends_provider_session(&format!("s{i}")), "kept {i}");
        }
        let jtis: Vec<_> = q.snapshot().into_iter().filter_map(|(_, p)| p.mark.map(|m| m.jti)).collect();
        assert_eq!(jtis, ["j0", "j1", "j2"], "oldest first");
    }
}
