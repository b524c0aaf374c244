//! The Redis/Valkey store, for many replicas: one server, Sentinel, or Cluster. Every key carries
//! a hash tag of its own (`{…}`) and every script and pipeline touches one key, so all of it works
//! on a Cluster; keys have a TTL so Redis expires sessions by itself. Index sets
//! (by user, by Keycloak `sid`) are cleaned lazily and by the sweeper. Every call runs under a
//! timeout: a slow or dead Redis becomes a clean `StoreError::Unavailable`, never a hang.

mod connection;
mod lock;
mod notify;

use std::time::Duration;

use async_trait::async_trait;
use redis::{AsyncCommands, Script};

pub use connection::RedisTls;
use connection::{Backend, broken_connection};
#[cfg(test)]
use lock::{LOCK_LEASE, LOCK_WAIT, lock_key};

use super::{RecordFormat, RefreshGuard, SessionKey, SessionRecord, SessionStore, StoreError, key_hex};
use crate::clock::UnixTime;
use crate::crypto;

/// Run a command that is safe to repeat (`$body` uses the connection `$c`). If it fails because
/// the connection was broken while idle (Redis restarted, a failover closed it), it runs once more
/// on a fresh connection before the store reports unavailable, so the first request after a
/// restart is not a 503. A macro rather than a closure: the command borrows its connection, and
/// async closures with borrowed arguments are not yet `Send` inside `async_trait` methods.
///
/// Safe to repeat: reads, `SADD`/`SREM`/`EXPIREAT`/`DEL`, `HSET` of a fresh session, the take
/// script (a repeat after a delete that did happen finds nothing: the session is gone either way)
/// and compare-and-set (a repeat after a write that did happen reports a lost race; every caller
/// then re-reads and finds its own write). Not repeated: `SET NX` for replay marks and refresh
/// locks, where a repeat after a success would report someone else's win.
macro_rules! idempotent {
    ($store:expr, $c:ident => $body:expr) => {{
        let store = $store;
        #[allow(unused_mut)]
        let mut $c = store.conn().await?;
        match tokio::time::timeout(store.timeout, $body).await {
            Ok(Err(e)) if broken_connection(&e) => {
                tracing::debug!(error = %e, "redis connection was broken; retrying once on a fresh one");
                store.forget_connection(&e);
                #[allow(unused_mut)]
                let mut $c = store.conn().await?;
                store.run($body).await
            }
            other => store.settle(other),
        }
    }};
}

// After the macro: the rate-limit script uses `idempotent!`.
pub(crate) mod ratelimit;
pub use ratelimit::{GcraOutcome, bucket_key};

const PREFIX: &str = "gatehouse";

pub struct RedisStore {
    backend: Backend,
    timeout: Duration,
    cas: Script,
    take: Script,
    release: Script,
    renew: Script,
    gcra: Script,
    acquire: Script,
    /// Wakes this process's refresh-lock waiters when another replica releases the lock.
    released: std::sync::Arc<notify::Released>,
    /// How records are written (`session.record_format`); both formats are read.
    format: RecordFormat,
}

fn session_key(hex: &str) -> String {
    format!("{PREFIX}:s:{{{hex}}}")
}
fn user_key(user: &str) -> String {
    format!("{PREFIX}:u:{{{}}}", crypto::hex(&crypto::sha256(user.as_bytes())))
}
fn sid_key(sid: &str) -> String {
    format!("{PREFIX}:sid:{{{}}}", crypto::hex(&crypto::sha256(sid.as_bytes())))
}
fn mark_key(kind: &str, id: &str) -> String {
    format!("{PREFIX}:m:{{{kind}:{}}}", crypto::hex(&crypto::sha256(id.as_bytes())))
}

pub(crate) fn parse_hex_key(hex: &str) -> Option<SessionKey> {
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(SessionKey(out))
}

impl RedisStore {
    /// Write records in `format` (`session.record_format`).
    pub fn writing(mut self, format: RecordFormat) -> Self {
        self.format = format;
        self
    }

