//! Time is passed in, never read ad hoc: every expiry decision goes through a `Clock`, so tests
//! can move time forward deterministically instead of sleeping.

use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// Seconds since the Unix epoch.
pub type UnixTime = i64;

pub trait Clock: Send + Sync + 'static {
    fn now(&self) -> UnixTime;
}

/// Wall-clock time, optionally shifted (tests shift it to expire sessions without waiting).
#[derive(Debug, Default)]
pub struct SystemClock {
    offset: AtomicI64,
}

impl SystemClock {
    pub fn advance(&self, seconds: i64) {
        self.offset.fetch_add(seconds, Ordering::Relaxed);
    }
}

impl Clock for SystemClock {
    fn now(&self) -> UnixTime {
        let real = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0);
        real + self.offset.load(Ordering::Relaxed)
    }
}

/// A clock that stands still until told to move: tests that count rate-limited events (JWKS
/// refetch floors) must not see the wall clock tick over a second boundary mid-test.
#[derive(Debug)]
pub struct ManualClock {
    now: AtomicI64,
}

impl ManualClock {
    pub fn at(now: UnixTime) -> Self {
        Self { now: AtomicI64::new(now) }
    }

    pub fn advance(&self, seconds: i64) {
        self.now.fetch_add(seconds, Ordering::Relaxed);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> UnixTime {
        self.now.load(Ordering::Relaxed)
    }
}
