//! Rate-limit buckets shared by every replica: GCRA (the generic cell rate algorithm, the one
//! `governor` runs locally) in one Lua script per bucket, so a decision is one round trip
//! (`EVALSHA`, loaded once per connection by `redis::Script`). The script reads Redis's own clock
//! (`TIME`), not the replica's, so replicas with skewed clocks agree; it touches exactly one key,
//! so it runs on a Cluster; and the key expires when the bucket would be full again, so idle
//! clients cost nothing.

use std::time::Duration;

use redis::Script;

use super::RedisStore;
use super::connection::broken_connection;
use crate::session::StoreError;

/// `KEYS[1]` the bucket, `ARGV[1]` the emission interval (µs per request), `ARGV[2]` the burst.
/// Stored value: the theoretical arrival time (TAT), µs since the epoch of Redis's clock.
/// Returns `{allowed, retry_after_µs, reset_µs, remaining}` where `reset` is the time until the
/// bucket is full again. Lua numbers are doubles: µs since 1970 (~1.8e15) are exact below 2^53,
/// and the TAT is written with `%.0f` (`tostring` would round it to 14 digits).
const GCRA: &str = r"
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local emission = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local tolerance = emission * burst
local tat = tonumber(redis.call('GET', KEYS[1]) or now) or now
if tat < now then tat = now end
local new_tat = tat + emission
if new_tat - now > tolerance then
  return {0, new_tat - now - tolerance, tat - now, 0}
end
redis.call('SET', KEYS[1], string.format('%.0f', new_tat), 'PX', math.max(1, math.ceil((new_tat - now) / 1000)))
return {1, 0, new_tat - now, math.floor((tolerance - (new_tat - now)) / emission)}
";

pub(super) fn gcra_script() -> Script {
    Script::new(GCRA)
}

/// One bucket's answer, in Redis's time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GcraOutcome {
    pub allowed: bool,
    /// Until the request would have been allowed (zero when it was).
    pub retry_after: Duration,
    /// Until the bucket is full again (the key's TTL).
    pub reset: Duration,
    /// Requests still allowed right now after this one.
    pub remaining: u32,
}

impl RedisStore {
    /// Take one request from bucket `key` (a full key name; the caller prefixes and hashes it)
    /// with a rate of one per `emission` and room for `burst`.
    ///
    /// Retried once on a fresh connection if the old one was found broken (like every idempotent
    /// command): if the first attempt did reach Redis, the client pays one extra request — a
    /// bounded error in the safe direction, preferred to refusing logins after every reconnect.
    pub async fn gcra(&self, key: &str, emission: Duration, burst: u32) -> Result<GcraOutcome, StoreError> {
        let emission_us = emission.as_micros().clamp(1, u128::from(u64::MAX >> 12)) as u64;
        let (allowed, retry_us, reset_us, remaining): (i64, i64, i64, i64) = idempotent!(self, c => self
            .gcra
            .key(key)
            .arg(emission_us)
            .arg(burst.max(1))
            .invoke_async(&mut c))?;
        Ok(GcraOutcome::from_reply(allowed, retry_us, reset_us, remaining))
    }
}

impl GcraOutcome {
    /// The script's four integers, whatever Redis sent: negative times read as zero.
    pub(crate) fn from_reply(allowed: i64, retry_us: i64, reset_us: i64, remaining: i64) -> Self {
        let us = |v: i64| Duration::from_micros(v.max(0) as u64);
        Self {
            allowed: allowed == 1,
            retry_after: us(retry_us),
            reset: us(reset_us),
            remaining: u32::try_from(remaining.max(0)).unwrap_or(u32::MAX),
        }
    }
}

/// Bucket key names: `gatehouse:rl:{<kind>:<value>}` — one hash tag per bucket (one slot, one key
/// per script call on a Cluster). `value` must already be safe to store (an IP, a caller identity,
/// or a hash of user input: the limiter hashes usernames before they get here).
pub fn bucket_key(kind: &str, value: &str) -> String {
    format!("{}:rl:{{{kind}:{value}}}", super::PREFIX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use redis::AsyncCommands;

    /// The script's arithmetic against a real `redis-server`: burst, then one per interval,
    /// retry-after and reset in Redis's time, the TTL on the key, and separate buckets per key.
    #[tokio::test]
    async fn gcra_script_math() {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let dir = tempfile::tempdir().unwrap();
        let mut child = gatehouse_testkit::redis_server(&["--port", &port.to_string()], dir.path(), port).await;
        let store = RedisStore::open(
            &format!("redis://127.0.0.1:{port}"),
            &super::super::RedisTls::default(),
            Duration::from_secs(2),
        )
        .unwrap();
        // 1 request per second, burst 3: three pass, the fourth waits about a second.
        let key = bucket_key("test", "a");
        let second = Duration::from_secs(1);
        let mut seen = Vec::new();
        for _ in 0..4 {
            seen.push(store.gcra(&key, second, 3).await.unwrap());
        }
        assert_eq!(seen.iter().map(|o| o.allowed).collect::<Vec<_>>(), [true, true, true, false]);
        assert_eq!(seen.iter().map(|o| o.remaining).collect::<Vec<_>>(), [2, 1, 0, 0]);
        assert!(seen[..3].iter().all(|o| o.retry_after.is_zero()));
        let wait = seen[3].retry_after;
        assert!(wait > Duration::from_millis(900) && wait <= second, "retry after ~1 s: {wait:?}");
        let reset = seen[2].reset;
        assert!(reset > Duration::from_millis(2900) && reset <= Duration::from_secs(3), "full in ~3 s: {reset:?}");
        // The key expires when the bucket would be full again.
        let mut c = store.conn().await.unwrap();
        let pttl: i64 = c.pttl(&key).await.unwrap();
        assert!((2800..=3000).contains(&pttl), "TTL = time to full: {pttl} ms");
        // A denied request takes nothing: the TTL did not grow.
        assert!(!store.gcra(&key, second, 3).await.unwrap().allowed);
        let pttl2: i64 = c.pttl(&key).await.unwrap();
        assert!(pttl2 <= pttl, "denials do not extend the bucket: {pttl2} > {pttl}");
        // Another key has its own bucket.
        assert!(store.gcra(&bucket_key("test", "b"), second, 3).await.unwrap().allowed);
        // After the wait, exactly one more passes.
        tokio::time::sleep(wait + Duration::from_millis(20)).await;
        assert!(store.gcra(&key, second, 3).await.unwrap().allowed, "one token back after retry_after");
        assert!(!store.gcra(&key, second, 3).await.unwrap().allowed, "and only one");
        // A fast rate (1000/s, burst 10): the µs arithmetic holds.
        let fast = bucket_key("test", "fast");
        let started = std::time::Instant::now();
        let mut allowed = 0;
        for _ in 0..40 {
            allowed += usize::from(store.gcra(&fast, Duration::from_millis(1), 10).await.unwrap().allowed);
        }
        let refilled = started.elapsed().as_millis() as usize;
        assert!(
            allowed >= 10 && allowed <= 10 + refilled + 1,
            "burst of 10 plus what 1/ms refilled in {refilled} ms: {allowed}"
        );
        let _ = child.kill();
        let _ = child.wait();
        // Redis gone: a clean error, not a hang.
        assert!(matches!(store.gcra(&key, second, 3).await, Err(StoreError::Unavailable(_))));
    }
}