    /// Index sets of a record: by user, and by Keycloak session when it has one.
    fn index_sets(r: &SessionRecord) -> Vec<String> {
        let mut sets = vec![user_key(&r.claims.user_key())];
        sets.extend(r.provider_sid.as_deref().map(sid_key));
        sets
    }

    async fn index(&self, hex: &str, r: &SessionRecord) -> Result<(), StoreError> {
        let until = r.absolute_expires_at;
        // One pipeline per set: each set is its own slot on a cluster.
        for set in Self::index_sets(r) {
            let mut p = redis::pipe();
            p.sadd(&set, hex).ignore().cmd("EXPIREAT").arg(&set).arg(until).arg("GT").ignore();
            // EXPIREAT … GT does not set a TTL on a key that has none: set one for new sets.
            p.cmd("EXPIREAT").arg(&set).arg(until).arg("NX").ignore();
            idempotent!(self, c => p.query_async::<()>(&mut c))?;
        }
        Ok(())
    }

    async fn unindex(&self, hex: &str, r: &SessionRecord) -> Result<(), StoreError> {
        for set in Self::index_sets(r) {
            idempotent!(self, c => c.srem::<_, _, ()>(&set, hex))?;
        }
        Ok(())
    }

    async fn take_hex(&self, hex: &str) -> Result<Option<SessionRecord>, StoreError> {
        let key = session_key(hex);
        let data: Option<Vec<u8>> = idempotent!(self, c => self.take.key(&key).invoke_async(&mut c))?;
        let Some(data) = data else { return Ok(None) };
        // Already deleted; an unreadable record (damaged, or a format this build does not know)
        // authenticated nobody anyway, and its index entries are dropped lazily by `members`.
        let r = match SessionRecord::decode(&data) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "removed an unreadable session record");
                return Ok(None);
            }
        };
        self.unindex(hex, &r).await?;
        Ok(Some(r))
    }

    /// Members of an index set, with entries whose session is gone removed on the way; second,
    /// the hex keys of members whose record this build cannot read (damaged, or a format it does
    /// not know).
    async fn members(&self, set: &str) -> Result<(Vec<(SessionKey, SessionRecord)>, Vec<String>), StoreError> {
        let hexes: Vec<String> = idempotent!(self, c => c.smembers(set))?;
        let (mut out, mut unreadable) = (Vec::new(), Vec::new());
        for hex in hexes {
            let name = session_key(&hex);
            let data: Option<Vec<u8>> = idempotent!(self, c => c.hget(&name, "d"))?;
            match (data.map(|d| SessionRecord::decode(&d)), parse_hex_key(&hex)) {
                (Some(Ok(r)), Some(k)) => out.push((k, r)),
                (Some(Err(e)), _) => {
                    tracing::warn!(error = %e, "skipped an unreadable session record");
                    unreadable.push(hex);
                }
                _ => {
                    idempotent!(self, c => c.srem::<_, _, ()>(set, &hex))?;
                }
            }
        }
        Ok((out, unreadable))
    }

    /// End every session of an index set. Records this build cannot read go too: a logout or a
    /// revocation must not leave behind a session that a build which reads it would serve again
    /// (an older build meeting a newer record format during a rollback did exactly that).
    async fn delete_set(&self, set: &str) -> Result<Vec<(SessionKey, SessionRecord)>, StoreError> {
        let mut out = Vec::new();
        let (readable, unreadable) = self.members(set).await?;
        for (k, _) in readable {
            if let Some(r) = self.take_hex(&key_hex(&k)).await? {
                out.push((k, r));
            }
        }
        for hex in unreadable {
            self.take_hex(&hex).await?;
        }
        idempotent!(self, c => c.del::<_, ()>(set))?;
        Ok(out)
    }
}

