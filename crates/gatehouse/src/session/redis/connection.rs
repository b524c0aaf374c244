//! Connections to Redis: one server (the connection manager reconnects by itself), the master
//! Sentinel names (re-resolved after a connection error, so failovers are followed), or a
//! Cluster; TLS files; every command under a timeout, with the one retry `idempotent!` allows.

use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, MultiplexedConnection};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
use redis::sentinel::{SentinelClient, SentinelNodeConnectionInfo, SentinelServerType};
use redis::{Cmd, Pipeline, RedisFuture, Script, Value};

use super::RedisStore;
use super::notify::{Released, Source};
use crate::session::{SessionStore, StoreError};

/// Where connections come from: one server (the manager reconnects by itself), or the master
/// that Sentinel names (re-resolved after any connection error, so a failover is followed).
pub(super) enum Backend {
    Direct(ConnectionManager),
    Sentinel(Box<SentinelBackend>),
    /// The cluster connection follows slot moves and failovers by itself; made on first use.
    Cluster(Box<ClusterBackend>),
}

pub(super) struct ClusterBackend {
    client: ClusterClient,
    current: tokio::sync::Mutex<Option<ClusterConnection>>,
}

pub(super) struct SentinelBackend {
    client: std::sync::Arc<tokio::sync::Mutex<SentinelClient>>,
    current: std::sync::Mutex<Option<MultiplexedConnection>>,
}

/// A connection of either kind; cheap to clone.
#[derive(Clone)]
pub(super) enum Conn {
    Manager(ConnectionManager),
    Multiplexed(MultiplexedConnection),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Manager(c) => c.req_packed_command(cmd),
            Self::Multiplexed(c) => c.req_packed_command(cmd),
            Self::Cluster(c) => c.req_packed_command(cmd),
        }
    }
    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Manager(c) => c.req_packed_commands(cmd, offset, count),
            Self::Multiplexed(c) => c.req_packed_commands(cmd, offset, count),
            Self::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }
    fn get_db(&self) -> i64 {
        match self {
            Self::Manager(c) => c.get_db(),
            Self::Multiplexed(c) => c.get_db(),
            Self::Cluster(c) => c.get_db(),
        }
    }
}

/// The connection was broken before or while the command was sent — typically while it sat idle
/// across a Redis restart — as opposed to a timeout or an answer from Redis.
pub(super) fn broken_connection(e: &redis::RedisError) -> bool {
    !e.is_timeout() && (e.is_connection_dropped() || e.is_io_error() || e.is_unrecoverable_error())
}

pub(super) fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(format!("redis: {e}"))
}

/// TLS material for `rediss://` (PEM bytes); without it the system's roots are used.
#[derive(Default)]
pub struct RedisTls {
    pub ca: Option<Vec<u8>>,
    pub client_cert_and_key: Option<(Vec<u8>, Vec<u8>)>,
}

impl RedisTls {
    pub(super) fn certificates(&self) -> redis::TlsCertificates {
        redis::TlsCertificates {
            client_tls: self
                .client_cert_and_key
                .as_ref()
                .map(|(cert, key)| redis::ClientTlsConfig { client_cert: cert.clone(), client_key: key.clone() }),
            root_cert: self.ca.clone(),
        }
    }
}

