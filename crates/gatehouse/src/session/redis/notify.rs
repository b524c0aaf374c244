//! Wake-ups for refresh-lock waiters across replicas. A replica that releases a refresh lock
//! `PUBLISH`es the session's key hex on one shared channel (in the same script that deletes the
//! lock, so the message never precedes the release). Every process keeps one long-lived
//! `SUBSCRIBE` connection to that channel and wakes its own waiters for that key, so a waiter takes
//! the lock (and finds the refreshed record) within a round trip of the release instead of on a
//! timer.
//!
//! Pub/sub is best effort: a lost message or a dropped subscription must not strand a waiter.
//! Waiters therefore also re-check when the lock's lease would run out (the holder renews it while
//! it works, so that is rare) and, while the subscription is down, on a short poll. A dropped or
//! re-established subscription wakes every waiter once, since messages may have been missed.
//!
//! Cluster: a plain `PUBLISH` is forwarded to every node over the cluster bus, so the subscriber
//! connects to any one seed node. Sharded pub/sub (`SPUBLISH`) would save that fan-out but needs a
//! subscription per shard that follows slot moves; refreshes are rare (one per session per token
//! lifetime), so the fan-out is the simpler, robust choice.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use futures_util::StreamExt;
use redis::sentinel::SentinelClient;
use tokio::sync::Notify;

/// The one channel every replica listens on; the message is the released session's key hex.
pub(super) const CHANNEL: &str = "gatehouse:refresh-released";
/// How often an otherwise quiet subscription is probed, so a silently dead one is noticed.
const PROBE_EVERY: Duration = Duration::from_secs(15);

/// Where the subscriber connects.
pub(super) enum Source {
    /// One server (or, for a cluster, its seed nodes tried in turn: `PUBLISH` reaches every node).
    Nodes(Vec<redis::Client>),
    /// The master Sentinel names now (asked again on each reconnect, so failovers are followed).
    Sentinel(Arc<tokio::sync::Mutex<SentinelClient>>),
}

/// In-process waiters by session key hex, and the subscription that wakes them.
pub(super) struct Released {
    source: Source,
    timeout: Duration,
    waiters: Mutex<HashMap<String, Weak<Notify>>>,
    subscribed: AtomicBool,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Released {
    pub(super) fn new(source: Source, timeout: Duration) -> Arc<Self> {
        Arc::new(Self {
            source,
            timeout,
            waiters: Mutex::new(HashMap::new()),
            subscribed: AtomicBool::new(false),
            task: Mutex::new(None),
        })
    }

    /// Start the subscriber if it is not running (needs a Tokio runtime, so not done in `open`).
    pub(super) fn start(self: &Arc<Self>) {
        let mut task = self.task.lock().unwrap_or_else(|p| p.into_inner());
        if task.is_none() {
            // The task holds only a weak reference: dropping the store ends it.
            let me = Arc::downgrade(self);
            *task = Some(tokio::spawn(subscriber(me)));
        }
    }

    /// Whether the subscription is up: if not, waiters fall back to a short poll.
    pub(super) fn subscribed(&self) -> bool {
        self.subscribed.load(Ordering::Acquire)
    }

    /// The notifier for one session's lock; hold it while waiting (entries go when unused).
    pub(super) fn waiter(&self, hex: &str) -> Arc<Notify> {
        let mut map = self.waiters.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = map.get(hex).and_then(Weak::upgrade) {
            return n;
        }
        if map.len() > 1024 {
            map.retain(|_, w| w.strong_count() > 0);
        }
        let n = Arc::new(Notify::new());
        map.insert(hex.to_owned(), Arc::downgrade(&n));
        n
    }

    fn wake(&self, hex: &str) {
        let n = self.waiters.lock().unwrap_or_else(|p| p.into_inner()).get(hex).and_then(Weak::upgrade);
        if let Some(n) = n {
            n.notify_waiters();
        }
    }

    fn wake_all(&self) {
        let all: Vec<Arc<Notify>> =
            self.waiters.lock().unwrap_or_else(|p| p.into_inner()).values().filter_map(Weak::upgrade).collect();
        for n in all {
            n.notify_waiters();
        }
    }

    async fn connect(&self) -> redis::RedisResult<redis::aio::PubSub> {
        let clients = match &self.source {
            Source::Nodes(clients) => clients.clone(),
            Source::Sentinel(s) => vec![s.lock().await.async_get_client().await?],
        };
        let mut last = None;
        for client in clients {
            let attempt = async {
                let mut p = client.get_async_pubsub().await?;
                p.subscribe(CHANNEL).await?;
                Ok::<_, redis::RedisError>(p)
            };
            match tokio::time::timeout(self.timeout, attempt).await {
                Ok(Ok(p)) => return Ok(p),
                Ok(Err(e)) => last = Some(e),
                Err(_) => last = Some(redis::RedisError::from(std::io::Error::from(std::io::ErrorKind::TimedOut))),
            }
        }
        Err(last.unwrap_or_else(|| redis::RedisError::from(std::io::Error::from(std::io::ErrorKind::NotFound))))
    }
}

impl Drop for Released {
    fn drop(&mut self) {
        if let Some(t) = self.task.lock().unwrap_or_else(|p| p.into_inner()).take() {
            t.abort();
        }
    }
}

/// Keep one subscription up for as long as the store lives; reconnect with a capped backoff.
async fn subscriber(me: Weak<Released>) {
    let mut backoff = Duration::from_millis(200);
    loop {
        let Some(released) = me.upgrade() else { return };
        let pubsub = released.connect().await;
        drop(released);
        match pubsub {
            Ok(pubsub) => {
                backoff = Duration::from_millis(200);
                let (mut sink, mut stream) = pubsub.split();
                if let Some(r) = me.upgrade() {
                    r.subscribed.store(true, Ordering::Release);
                    // A release may have happened while we were not listening.
                    r.wake_all();
                }
                loop {
                    tokio::select! {
                        msg = stream.next() => {
                            let Some(msg) = msg else { break };
                            let Some(r) = me.upgrade() else { return };
                            if let Ok(hex) = std::str::from_utf8(msg.get_payload_bytes()) {
                                r.wake(hex);
                            }
                        }
                        _ = tokio::time::sleep(PROBE_EVERY) => {
                            let Some(timeout) = me.upgrade().map(|r| r.timeout) else { return };
                            let probe = tokio::time::timeout(timeout, sink.ping::<redis::Value>()).await;
                            if !matches!(probe, Ok(Ok(_))) {
                                break;
                            }
                        }
                    }
                }
                let Some(r) = me.upgrade() else { return };
                r.subscribed.store(false, Ordering::Release);
                r.wake_all();
                tracing::warn!("lost the Redis subscription for refresh releases; waiters poll until it is back");
            }
            Err(e) => tracing::debug!(error = %e, "cannot subscribe to refresh releases yet"),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}