#[async_trait]
impl SessionStore for RedisStore {
    async fn insert(&self, key: &SessionKey, record: &SessionRecord) -> Result<(), StoreError> {
        let hex = key_hex(key);
        let mut p = redis::pipe();
        p.atomic()
            .hset_multiple(
                session_key(&hex),
                &[("v", record.version.to_string().into_bytes()), ("d", record.encode(self.format)?)],
            )
            .ignore()
            .cmd("PEXPIREAT")
            .arg(session_key(&hex))
            .arg(record.expires_at() * 1000)
            .ignore();
        idempotent!(self, c => p.query_async::<()>(&mut c))?;
        self.index(&hex, record).await
    }

    async fn get(&self, key: &SessionKey) -> Result<Option<SessionRecord>, StoreError> {
        let name = session_key(&key_hex(key));
        let data: Option<Vec<u8>> = idempotent!(self, c => c.hget(&name, "d"))?;
        data.map(|d| SessionRecord::decode(&d)).transpose()
    }

    async fn compare_and_swap(
        &self,
        key: &SessionKey,
        expected: u64,
        record: &SessionRecord,
    ) -> Result<bool, StoreError> {
        let hex = key_hex(key);
        let (name, data) = (session_key(&hex), record.encode(self.format)?);
        let ok: i64 = idempotent!(self, c => self
            .cas
            .key(&name)
            .arg(expected.to_string())
            .arg(record.version.to_string())
            .arg(&data)
            .arg(record.expires_at() * 1000)
            .invoke_async(&mut c))?;
        if ok == 1 {
            self.index(&hex, record).await?;
        }
        Ok(ok == 1)
    }

    async fn delete(&self, key: &SessionKey) -> Result<Option<SessionRecord>, StoreError> {
        self.take_hex(&key_hex(key)).await
    }

    async fn list_by_user(&self, user_key_: &str) -> Result<Vec<(SessionKey, SessionRecord)>, StoreError> {
        Ok(self.members(&user_key(user_key_)).await?.0)
    }

    async fn delete_by_user(&self, user_key_: &str) -> Result<Vec<(SessionKey, SessionRecord)>, StoreError> {
        self.delete_set(&user_key(user_key_)).await
    }

    async fn delete_by_provider_sid(&self, sid: &str) -> Result<Vec<(SessionKey, SessionRecord)>, StoreError> {
        self.delete_set(&sid_key(sid)).await
    }

    async fn sweep(&self, now: UnixTime) -> Result<usize, StoreError> {
        // Redis expires records itself (TTL). Here: drop index entries whose session is gone, and
        // records whose logical expiry passed before their TTL fired (the clock may be ahead in tests).
        let mut removed = 0;
        for set in [self.scan(&format!("{PREFIX}:u:*")).await?, self.scan(&format!("{PREFIX}:sid:*")).await?].concat() {
            for (k, r) in self.members(&set).await?.0 {
                if r.is_expired(now) && self.take_hex(&key_hex(&k)).await?.is_some() {
                    removed += 1;
                }
            }
        }
        Ok(removed)
    }

    async fn count(&self) -> Result<Option<u64>, StoreError> {
        // One SCAN over the session keys per sweep; records live until their TTL fires.
        Ok(Some(self.scan(&format!("{PREFIX}:s:*")).await?.len() as u64))
    }

    async fn ping(&self) -> Result<(), StoreError> {
        // Readiness pings at start-up: bring the release subscription up before the first wait.
        self.released.start();
        idempotent!(self, c => redis::cmd("PING").query_async::<String>(&mut c)).map(|_| ())
    }