impl RedisStore {
    /// Connects lazily: Gatehouse starts (not ready) while Redis is unreachable and becomes ready
    /// when it appears; the connection manager reconnects after errors by itself.
    pub fn open(url: &str, tls: &RedisTls, timeout: Duration) -> Result<Self, StoreError> {
        let client = if url.starts_with("rediss://") {
            redis::Client::build_with_tls(url, tls.certificates())
        } else {
            redis::Client::open(url)
        }
        .map_err(|e| StoreError::Unavailable(format!("invalid redis URL or TLS files: {e}")))?;
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_secs(2));
        let conn = client.get_connection_manager_lazy(config).map_err(unavailable)?;
        Ok(Self::with_backend(Backend::Direct(conn), Source::Nodes(vec![client]), timeout))
    }

    /// Through Redis Sentinel: `sentinels` are the Sentinel nodes (their own credentials in their
    /// URLs), `master` the monitored name, `master_password` what the master requires (`requirepass`).
    pub fn open_sentinel(
        sentinels: &[String],
        master: &str,
        master_password: Option<&str>,
        timeout: Duration,
    ) -> Result<Self, StoreError> {
        let node = master_password.map(|pw| {
            SentinelNodeConnectionInfo::default()
                .set_redis_connection_info(redis::RedisConnectionInfo::default().set_password(pw))
        });
        let client = SentinelClient::build(sentinels.to_vec(), master, node, SentinelServerType::Master)
            .map_err(|e| StoreError::Unavailable(format!("invalid sentinel configuration: {e}")))?;
        let client = std::sync::Arc::new(tokio::sync::Mutex::new(client));
        Ok(Self::with_backend(
            Backend::Sentinel(Box::new(SentinelBackend {
                client: client.clone(),
                current: std::sync::Mutex::new(None),
            })),
            Source::Sentinel(client),
            timeout,
        ))
    }

    /// A Redis Cluster: `nodes` are seed nodes (any few masters); the topology is discovered.
    pub fn open_cluster(nodes: &[String], tls: &RedisTls, timeout: Duration) -> Result<Self, StoreError> {
        let mut builder = ClusterClient::builder(nodes.to_vec()).connection_timeout(timeout).response_timeout(timeout);
        if nodes.iter().any(|n| n.starts_with("rediss://")) {
            builder = builder.certs(tls.certificates());
        }
        let client =
            builder.build().map_err(|e| StoreError::Unavailable(format!("invalid cluster configuration: {e}")))?;
        // Release messages are plain PUBLISHes, which every node forwards: any seed node will do.
        let seeds = nodes
            .iter()
            .map(|n| {
                if n.starts_with("rediss://") {
                    redis::Client::build_with_tls(n.as_str(), tls.certificates())
                } else {
                    redis::Client::open(n.as_str())
                }
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| StoreError::Unavailable(format!("invalid cluster configuration: {e}")))?;
        Ok(Self::with_backend(
            Backend::Cluster(Box::new(ClusterBackend { client, current: tokio::sync::Mutex::new(None) })),
            Source::Nodes(seeds),
            timeout,
        ))
    }

    pub(super) fn with_backend(backend: Backend, source: Source, timeout: Duration) -> Self {
        Self {
            backend,
            timeout,
            released: Released::new(source, timeout),
            format: super::RecordFormat::default(),
            cas: Script::new(
                "if redis.call('HGET', KEYS[1], 'v') ~= ARGV[1] then return 0 end \
                 redis.call('HSET', KEYS[1], 'v', ARGV[2], 'd', ARGV[3]) \
                 redis.call('PEXPIREAT', KEYS[1], ARGV[4]) return 1",
            ),
            take: Script::new(
                "local d = redis.call('HGET', KEYS[1], 'd') if d then redis.call('DEL', KEYS[1]) end return d",
            ),
            // Delete our own lock and announce it in one step, so waiters never hear of a release
            // that has not happened yet.
            release: Script::new(
                "if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) \
                 redis.call('PUBLISH', ARGV[2], ARGV[3]) return 1 end return 0",
            ),
            acquire: Script::new(
                "if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return {1, 0} end \
                 return {0, redis.call('PTTL', KEYS[1])}",
            ),
            renew: Script::new(
                "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end return 0",
            ),
            gcra: super::ratelimit::gcra_script(),
        }
    }

    /// A connection to the current master.
    pub(super) async fn conn(&self) -> Result<Conn, StoreError> {
        match &self.backend {
            Backend::Direct(m) => Ok(Conn::Manager(m.clone())),
            Backend::Sentinel(sb) => {
                let (client, current) = (&sb.client, &sb.current);
                if let Some(c) = current.lock().unwrap_or_else(|p| p.into_inner()).clone() {
                    return Ok(Conn::Multiplexed(c));
                }
                let mut client = client.lock().await;
                let c = self.run_raw(client.get_async_connection()).await?;
                *current.lock().unwrap_or_else(|p| p.into_inner()) = Some(c.clone());
                Ok(Conn::Multiplexed(c))
            }
            Backend::Cluster(cb) => {
                let mut current = cb.current.lock().await;
                if let Some(c) = current.as_ref() {
                    return Ok(Conn::Cluster(c.clone()));
                }
                let c = self.run_raw(cb.client.get_async_connection()).await?;
                *current = Some(c.clone());
                Ok(Conn::Cluster(c))
            }
        }
    }

    /// After a connection error (or a READONLY answer from a demoted master), ask Sentinel again.
    pub(super) fn forget_connection(&self, e: &redis::RedisError) {
        if let Backend::Sentinel(sb) = &self.backend
            && (e.is_io_error()
                || e.is_connection_dropped()
                || e.is_connection_refusal()
                || e.is_timeout()
                || e.to_string().contains("READONLY"))
        {
            *sb.current.lock().unwrap_or_else(|p| p.into_inner()) = None;
        }
    }

    pub(super) async fn run<T>(
        &self,
        f: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, StoreError> {
        self.settle(tokio::time::timeout(self.timeout, f).await)
    }

    /// A command's result (or its time-out) as the store reports it.
    pub(super) fn settle<T>(
        &self,
        r: Result<redis::RedisResult<T>, tokio::time::error::Elapsed>,
    ) -> Result<T, StoreError> {
        match r {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => {
                self.forget_connection(&e);
                Err(unavailable(e))
            }
            Err(_) => {
                if let Backend::Sentinel(sb) = &self.backend {
                    *sb.current.lock().unwrap_or_else(|p| p.into_inner()) = None;
                }
                Err(StoreError::Unavailable("redis: timed out".into()))
            }
        }
    }

    pub(super) async fn run_raw<T>(
        &self,
        f: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, StoreError> {
        match tokio::time::timeout(self.timeout, f).await {
            Ok(r) => r.map_err(unavailable),
            Err(_) => Err(StoreError::Unavailable("redis: timed out".into())),
        }
    }

    /// Key names matching `pattern`; on a cluster, from every master (SCAN is per node).
    pub(super) async fn scan(&self, pattern: &str) -> Result<Vec<String>, StoreError> {
        // A cheap idempotent command first, so a connection broken while idle is replaced before
        // the (cursor-carrying) scan starts.
        self.ping().await?;
        let mut c = self.conn().await?;
        let Conn::Cluster(cluster) = &mut c else {
            return self.scan_node(&mut c, None, pattern).await;
        };
        let mut cluster = cluster.clone();
        let nodes: String = self.run(redis::cmd("CLUSTER").arg("NODES").query_async(&mut cluster)).await?;
        let mut out = Vec::new();
        for (host, port) in cluster_masters(&nodes) {
            let route = RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress { host, port });
            out.extend(self.scan_node(&mut c, Some(route), pattern).await?);
        }
        Ok(out)
    }

    pub(super) async fn scan_node(
        &self,
        c: &mut Conn,
        node: Option<RoutingInfo>,
        pattern: &str,
    ) -> Result<Vec<String>, StoreError> {
        let mut cursor: u64 = 0;
        let mut out = Vec::new();
        loop {
            let mut cmd = redis::cmd("SCAN");
            cmd.arg(cursor).arg("MATCH").arg(pattern).arg("COUNT").arg(500);
            let (next, batch): (u64, Vec<String>) = match (&node, &mut *c) {
                (Some(route), Conn::Cluster(cluster)) => {
                    let v = self.run(cluster.route_command(cmd, route.clone())).await?;
                    redis::from_redis_value(v).map_err(unavailable)?
                }
                _ => self.run(cmd.query_async(c)).await?,
            };
            out.extend(batch);
            if next == 0 {
                return Ok(out);
            }
            cursor = next;
        }
    }
}

/// `(host, port)` of every master that is up, from `CLUSTER NODES` output
/// (`<id> <host:port@cport[,hostname]> <flags> <master-id> ...`).
pub(super) fn cluster_masters(nodes: &str) -> Vec<(String, u16)> {
    nodes
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let (_id, addr, flags) = (fields.next()?, fields.next()?, fields.next()?);
            let flags: Vec<&str> = flags.split(',').collect();
            if !flags.contains(&"master") || flags.iter().any(|f| f.starts_with("fail") || *f == "noaddr") {
                return None;
            }
            let hostport = addr.split(['@', ',']).next()?;
            let (host, port) = hostport.rsplit_once(':')?;
            Some((host.trim_matches(['[', ']']).to_owned(), port.parse().ok()?))
        })
        .collect()
}