    async fn find_by_prefix(&self, hex_prefix: &str) -> Result<Vec<(SessionKey, SessionRecord)>, StoreError> {
        if !hex_prefix.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Ok(Vec::new()); // never let glob characters into the pattern
        }
        let mut out = Vec::new();
        for name in self.scan(&format!("{PREFIX}:s:{{{hex_prefix}*")).await? {
            let hex = name.trim_start_matches(&format!("{PREFIX}:s:{{")).trim_end_matches('}').to_string();
            let data: Option<Vec<u8>> = idempotent!(self, c => c.hget(&name, "d"))?;
            match (data.map(|d| SessionRecord::decode(&d)), parse_hex_key(&hex)) {
                (Some(Ok(r)), Some(k)) => out.push((k, r)),
                (Some(Err(e)), _) => tracing::warn!(error = %e, "skipped an unreadable session record"),
                _ => {}
            }
        }
        Ok(out)
    }

    async fn delete_all(&self) -> Result<Vec<(SessionKey, SessionRecord)>, StoreError> {
        let mut out = Vec::new();
        for name in self.scan(&format!("{PREFIX}:s:*")).await? {
            let hex = name.trim_start_matches(&format!("{PREFIX}:s:{{")).trim_end_matches('}').to_string();
            if let (Some(r), Some(k)) = (self.take_hex(&hex).await?, parse_hex_key(&hex)) {
                out.push((k, r));
            }
        }
        Ok(out)
    }

    async fn mark(&self, kind: &str, id: &str, until: UnixTime) -> Result<bool, StoreError> {
        let mut c = self.conn().await?;
        let set: Option<String> = self
            .run(
                redis::cmd("SET")
                    .arg(mark_key(kind, id))
                    .arg(until)
                    .arg("NX")
                    .arg("EXAT")
                    .arg(until.max(1))
                    .query_async(&mut c),
            )
            .await?;
        Ok(set.is_some())
    }

    async fn unmark(&self, kind: &str, id: &str) -> Result<(), StoreError> {
        let name = mark_key(kind, id);
        idempotent!(self, c => c.del(&name))
    }

    async fn is_marked(&self, kind: &str, id: &str, now: UnixTime) -> Result<bool, StoreError> {
        let name = mark_key(kind, id);
        let until: Option<i64> = idempotent!(self, c => c.get(&name))?;
        Ok(until.is_some_and(|u| u > now))
    }

    async fn lock_refresh(&self, key: &SessionKey) -> Result<RefreshGuard, StoreError> {
        self.lock_refresh_session(key).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn free_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
    }

    /// A `redis-server` with these arguments and its files in `dir`, once `port` accepts
    /// connections (the test kit's one spawner: it fails loudly if Redis does not come up).
    async fn redis_server(args: &[&str], dir: &std::path::Path, port: u16) -> std::process::Child {
        gatehouse_testkit::redis_server(args, dir, port).await
    }

    /// Two replicas on one Redis (or Cluster): a waiter on `b` is woken by `a`'s release message
    /// within a round trip, long before the lease would have let it re-check on its own.
    async fn release_wakes_the_other_replica(a: &RedisStore, b: &RedisStore) {
        b.ping().await.unwrap();
        for _ in 0..100 {
            if b.released.subscribed() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(b.released.subscribed(), "the release subscription comes up with the first ping");
        let key = crate::session::SessionId::generate().unwrap().key();
        let held = a.lock_refresh(&key).await.unwrap();
        let wait = async {
            let g = b.lock_refresh(&key).await.unwrap();
            (std::time::Instant::now(), g)
        };
        let release = async {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let at = std::time::Instant::now();
            drop(held);
            at
        };
        let ((taken_at, _g), released_at) = tokio::join!(wait, release);
        let lag = taken_at.duration_since(released_at);
        assert!(lag < Duration::from_millis(300), "woken by the release, not by the lease timer: {lag:?}");
    }

    /// The shared store contract against a real `redis-server` (Debian package) on a free port.
    #[tokio::test]
    async fn conformance() {
        let port = free_port();
        let dir = tempfile::tempdir().unwrap();
        let mut child = redis_server(&["--port", &port.to_string()], dir.path(), port).await;
        let store =
            RedisStore::open(&format!("redis://127.0.0.1:{port}"), &RedisTls::default(), Duration::from_secs(2))
                .unwrap();
        super::super::conformance::run(&store).await;

        // Keys carry TTLs: Redis expires sessions by itself, not only the sweeper.
        let key = crate::session::SessionId::generate().unwrap().key();
        let mut rec = super::super::conformance::record("ttl", "kc-ttl", 0);
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
        rec.idle_expires_at = now + 100;
        rec.absolute_expires_at = now + 200;
        store.insert(&key, &rec).await.unwrap();
        let mut c = store.conn().await.unwrap();
        let ttl: i64 = c.ttl(session_key(&key_hex(&key))).await.unwrap();
        assert!((90..=100).contains(&ttl), "session TTL follows its expiry: {ttl}");
        let ttl: i64 = c.ttl(user_key(&rec.claims.user_key())).await.unwrap();
        assert!((190..=200).contains(&ttl), "index TTL follows the absolute expiry: {ttl}");

        // The refresh lock excludes a second holder until released.
        let guard = store.lock_refresh(&key).await.unwrap();
        let second = tokio::time::timeout(Duration::from_millis(300), store.lock_refresh(&key)).await;
        assert!(second.is_err(), "a second holder must wait");
        drop(guard);
        let third = tokio::time::timeout(Duration::from_secs(2), store.lock_refresh(&key)).await;
        assert!(matches!(third, Ok(Ok(_))), "released locks can be taken");
        drop(third);

        // A holder that died (never released, never renewed: another replica killed mid-refresh)
        // blocks the session only until its lease runs out.
        let orphan = crate::session::SessionId::generate().unwrap().key();
        let _: () = redis::cmd("SET")
            .arg(lock_key(&key_hex(&orphan)))
            .arg("token-of-a-dead-replica")
            .arg("PX")
            .arg(LOCK_LEASE.as_millis() as u64)
            .query_async(&mut c)
            .await
            .unwrap();
        let started = std::time::Instant::now();
        let taken = tokio::time::timeout(LOCK_WAIT, store.lock_refresh(&orphan)).await;
        assert!(matches!(taken, Ok(Ok(_))), "the dead holder's lock is taken after its lease");
        let waited = started.elapsed();
        assert!(waited >= LOCK_LEASE - Duration::from_millis(500) && waited < LOCK_LEASE * 2, "{waited:?}");
        // Another replica's waiter is woken by the release message, and while it waits it does
        // not poll: one attempt before the wait and one after the wake-up.
        let url = format!("redis://127.0.0.1:{port}");
        let b = RedisStore::open(&url, &RedisTls::default(), Duration::from_secs(2)).unwrap();
        let attempts = |c: &mut redis::aio::ConnectionManager| {
            let mut c = c.clone();
            async move {
                let info: String = redis::cmd("INFO").arg("commandstats").query_async(&mut c).await.unwrap();
                info.lines()
                    .filter(|l| l.starts_with("cmdstat_set:") || l.starts_with("cmdstat_evalsha:"))
                    .filter_map(|l| l.split("calls=").nth(1)?.split(',').next()?.parse::<u64>().ok())
                    .sum::<u64>()
            }
        };
        let mut probe = redis::Client::open(url.as_str()).unwrap().get_connection_manager().await.unwrap();
        let before = attempts(&mut probe).await;
        release_wakes_the_other_replica(&store, &b).await;
        let during = attempts(&mut probe).await - before;
        // a: acquire, release; b: acquire, re-try after the wake, release; a renewal of the lock
        // still held above. Polling every 25 ms would add about forty.
        assert!(during <= 10, "the waiter polled: {during} lock commands in one second");

        // The subscription is cut (a proxy restart, CLIENT KILL): waiters are not stranded, and
        // the subscriber comes back by itself.
        let _: i64 = redis::cmd("CLIENT").arg("KILL").arg("TYPE").arg("pubsub").query_async(&mut probe).await.unwrap();
        drop(taken);
        let held = tokio::time::timeout(Duration::from_secs(2), store.lock_refresh(&orphan)).await.unwrap().unwrap();
        let wait = tokio::time::timeout(Duration::from_secs(2), b.lock_refresh(&orphan));
        let release = async {
            tokio::time::sleep(Duration::from_millis(200)).await;
            drop(held);
        };
        let (taken, ()) = tokio::join!(wait, release);
        assert!(matches!(taken, Ok(Ok(_))), "a waiter whose subscription was cut is still released");
        drop(taken);
        release_wakes_the_other_replica(&store, &b).await;

        // Replicas in phase 1 of an upgrade (`record_format = "json"`) and after it share records.
        let phase1 =
            RedisStore::open(&url, &RedisTls::default(), Duration::from_secs(2)).unwrap().writing(RecordFormat::Json);
        let k = crate::session::SessionId::generate().unwrap().key();
        let mut rec = super::super::conformance::record("mixed", "kc-mixed", now);
        phase1.insert(&k, &rec).await.unwrap();
        let raw: Vec<u8> = c.hget(session_key(&key_hex(&k)), "d").await.unwrap();
        assert_eq!(raw[0], 1, "json writes format 1");
        assert_eq!(store.get(&k).await.unwrap().unwrap().claims.sub, "mixed");
        rec.version += 1;
        assert!(store.compare_and_swap(&k, rec.version - 1, &rec).await.unwrap());
        let raw: Vec<u8> = c.hget(session_key(&key_hex(&k)), "d").await.unwrap();
        assert_eq!(raw[0], 2, "the default writes format 2");
        assert_eq!(phase1.get(&k).await.unwrap().unwrap().version, rec.version, "and both read it");
        // A record this build cannot read (say, a later format met during a rollback) is ended by
        // a logout or revocation too, not left for a build that reads it to serve again.
        let later = crate::session::SessionId::generate().unwrap().key();
        store.insert(&later, &super::super::conformance::record("mixed", "kc-later", now)).await.unwrap();
        let _: () = c.hset(session_key(&key_hex(&later)), "d", b"\x03a later format".to_vec()).await.unwrap();
        assert!(matches!(store.get(&later).await, Err(StoreError::Corrupt(_))));
        let ended = store.delete_by_user(&rec.claims.user_key()).await.unwrap();
        assert_eq!(ended.len(), 1, "the readable session is returned");
        for gone in [&k, &later] {
            let exists: bool = c.exists(session_key(&key_hex(gone))).await.unwrap();
            assert!(!exists, "both records are deleted");
        }

        let _ = child.kill();
        let _ = child.wait();
        // Redis gone: a clean error, quickly.
        let started = std::time::Instant::now();
        assert!(matches!(store.get(&key).await, Err(StoreError::Unavailable(_))));
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    /// The same contract on a three-master Redis Cluster: keys spread over slots on different
    /// nodes, so cross-slot pipelines or a single-node SCAN would fail it.
    #[tokio::test]
    async fn cluster_conformance() {
        let dir = tempfile::tempdir().unwrap();
        let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
        /// Kills the nodes even when an assertion fails.
        struct Nodes(Vec<std::process::Child>);
        impl Drop for Nodes {
            fn drop(&mut self) {
                for c in &mut self.0 {
                    let _ = c.kill();
                    let _ = c.wait();
                }
            }
        }
        let mut children = Nodes(Vec::new());
        for port in &ports {
            let d = dir.path().join(port.to_string());
            std::fs::create_dir_all(&d).unwrap();
            let args = ["--port", &port.to_string(), "--cluster-enabled", "yes", "--cluster-node-timeout", "2000"];
            children.0.push(redis_server(&args, &d, *port).await);
        }
        let created = std::process::Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(ports.iter().map(|p| format!("127.0.0.1:{p}")))
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .unwrap();
        assert!(created.status.success(), "cluster create: {}", String::from_utf8_lossy(&created.stdout));
        let mut ok = false;
        // Every node must see the cluster up (they converge one by one), not just the first.
        for _ in 0..100 {
            let all_ok = ports.iter().all(|p| {
                let info = std::process::Command::new("redis-cli")
                    .args(["-p", &p.to_string(), "cluster", "info"])
                    .output()
                    .unwrap();
                String::from_utf8_lossy(&info.stdout).contains("cluster_state:ok")
            });
            if all_ok {
                ok = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(ok, "every node sees the cluster ok");
        let store = RedisStore::open_cluster(
            &[format!("redis://127.0.0.1:{}", ports[0])],
            &RedisTls::default(),
            Duration::from_secs(2),
        )
        .unwrap();
        super::super::conformance::run(&store).await;
        // Release messages cross nodes: the other replica subscribes on another seed node.
        let other = RedisStore::open_cluster(
            &[format!("redis://127.0.0.1:{}", ports[1])],
            &RedisTls::default(),
            Duration::from_secs(2),
        )
        .unwrap();
        for _ in 0..3 {
            release_wakes_the_other_replica(&store, &other).await;
        }

        // Sessions land on more than one node, and listing still finds them all.
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
        for n in 0..12 {
            let key = crate::session::SessionId::generate().unwrap().key();
            store.insert(&key, &super::super::conformance::record("spread", &format!("kc-{n}"), now)).await.unwrap();
        }
        let nodes_with_sessions = ports
            .iter()
            .filter(|p| {
                let out = std::process::Command::new("redis-cli")
                    .args(["-p", &p.to_string(), "--scan", "--pattern", "gatehouse:s:*"])
                    .output()
                    .unwrap();
                !String::from_utf8_lossy(&out.stdout).trim().is_empty()
            })
            .count();
        assert!(nodes_with_sessions >= 2, "sessions spread over the cluster: {nodes_with_sessions} node(s)");
        assert_eq!(
            store
                .list_by_user(&super::super::conformance::record("spread", "x", 0).claims.user_key())
                .await
                .unwrap()
                .len(),
            12
        );
        let all = store.delete_all().await.unwrap();
        assert_eq!(all.len(), 12, "delete_all reaches every node");
        drop(children);
    }

    /// TLS to Redis (`rediss://`) with a private CA and a client certificate, against a real
    /// `redis-server --tls-port` that requires client certificates.
    #[tokio::test]
    async fn tls_conformance() {
        let dir = tempfile::tempdir().unwrap();
        let pki = dir.path();
        crate::pki::init(pki).unwrap();
        crate::pki::issue_to_dir(pki, "client", crate::pki::San::Dns("gatehouse.local".into()), pki).unwrap();
        let other = dir.path().join("other");
        crate::pki::init(&other).unwrap();
        let port = free_port();
        let p = |f: &str| pki.join(f).display().to_string();
        let (port_arg, cert, key, ca) = (port.to_string(), p("gatehouse.crt"), p("gatehouse.key"), p("ca.crt"));
        let tls_args = [
            "--port",
            "0",
            "--tls-port",
            &port_arg,
            "--tls-cert-file",
            &cert,
            "--tls-key-file",
            &key,
            "--tls-ca-cert-file",
            &ca,
            "--tls-auth-clients",
            "yes",
        ];
        let mut child = redis_server(&tls_args, pki, port).await;
        let read = |f: &str| std::fs::read(pki.join(f)).unwrap();
        let url = format!("rediss://localhost:{port}");
        let good =
            RedisTls { ca: Some(read("ca.crt")), client_cert_and_key: Some((read("client.crt"), read("client.key"))) };
        let store = RedisStore::open(&url, &good, Duration::from_secs(2)).unwrap();
        super::super::conformance::run(&store).await;

        // No client certificate, or a server we do not trust: no connection, a clean error.
        let no_cert = RedisTls { ca: Some(read("ca.crt")), client_cert_and_key: None };
        let store = RedisStore::open(&url, &no_cert, Duration::from_secs(2)).unwrap();
        assert!(matches!(store.ping().await, Err(StoreError::Unavailable(_))), "a client certificate is required");
        let wrong_ca = RedisTls {
            ca: Some(std::fs::read(other.join("ca.crt")).unwrap()),
            client_cert_and_key: Some((read("client.crt"), read("client.key"))),
        };
        let store = RedisStore::open(&url, &wrong_ca, Duration::from_secs(2)).unwrap();
        assert!(matches!(store.ping().await, Err(StoreError::Unavailable(_))), "the server's CA is checked");
        let _ = child.kill();
        let _ = child.wait();
    }
}
