//! The embedded store (default, one node): a redb file, durable across restarts and `kill -9`
//! (every commit is fsynced). redb has no TTLs, so an expiry index drives the sweeper, and the
//! user and Keycloak-`sid` indexes are written in the same transaction as the record.
//!
//! A damaged file must never take the process down: redb may panic on pages it did not write
//! (a disk error, a bad copy), so every call into it runs under [`contained`], which turns a panic
//! into an error. At start-up the file goes through redb's integrity check (every page checksum)
//! unless the operator turned it off; a damaged file fails start-up with one line naming the file
//! and the recovery command, or — with `session.on_corrupt = "move_aside"` — is renamed and
//! replaced by an empty store. At run time, a record that cannot be read answers like an unknown
//! session (`Corrupt`), and a write that finds the file damaged latches the store as unusable
//! (`Unavailable`, readiness false) until an operator restarts or repairs it.

use std::cell::{Cell, RefCell};
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Once, OnceLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use redb::{
    Database, MultimapTableDefinition, ReadableDatabase, ReadableMultimapTable, ReadableTable, ReadableTableMetadata,
    TableDefinition,
};

use super::{RecordFormat, RefreshGuard, SessionKey, SessionRecord, SessionStore, StoreError, key_hex};
use crate::clock::UnixTime;
use crate::config::OnCorrupt;

const SESSIONS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("sessions");
const BY_USER: MultimapTableDefinition<&str, &[u8]> = MultimapTableDefinition::new("sessions_by_user");
const BY_SID: MultimapTableDefinition<&str, &[u8]> = MultimapTableDefinition::new("sessions_by_provider_sid");
const EXPIRY: TableDefinition<(i64, &[u8]), ()> = TableDefinition::new("sessions_by_expiry");
/// `kind:id` → expiry (back-channel `jti` replay cache, logout tombstones).
const MARKS: TableDefinition<&str, i64> = TableDefinition::new("marks");

pub struct EmbeddedStore {
    db: Arc<ContainedDb>,
    path: Arc<PathBuf>,
    /// Set once a write found the file damaged: from then on writes and readiness fail with it.
    damaged: Arc<OnceLock<String>>,
    /// How records are written (`session.record_format`); both formats are read.
    format: RecordFormat,
}

/// The database, closed inside the panic guard too: redb's drop flushes its allocator state, and
/// on a damaged file that can panic wherever the last reference happens to go (seen in the
/// random-damage test as an escape from a store being dropped).
struct ContainedDb(Option<Database>);

impl std::ops::Deref for ContainedDb {
    type Target = Database;
    fn deref(&self) -> &Database {
        // Only `drop` takes it out, and nothing can deref a value being dropped.
        #[allow(clippy::expect_used)]
        self.0.as_ref().expect("the database is present until drop")
    }
}

impl Drop for ContainedDb {
    fn drop(&mut self) {
        if let Some(db) = self.0.take()
            && let Err(panic) = contained(move || drop(db))
        {
            tracing::error!(error = %panic, "closing the damaged session file panicked inside redb; contained");
        }
    }
}

/// How to open the file (from `[session]`).
#[derive(Debug, Clone)]
pub struct OpenOptions {
    /// Run redb's integrity check (verifies every page's checksum) while opening.
    pub integrity_check: bool,
    /// Give up (and fail start-up) if the check takes longer.
    pub integrity_check_timeout: Duration,
    pub on_corrupt: OnCorrupt,
    /// redb's cache (`session.cache_bytes`): bounds the memory the file costs the process.
    pub cache_bytes: usize,
}

impl Default for OpenOptions {
    fn default() -> Self {
        Self {
            integrity_check: true,
            integrity_check_timeout: Duration::from_secs(60),
            on_corrupt: OnCorrupt::Fail,
            cache_bytes: crate::config::defaults::cache_bytes(),
        }
    }
}

/// Why the file could not be opened. Each message is one line that names the file and, for a
/// damaged file, the recovery command.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error(
        "the session file {path} is damaged: {what}. Recover with `gatehouse sessions reset --store {path}` \
         (moves it aside; users sign in again), or set session.on_corrupt = \"move_aside\""
    )]
    Damaged { path: String, what: String },
    #[error(
        "the integrity check of the session file {path} did not finish within {secs}s; raise \
         session.integrity_check_timeout, or set session.integrity_check = false for a very large file"
    )]
    CheckTimeout { path: String, secs: u64 },
    #[error("cannot open the session file {path}: {what}")]
    Other { path: String, what: String },
}

/// What an integrity check found (`gatehouse sessions check`).
#[derive(Debug, Default)]
pub struct CheckReport {
    pub file_bytes: u64,
    /// The newest commit failed its checksums and the previous one was used instead.
    pub rolled_back: bool,
    pub sessions: u64,
    pub expired: u64,
    pub unreadable: u64,
    pub user_index_entries: u64,
    pub sid_index_entries: u64,
    pub expiry_index_entries: u64,
    pub marks: u64,
}

// ---- panic containment -------------------------------------------------------------------

thread_local! {
    /// > 0 while this thread runs a contained store call: the panic hook stays silent then.
    static CONTAINED: Cell<u32> = const { Cell::new(0) };
    /// The last contained panic's message and location, for the error it becomes.
    static LAST_PANIC: RefCell<Option<String>> = const { RefCell::new(None) };
}

static HOOK: Once = Once::new();

/// Install (once) a panic hook that keeps quiet about panics [`contained`] catches — they become
/// store errors, logged where they are handled — and hands every other panic to the previous hook.
fn install_hook() {
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if CONTAINED.with(Cell::get) > 0 {
                let what = info
                    .payload()
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| info.payload().downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "unknown failure".into());
                let at = info
                    .location()
                    .map(|l| {
                        let file = l.file();
                        let short = file.rfind("/src/").map_or(file, |i| &file[i + 1..]);
                        format!(" at {short}:{}", l.line())
                    })
                    .unwrap_or_default();
                LAST_PANIC.with(|p| *p.borrow_mut() = Some(format!("storage library failure: {what}{at}")));
            } else {
                previous(info);
            }
        }));
    });
}

/// Run `f`, turning a panic inside it into `Err(description)`. redb is built to survive a
/// transaction that unwinds (it latches a repair of leaked pages), so the handle stays usable.
pub(crate) fn contained<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    install_hook();
    CONTAINED.with(|c| c.set(c.get() + 1));
    let out = std::panic::catch_unwind(AssertUnwindSafe(f));
    CONTAINED.with(|c| c.set(c.get().saturating_sub(1)));
    out.map_err(|_| LAST_PANIC.with(|p| p.borrow_mut().take()).unwrap_or_else(|| "storage library failure".to_string()))
}

// ---- record checksums -------------------------------------------------------------------

/// Stored values are `CHECKED ‖ digest[..16] ‖ record`. redb checks page checksums only in its
/// integrity check, not on every read, so a value altered on disk after start-up (or with the
/// check turned off) would otherwise be served as it reads — possibly as another user. Binding the
/// digest to the key also refuses a record that a damaged tree files under another key.
///
/// The digest (`CHECKED`) is `SHA-256(key ‖ length ‖ metadata ‖ first 21 and last 16 bytes of the
/// token envelope)`: everything but the envelope's ciphertext, which its own GCM tag covers
/// whenever the tokens are opened. So a read costs the same however large the tokens are. Values
/// written with the older whole-record digest (`SEALED`) and plain records still read.
const SEALED: u8 = 0xC5;
const CHECKED: u8 = 0xC6;
const DIGEST_LEN: usize = 16;

/// Envelope bytes kept in the digest at each end: version, key id and nonce; the GCM tag.
const ENVELOPE_HEAD: usize = 21;
const ENVELOPE_TAIL: usize = 16;

/// The whole-record digest of `SEALED` values.
fn digest(key: &[u8], record: &[u8]) -> [u8; 32] {
    let mut ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    ctx.update(key);
    ctx.update(record);
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}

/// The digest of `CHECKED` values; `None` if the encoded record's framing is broken.
fn checked_digest(key: &[u8], record: &[u8]) -> Option<[u8; 32]> {
    let meta_len = u32::from_be_bytes(record.get(1..5)?.try_into().ok()?) as usize;
    let (framed_meta, tokens) = record.split_at_checked(5 + meta_len)?;
    let mut ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    ctx.update(key);
    ctx.update(&(record.len() as u64).to_be_bytes());
    ctx.update(framed_meta);
    if tokens.len() <= ENVELOPE_HEAD + ENVELOPE_TAIL {
        ctx.update(tokens);
    } else {
        ctx.update(&tokens[..ENVELOPE_HEAD]);
        ctx.update(&tokens[tokens.len() - ENVELOPE_TAIL..]);
    }
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    Some(out)
}

fn seal(key: &[u8; 32], record: &SessionRecord, format: RecordFormat) -> Result<Vec<u8>, StoreError> {
    let bytes = record.encode(format)?;
    let sum = checked_digest(key, &bytes).ok_or_else(|| StoreError::Corrupt("record framing".into()))?;
    let mut out = Vec::with_capacity(1 + DIGEST_LEN + bytes.len());
    out.push(CHECKED);
    out.extend_from_slice(&sum[..DIGEST_LEN]);
    out.extend_from_slice(&bytes);
    Ok(out)
}

/// Verify and decode a stored value. Values written before checksums (plain records) still read.
fn unseal(key: &[u8], stored: &[u8]) -> Result<SessionRecord, StoreError> {
    let fails = || StoreError::Corrupt("the session record fails its checksum".into());
    match stored.split_first() {
        Some((&CHECKED, rest)) if rest.len() > DIGEST_LEN => {
            let (sum, bytes) = rest.split_at(DIGEST_LEN);
            let expected = checked_digest(key, bytes).ok_or_else(fails)?;
            if !crate::crypto::ct_eq(sum, &expected[..DIGEST_LEN]) {
                return Err(fails());
            }
            SessionRecord::decode(bytes)
        }
        Some((&SEALED, rest)) if rest.len() > DIGEST_LEN => {
            let (sum, bytes) = rest.split_at(DIGEST_LEN);
            if !crate::crypto::ct_eq(sum, &digest(key, bytes)[..DIGEST_LEN]) {
                return Err(fails());
            }
            SessionRecord::decode(bytes)
        }
        // Values written before checksums existed are plain format-1 records; no build wrote a
        // later format without a checksum, so nothing else is read unchecked.
        Some((&super::FORMAT_JSON, _)) => SessionRecord::decode(stored),
        _ => Err(StoreError::Corrupt("unknown stored value".into())),
    }
}

// ---- error classification ----------------------------------------------------------------

/// A failure inside a store call, before it is mapped to what callers see.
#[derive(Debug)]
enum Fail {
    /// One record (or index entry) cannot be read: it authenticates nobody.
    Record(String),
    /// The file's structure is damaged (checksums, a panic inside redb).
    Damaged(String),
    /// Anything else (I/O, the file closed): retry later.
    Unavailable(String),
}

impl From<StoreError> for Fail {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Corrupt(why) => Self::Record(why),
            StoreError::Unavailable(why) => Self::Unavailable(why),
        }
    }
}

fn err(e: impl Into<redb::Error>) -> Fail {
    match e.into() {
        e @ (redb::Error::Corrupted(_) | redb::Error::PreviousIo | redb::Error::TransactionPoisoned) => {
            Fail::Damaged(e.to_string())
        }
        e => Fail::Unavailable(e.to_string()),
    }
}

/// Where a damaged structure was met, which decides what callers see.
#[derive(Clone, Copy)]
enum Scope {
    /// A lookup for one request: damage means that session (or mark) cannot be read → `Corrupt`.
    Lookup,
    /// A write or a scan: damage means the file is unusable → `Unavailable`, latched.
    File,
}

impl EmbeddedStore {
    /// Open or create the file with the default options (integrity check on, fail if damaged).
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        Self::open_with(path, &OpenOptions::default()).map_err(|e| StoreError::Unavailable(e.to_string()))
    }

    /// Open or create the file. Holds an exclusive lock: one Gatehouse process per file.
    pub fn open_with(path: &Path, options: &OpenOptions) -> Result<Self, OpenError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| OpenError::Other {
                path: path.display().to_string(),
                what: format!("cannot create {}: {e}", dir.display()),
            })?;
        }
        match open_file(path, options, true) {
            Ok((db, rolled_back)) => {
                if rolled_back {
                    tracing::warn!(
                        path = %path.display(),
                        "the session file's newest commit failed its checksums; redb went back to the previous \
                         commit (sessions started or ended in that last write are lost or back)"
                    );
                }
                Ok(Self::from_db(db, path))
            }
            Err(OpenError::Damaged { what, .. }) if options.on_corrupt == OnCorrupt::MoveAside => {
                let aside = move_aside(path).map_err(|e| OpenError::Other {
                    path: path.display().to_string(),
                    what: format!("it is damaged ({what}) and cannot be moved aside: {e}"),
                })?;
                tracing::error!(
                    path = %path.display(),
                    moved_to = %aside.display(),
                    damage = %what,
                    "THE SESSION FILE IS DAMAGED: it was moved aside (session.on_corrupt = \"move_aside\") and an \
                     empty store started in its place; every user signs in again"
                );
                let (db, _) = open_file(path, options, true)?;
                Ok(Self::from_db(db, path))
            }
            Err(e) => Err(e),
        }
    }

    fn from_db(db: Database, path: &Path) -> Self {
        Self {
            db: Arc::new(ContainedDb(Some(db))),
            path: Arc::new(path.to_path_buf()),
            damaged: Arc::new(OnceLock::new()),
            format: RecordFormat::default(),
        }
    }

    /// Write records in `format` (`session.record_format`).
    pub fn writing(mut self, format: RecordFormat) -> Self {
        self.format = format;
        self
    }

    /// Map a failure to what callers see; latch file damage found by a write or scan.
    fn finish<T>(path: &Path, damaged: &OnceLock<String>, scope: Scope, out: Result<T, Fail>) -> Result<T, StoreError> {
        match out {
            Ok(v) => Ok(v),
            Err(Fail::Record(why)) => Err(StoreError::Corrupt(why)),
            Err(Fail::Unavailable(why)) => Err(StoreError::Unavailable(why)),
            Err(Fail::Damaged(why)) => match scope {
                Scope::Lookup => {
                    tracing::error!(
                        path = %path.display(),
                        damage = %why,
                        "a session lookup met a damaged page of the session file; that session answers as unknown. \
                         Stop Gatehouse and run `gatehouse sessions check --store {}`",
                        path.display()
                    );
                    Err(StoreError::Corrupt(format!("the session file is damaged: {why}")))
                }
                Scope::File => {
                    if damaged.set(why.clone()).is_ok() {
                        tracing::error!(
                            path = %path.display(),
                            damage = %why,
                            "THE SESSION FILE IS DAMAGED: writes fail (logins answer 503) and readiness is false until \
                             it is repaired. Stop Gatehouse and run `gatehouse sessions check --store {}`",
                            path.display()
                        );
                    }
                    Err(StoreError::Unavailable(format!("the session file {} is damaged: {why}", path.display())))
                }
            },
        }
    }

    /// Run a read inline. A read transaction on cached pages takes microseconds, far less than a
    /// hop to the blocking pool; the hot path (/auth/me, the exchange) is read-mostly.
    fn read<T>(&self, scope: Scope, f: impl FnOnce(&Database) -> Result<T, Fail>) -> Result<T, StoreError> {
        let out = contained(|| f(&self.db)).unwrap_or_else(|panic| Err(Fail::Damaged(panic)));
        Self::finish(&self.path, &self.damaged, scope, out)
    }

    /// Run a write transaction off the async runtime (redb is blocking and fsyncs on commit).
    async fn write<T: Send + 'static>(
        &self,
        f: impl FnOnce(&redb::WriteTransaction) -> Result<T, Fail> + Send + 'static,
    ) -> Result<T, StoreError> {
        if let Some(why) = self.damaged.get() {
            return Err(StoreError::Unavailable(format!("the session file {} is damaged: {why}", self.path.display())));
        }
        let (db, path, damaged) = (self.db.clone(), self.path.clone(), self.damaged.clone());
        tokio::task::spawn_blocking(move || {
            let out = contained(|| {
                let txn = db.begin_write().map_err(err)?;
                let out = f(&txn)?;
                txn.commit().map_err(err)?;
                Ok(out)
            })
            .unwrap_or_else(|panic| Err(Fail::Damaged(panic)));
            Self::finish(&path, &damaged, Scope::File, out)
        })
        .await
        .map_err(|e| StoreError::Unavailable(e.to_string()))?
    }
}

/// Open (or create) the file with the integrity check as configured, in a thread so the check is
/// bounded in time; panics inside redb become `Damaged`. Returns whether redb rolled back to the
/// previous commit. Then make sure every table exists (which also proves a write works).
fn open_file(path: &Path, options: &OpenOptions, create: bool) -> Result<(Database, bool), OpenError> {
    let shown = path.display().to_string();
    let deadline = Instant::now() + options.integrity_check_timeout;
    let rolled_back = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (tx, rx) = std::sync::mpsc::channel();
    let (p, check, rb) = (path.to_path_buf(), options.integrity_check, rolled_back.clone());
    let cache_bytes = options.cache_bytes;
    std::thread::Builder::new()
        .name("session-file-open".into())
        .spawn(move || {
            let out = contained(|| {
                let mut b = Database::builder();
                b.set_check_integrity_on_open(check);
                b.set_cache_size(cache_bytes);
                // Called between the check's scans: stop once the deadline has passed. Progress
                // 0.3 is reported only when the newest commit failed and the previous one is used.
                b.set_repair_callback(move |s| {
                    if s.progress() > 0.2 && s.progress() < 0.5 {
                        rb.store(true, std::sync::atomic::Ordering::Relaxed);
                    }
                    if check && Instant::now() > deadline {
                        s.abort();
                    }
                });
                let db = if create { b.create(&p)? } else { b.open(&p)? };
                let txn = db.begin_write()?;
                {
                    txn.open_table(SESSIONS)?;
                    txn.open_multimap_table(BY_USER)?;
                    txn.open_multimap_table(BY_SID)?;
                    txn.open_table(EXPIRY)?;
                    txn.open_table(MARKS)?;
                }
                txn.commit()?;
                Ok::<_, redb::Error>(db)
            });
            let _ = tx.send(out);
        })
        .map_err(|e| OpenError::Other { path: shown.clone(), what: format!("cannot start a thread: {e}") })?;
    let wait = if options.integrity_check { options.integrity_check_timeout } else { Duration::from_secs(3600) };
    let secs = options.integrity_check_timeout.as_secs();
    let out = rx.recv_timeout(wait).map_err(|_| OpenError::CheckTimeout { path: shown.clone(), secs })?;
    let damaged = |what: String| OpenError::Damaged { path: shown.clone(), what };
    match out {
        Err(panic) => Err(damaged(panic)),
        Ok(Ok(db)) => Ok((db, rolled_back.load(std::sync::atomic::Ordering::Relaxed))),
        Ok(Err(redb::Error::RepairAborted)) if options.integrity_check && Instant::now() > deadline => {
            Err(OpenError::CheckTimeout { path: shown, secs })
        }
        Ok(Err(
            e @ (redb::Error::Corrupted(_) | redb::Error::RepairAborted | redb::Error::TableTypeMismatch { .. }),
        )) => Err(damaged(e.to_string())),
        Ok(Err(redb::Error::Io(e))) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            Err(damaged(format!("the file is truncated ({e})")))
        }
        // redb's "Not a redb database" (a damaged header, a file of garbage or zeros).
        Ok(Err(redb::Error::Io(e))) if e.kind() == std::io::ErrorKind::InvalidData => Err(damaged(e.to_string())),
        Ok(Err(redb::Error::DatabaseAlreadyOpen)) => Err(OpenError::Other {
            path: shown,
            what: "it is in use by another process (one Gatehouse per file; stop it first)".into(),
        }),
        Ok(Err(e)) => Err(OpenError::Other { path: shown, what: e.to_string() }),
    }
}

/// `PATH` → `PATH.damaged-YYYYMMDDTHHMMSSZ` (a `-N` suffix if that exists already), beside it.
pub fn move_aside(path: &Path) -> std::io::Result<PathBuf> {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_secs();
    let stamp = time::OffsetDateTime::from_unix_timestamp(now as i64)
        .map(|t| {
            format!(
                "{:04}{:02}{:02}T{:02}{:02}{:02}Z",
                t.year(),
                u8::from(t.month()),
                t.day(),
                t.hour(),
                t.minute(),
                t.second()
            )
        })
        .unwrap_or_else(|_| now.to_string());
    let base = format!("{}.damaged-{stamp}", path.display());
    let mut target = PathBuf::from(&base);
    let mut n = 1;
    while target.exists() {
        target = PathBuf::from(format!("{base}-{n}"));
        n += 1;
    }
    std::fs::rename(path, &target)?;
    Ok(target)
}

/// Whether another handle (a running Gatehouse) holds the file's lock. A read-only open neither
/// repairs nor writes, so it is safe on a damaged file; damage itself does not count as in use.
pub fn in_use(path: &Path) -> bool {
    matches!(contained(|| redb::ReadOnlyDatabase::open(path)), Ok(Err(redb::DatabaseError::DatabaseAlreadyOpen)))
}

/// `gatehouse sessions check`: open an existing file with the integrity check, then read every
/// record and index. Any damage is an `OpenError::Damaged`. Opening takes the file's lock, so a
/// running Gatehouse makes this fail with "in use"; the check may repair what redb can (the
/// free-page lists), as any open after a crash does.
pub fn check_file(path: &Path, now: UnixTime) -> Result<CheckReport, OpenError> {
    let shown = path.display().to_string();
    let meta = std::fs::metadata(path).map_err(|e| OpenError::Other { path: shown.clone(), what: e.to_string() })?;
    let options = OpenOptions { integrity_check_timeout: Duration::from_secs(24 * 3600), ..OpenOptions::default() };
    let (db, rolled_back) = open_file(path, &options, false)?;
    let scan = contained(|| -> Result<CheckReport, redb::Error> {
        let mut r = CheckReport { file_bytes: meta.len(), rolled_back, ..CheckReport::default() };
        let txn = db.begin_read()?;
        for entry in txn.open_table(SESSIONS)?.iter()? {
            let (k, v) = entry?;
            r.sessions += 1;
            match unseal(k.value(), v.value()) {
                Ok(rec) if rec.is_expired(now) => r.expired += 1,
                Ok(_) => {}
                Err(_) => r.unreadable += 1,
            }
        }
        let count_multi = |def| -> Result<u64, redb::Error> {
            let mut n = 0;
            for entry in txn.open_multimap_table(def)?.iter()? {
                for v in entry?.1 {
                    v?;
                    n += 1;
                }
            }
            Ok(n)
        };
        r.user_index_entries = count_multi(BY_USER)?;
        r.sid_index_entries = count_multi(BY_SID)?;
        for entry in txn.open_table(EXPIRY)?.iter()? {
            entry?;
            r.expiry_index_entries += 1;
        }
        for entry in txn.open_table(MARKS)?.iter()? {
            entry?;
            r.marks += 1;
        }
        // The stored lengths must agree with what was iterated.
        if txn.open_table(SESSIONS)?.len()? != r.sessions {
            return Err(redb::Error::Corrupted("the session table's length does not match its entries".into()));
        }
        Ok(r)
    });
    let damaged = |what: String| OpenError::Damaged { path: shown.clone(), what };
    match scan {
        Err(panic) => Err(damaged(panic)),
        Ok(Err(e)) => Err(damaged(e.to_string())),
        Ok(Ok(r)) => Ok(r),
    }
}

fn index_add(txn: &redb::WriteTransaction, key: &[u8], r: &SessionRecord) -> Result<(), Fail> {
    txn.open_multimap_table(BY_USER).map_err(err)?.insert(r.claims.user_key().as_str(), key).map_err(err)?;
    if let Some(sid) = &r.provider_sid {
        txn.open_multimap_table(BY_SID).map_err(err)?.insert(sid.as_str(), key).map_err(err)?;
    }
    txn.open_table(EXPIRY).map_err(err)?.insert((r.expires_at(), key), ()).map_err(err)?;
    Ok(())
}

fn index_remove(txn: &redb::WriteTransaction, key: &[u8], r: &SessionRecord) -> Result<(), Fail> {
    txn.open_multimap_table(BY_USER).map_err(err)?.remove(r.claims.user_key().as_str(), key).map_err(err)?;
    if let Some(sid) = &r.provider_sid {
        txn.open_multimap_table(BY_SID).map_err(err)?.remove(sid.as_str(), key).map_err(err)?;
    }
    txn.open_table(EXPIRY).map_err(err)?.remove((r.expires_at(), key)).map_err(err)?;
    Ok(())
}

/// Remove a record and its index entries. A record that no longer decodes (an older format, a
/// damaged file) is removed all the same: it authenticates nobody, and keeping it would make
/// every sweep fail. Its index entries are left to the sweeper and to readers, which skip keys
/// without a record.
fn remove_record(txn: &redb::WriteTransaction, key: &[u8]) -> Result<Option<SessionRecord>, Fail> {
    let old = {
        let mut t = txn.open_table(SESSIONS).map_err(err)?;
        let removed = t.remove(key).map_err(err)?;
        match removed.map(|g| unseal(key, g.value())) {
            Some(Err(e)) => {
                tracing::warn!(error = %e, "removed an unreadable session record");
                None
            }
            Some(Ok(r)) => Some(r),
            None => None,
        }
    };
    if let Some(r) = &old {
        index_remove(txn, key, r)?;
    }
    Ok(old)
}

fn delete_by_index(
    txn: &redb::WriteTransaction,
    index: MultimapTableDefinition<&str, &[u8]>,
    value: &str,
) -> Result<Vec<(SessionKey, SessionRecord)>, Fail> {
    let keys: Vec<Vec<u8>> = {
        let t = txn.open_multimap_table(index).map_err(err)?;
        let vals = t.get(value).map_err(err)?;
        vals.map(|v| v.map(|g| g.value().to_vec())).collect::<Result<_, _>>().map_err(err)?
    };
    remove_all(txn, keys)
}

fn remove_all(txn: &redb::WriteTransaction, keys: Vec<Vec<u8>>) -> Result<Vec<(SessionKey, SessionRecord)>, Fail> {
    let mut out = Vec::new();
    for k in keys {
        if let (Some(r), Ok(key)) = (remove_record(txn, &k)?, <[u8; 32]>::try_from(k.as_slice())) {
            out.push((SessionKey(key), r));
        }
    }
    Ok(out)
}

#[async_trait]
impl SessionStore for EmbeddedStore {
    async fn insert(&self, key: &SessionKey, record: &SessionRecord) -> Result<(), StoreError> {
        let (key, bytes, record) = (key.0, seal(&key.0, record, self.format)?, record.clone());
        self.write(move |txn| {
            txn.open_table(SESSIONS).map_err(err)?.insert(key.as_slice(), bytes.as_slice()).map_err(err)?;
            index_add(txn, &key, &record)
        })
        .await
    }

    async fn get(&self, key: &SessionKey) -> Result<Option<SessionRecord>, StoreError> {
        self.read(Scope::Lookup, |db| {
            let txn = db.begin_read().map_err(err)?;
            let t = txn.open_table(SESSIONS).map_err(err)?;
            let found = t.get(key.0.as_slice()).map_err(err)?;
            Ok(found.map(|g| unseal(&key.0, g.value())).transpose()?)
        })
    }

    async fn compare_and_swap(
        &self,
        key: &SessionKey,
        expected: u64,
        record: &SessionRecord,
    ) -> Result<bool, StoreError> {
        let (key, bytes, record) = (key.0, seal(&key.0, record, self.format)?, record.clone());
        self.write(move |txn| {
            let old = {
                let t = txn.open_table(SESSIONS).map_err(err)?;
                let g = t.get(key.as_slice()).map_err(err)?;
                g.map(|g| unseal(&key, g.value())).transpose()?
            };
            let Some(old) = old.filter(|o| o.version == expected) else {
                return Ok(false);
            };
            index_remove(txn, &key, &old)?;
            txn.open_table(SESSIONS).map_err(err)?.insert(key.as_slice(), bytes.as_slice()).map_err(err)?;
            index_add(txn, &key, &record)?;
            Ok(true)
        })
        .await
    }

    async fn delete(&self, key: &SessionKey) -> Result<Option<SessionRecord>, StoreError> {
        let key = key.0;
        self.write(move |txn| remove_record(txn, &key)).await
    }

    async fn list_by_user(&self, user_key: &str) -> Result<Vec<(SessionKey, SessionRecord)>, StoreError> {
        self.read(Scope::File, |db| {
            let txn = db.begin_read().map_err(err)?;
            let idx = txn.open_multimap_table(BY_USER).map_err(err)?;
            let sessions = txn.open_table(SESSIONS).map_err(err)?;
            let mut out = Vec::new();
            for k in idx.get(user_key).map_err(err)? {
                let k = k.map_err(err)?;
                let mut key = [0u8; 32];
                if k.value().len() != 32 {
                    continue;
                }
                key.copy_from_slice(k.value());
                if let Some(g) = sessions.get(k.value()).map_err(err)? {
                    out.push((SessionKey(key), unseal(&key, g.value())?));
                }
            }
            Ok(out)
        })
    }

    async fn delete_by_user(&self, user_key: &str) -> Result<Vec<(SessionKey, SessionRecord)>, StoreError> {
        let user_key = user_key.to_owned();
        self.write(move |txn| delete_by_index(txn, BY_USER, &user_key)).await
    }

    async fn delete_by_provider_sid(&self, sid: &str) -> Result<Vec<(SessionKey, SessionRecord)>, StoreError> {
        let sid = sid.to_owned();
        self.write(move |txn| delete_by_index(txn, BY_SID, &sid)).await
    }

    async fn sweep(&self, now: UnixTime) -> Result<usize, StoreError> {
        self.write(move |txn| {
            let due: Vec<Vec<u8>> = {
                let t = txn.open_table(EXPIRY).map_err(err)?;
                let range =
                    t.range::<(i64, &[u8])>((i64::MIN, [].as_slice())..=(now, [0xffu8; 32].as_slice())).map_err(err)?;
                range.map(|e| e.map(|(k, _)| k.value().1.to_vec())).collect::<Result<_, _>>().map_err(err)?
            };
            let mut n = 0;
            for k in due {
                if remove_record(txn, &k)?.is_some() {
                    n += 1;
                }
            }
            // Entries whose record was unreadable (so not cleaned by remove_record) go too.
            txn.open_table(EXPIRY).map_err(err)?.retain(|(at, _), _| at > now).map_err(err)?;
            let mut marks = txn.open_table(MARKS).map_err(err)?;
            marks.retain(|_, until| until > now).map_err(err)?;
            Ok(n)
        })
        .await
    }

    async fn count(&self) -> Result<Option<u64>, StoreError> {
        // redb keeps a table's length in its metadata: no scan.
        self.read(Scope::Lookup, |db| {
            let txn = db.begin_read().map_err(err)?;
            let t = txn.open_table(SESSIONS).map_err(err)?;
            t.len().map(Some).map_err(err)
        })
    }

    async fn ping(&self) -> Result<(), StoreError> {
        if let Some(why) = self.damaged.get() {
            return Err(StoreError::Unavailable(format!("the session file {} is damaged: {why}", self.path.display())));
        }
        // Lookup scope: a probe must not latch; a failure here only makes this probe fail.
        self.read(Scope::Lookup, |db| {
            let txn = db.begin_read().map_err(err)?;
            txn.open_table(SESSIONS).map_err(err)?;
            Ok(())
        })
        .map_err(|e| StoreError::Unavailable(e.to_string()))
    }

    async fn find_by_prefix(&self, hex_prefix: &str) -> Result<Vec<(SessionKey, SessionRecord)>, StoreError> {
        // An admin operation: a scan is fine.
        self.read(Scope::File, |db| {
            let txn = db.begin_read().map_err(err)?;
            let t = txn.open_table(SESSIONS).map_err(err)?;
            let mut out = Vec::new();
            for entry in t.iter().map_err(err)? {
                let (k, v) = entry.map_err(err)?;
                let Ok(key) = <[u8; 32]>::try_from(k.value()) else { continue };
                let key = SessionKey(key);
                if key_hex(&key).starts_with(hex_prefix) {
                    match unseal(&key.0, v.value()) {
                        Ok(r) => out.push((key, r)),
                        Err(e) => tracing::warn!(error = %e, "skipped an unreadable session record"),
                    }
                }
            }
            Ok(out)
        })
    }

    async fn delete_all(&self) -> Result<Vec<(SessionKey, SessionRecord)>, StoreError> {
        self.write(|txn| {
            let keys: Vec<Vec<u8>> = {
                let t = txn.open_table(SESSIONS).map_err(err)?;
                t.iter()
                    .map_err(err)?
                    .map(|e| e.map(|(k, _)| k.value().to_vec()))
                    .collect::<Result<_, _>>()
                    .map_err(err)?
            };
            remove_all(txn, keys)
        })
        .await
    }

    async fn mark(&self, kind: &str, id: &str, until: UnixTime) -> Result<bool, StoreError> {
        let name = format!("{kind}:{id}");
        self.write(move |txn| {
            let mut t = txn.open_table(MARKS).map_err(err)?;
            let fresh = t.get(name.as_str()).map_err(err)?.is_none();
            if fresh {
                t.insert(name.as_str(), until).map_err(err)?;
            }
            Ok(fresh)
        })
        .await
    }

    async fn unmark(&self, kind: &str, id: &str) -> Result<(), StoreError> {
        let name = format!("{kind}:{id}");
        self.write(move |txn| {
            txn.open_table(MARKS).map_err(err)?.remove(name.as_str()).map_err(err)?;
            Ok(())
        })
        .await
    }

    async fn is_marked(&self, kind: &str, id: &str, now: UnixTime) -> Result<bool, StoreError> {
        self.read(Scope::Lookup, |db| {
            let txn = db.begin_read().map_err(err)?;
            let t = txn.open_table(MARKS).map_err(err)?;
            Ok(t.get(format!("{kind}:{id}").as_str()).map_err(err)?.is_some_and(|g| g.value() > now))
        })
    }

    async fn lock_refresh(&self, _key: &SessionKey) -> Result<RefreshGuard, StoreError> {
        // One process owns the file (exclusive lock), so the exchange's in-process lock suffices.
        Ok(Box::new(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    impl EmbeddedStore {
        /// Bytes in redb's cache (counted only with redb's `cache_metrics`, a dev-dependency feature).
        fn cache_used_bytes(&self) -> usize {
            use redb::ReadableDatabase as _;
            self.db.cache_stats().used_bytes()
        }
    }

    /// `session.cache_bytes` bounds redb's cache: 3,000 records of ~4 KiB (12 MB of file), all
    /// written and read back, leave at most the configured 1 MiB cached — and a large cache does
    /// hold them (so the bound is what keeps the small one small). redb's default, 1 GiB, let the
    /// process grow with the file (docs/benchmarks.md).
    #[tokio::test]
    async fn cache_bytes_bounds_the_memory_the_file_costs() {
        async fn fill(cache_bytes: usize) -> usize {
            let dir = tempfile::tempdir().unwrap();
            let options = OpenOptions { cache_bytes, ..OpenOptions::default() };
            let store = EmbeddedStore::open_with(&dir.path().join("s.redb"), &options).unwrap();
            let mut keys = Vec::new();
            for i in 0..3000 {
                let key = crate::session::SessionId::generate().unwrap().key();
                let mut record = super::super::conformance::record(&format!("user-{i}"), &format!("sid-{i}"), 1000);
                record.sealed_tokens = vec![7; 4000];
                store.insert(&key, &record).await.unwrap();
                keys.push(key);
            }
            for key in &keys {
                assert!(store.get(key).await.unwrap().is_some());
            }
            store.cache_used_bytes()
        }
        let small = fill(1 << 20).await;
        assert!(small <= (1 << 20) + (1 << 16), "a 1 MiB cache holds {small} bytes");
        let large = fill(64 << 20).await;
        assert!(large > 8 << 20, "a 64 MiB cache holds only {large} bytes: the test proves nothing");
    }

    #[tokio::test]
    async fn conformance() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(&dir.path().join("s.redb")).unwrap();
        super::super::conformance::run(&store).await;
        // The same contract while writing format 1 (`record_format = "json"`).
        let store = EmbeddedStore::open(&dir.path().join("json.redb")).unwrap().writing(RecordFormat::Json);
        super::super::conformance::run(&store).await;
    }

    /// Phase 1 of an upgrade: a store set to `json` writes format 1 (what older builds read); a
    /// store in the default writes format 2; each reads what the other wrote.
    #[tokio::test]
    async fn a_store_writes_the_configured_record_format_and_reads_both() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        let (k1, k2) = (
            crate::session::SessionId::generate().unwrap().key(),
            crate::session::SessionId::generate().unwrap().key(),
        );
        async fn raw_format(store: &EmbeddedStore, k: [u8; 32]) -> Result<u8, StoreError> {
            store
                .write(move |txn| {
                    let t = txn.open_table(SESSIONS).map_err(err)?;
                    let v = t.get(k.as_slice()).map_err(err)?.unwrap().value().to_vec();
                    assert_eq!(v[0], CHECKED);
                    Ok(v[1 + DIGEST_LEN])
                })
                .await
        }
        let old = EmbeddedStore::open(&path).unwrap().writing(RecordFormat::Json);
        old.insert(&k1, &super::super::conformance::record("alice", "kc1", 1000)).await.unwrap();
        assert_eq!(raw_format(&old, k1.0).await.unwrap(), 1, "json writes format 1");
        drop(old);
        let new = EmbeddedStore::open(&path).unwrap();
        new.insert(&k2, &super::super::conformance::record("bob", "kc2", 1000)).await.unwrap();
        assert_eq!(raw_format(&new, k2.0).await.unwrap(), 2, "the default writes format 2");
        let mut alice = new.get(&k1).await.unwrap().unwrap();
        assert_eq!(alice.claims.sub, "alice", "format 1 reads");
        // A touch rewrites the record in the writer's format.
        alice.version += 1;
        assert!(new.compare_and_swap(&k1, alice.version - 1, &alice).await.unwrap());
        assert_eq!(raw_format(&new, k1.0).await.unwrap(), 2);
        drop(new);
        let old = EmbeddedStore::open(&path).unwrap().writing(RecordFormat::Json);
        assert_eq!(old.get(&k2).await.unwrap().unwrap().claims.sub, "bob", "format 2 reads");
        assert_eq!(old.get(&k1).await.unwrap().unwrap().version, alice.version, "so does the rewritten record");
    }

    #[tokio::test]
    async fn survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        let key = crate::session::SessionId::generate().unwrap().key();
        {
            let store = EmbeddedStore::open(&path).unwrap();
            store.insert(&key, &super::super::conformance::record("alice", "kc", 10)).await.unwrap();
        }
        let store = EmbeddedStore::open(&path).unwrap();
        assert_eq!(store.get(&key).await.unwrap().unwrap().claims.sub, "alice");
    }

    #[tokio::test]
    async fn second_process_cannot_open_the_same_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        let _first = EmbeddedStore::open(&path).unwrap();
        assert!(EmbeddedStore::open(&path).is_err());
    }

    /// A byte changed on disk inside a record (here the Keycloak session id `kc` → `kd`, which
    /// would still decode) fails the record's checksum and reads as `Corrupt`; so does a record
    /// filed under another key. Unsealed (older) records still read.
    #[tokio::test]
    async fn a_record_altered_on_disk_fails_its_checksum() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(&dir.path().join("s.redb")).unwrap();
        let (k1, k2) = (
            crate::session::SessionId::generate().unwrap().key(),
            crate::session::SessionId::generate().unwrap().key(),
        );
        store.insert(&k1, &super::super::conformance::record("alice", "kc", 1000)).await.unwrap();
        let (a, b) = (k1.0, k2.0);
        store
            .write(move |txn| {
                let mut t = txn.open_table(SESSIONS).map_err(err)?;
                let mut v = t.get(a.as_slice()).map_err(err)?.unwrap().value().to_vec();
                // Field 3 (`provider_sid`), 2 bytes long, in the binary metadata.
                let needle = b"\x1a\x02kc";
                let i = v.windows(needle.len()).position(|w| w == needle).unwrap();
                v[i + 3] = b'd';
                t.insert(a.as_slice(), v.as_slice()).map_err(err)?;
                // The intact value of k1, filed under k2.
                let legacy = super::super::conformance::record("bob", "kc2", 1000).encode(RecordFormat::Json)?;
                t.insert(b.as_slice(), legacy.as_slice()).map_err(err)?;
                Ok(())
            })
            .await
            .unwrap();
        assert!(matches!(store.get(&k1).await, Err(StoreError::Corrupt(_))), "altered record");
        assert_eq!(store.get(&k2).await.unwrap().unwrap().claims.sub, "bob", "an unsealed (older) record still reads");
        let moved = store.write(move |txn| {
            let t = txn.open_table(SESSIONS).map_err(err)?;
            let v = t.get(a.as_slice()).map_err(err)?.unwrap().value().to_vec();
            Ok(v)
        });
        let mut v = moved.await.unwrap();
        let i = v.windows(4).position(|w| w == b"\x1a\x02kd").unwrap();
        v[i + 3] = b'c';
        let bytes = v.clone();
        store
            .write(move |txn| {
                txn.open_table(SESSIONS).map_err(err)?.insert(b.as_slice(), bytes.as_slice()).map_err(err)?;
                Ok(())
            })
            .await
            .unwrap();
        assert!(matches!(store.get(&k2).await, Err(StoreError::Corrupt(_))), "a record under another key");
    }

    /// The digest covers the envelope's ends (nonce, GCM tag) but not its ciphertext, whose own
    /// GCM tag covers it when opened: a read costs the same for any token size. Values written
    /// with the older whole-record digest still read, and still fail it when altered.
    #[test]
    fn the_digest_skips_only_the_envelope_ciphertext_and_old_digests_still_read() {
        let key = [7u8; 32];
        let mut r = super::super::conformance::record("alice", "kc", 1000);
        r.sealed_tokens = (0..3000u32).map(|i| i as u8).collect();
        let stored = seal(&key, &r, RecordFormat::default()).unwrap();
        assert_eq!(stored[0], CHECKED);
        assert_eq!(unseal(&key, &stored).unwrap().sealed_tokens, r.sealed_tokens);
        assert!(unseal(&[8u8; 32], &stored).is_err(), "bound to the key");
        let n = stored.len();
        for (at, covered) in [
            (n - 1, true),
            (n - 16, true),
            (n - 17, false),
            (n - 2000, false),
            (n - 2979, false),
            (n - 2980, true),
            (n - 3000, true),
            (n - 3001, true),
        ] {
            let mut v = stored.clone();
            v[at] ^= 1;
            assert_eq!(unseal(&key, &v).is_err(), covered, "byte {} from the end", n - at);
        }
        let mut v = stored.clone();
        v.truncate(n - 1);
        assert!(unseal(&key, &v).is_err(), "length bound");
        // The older format: SHA-256 over the whole record.
        let bytes = r.encode(RecordFormat::Json).unwrap();
        let mut old = vec![SEALED];
        old.extend_from_slice(&digest(&key, &bytes)[..DIGEST_LEN]);
        old.extend_from_slice(&bytes);
        assert_eq!(unseal(&key, &old).unwrap().claims.sub, "alice");
        let mid = old.len() - 1500;
        old[mid] ^= 1;
        assert!(unseal(&key, &old).is_err());
    }

    /// A record in an older format (or damaged) must not wedge the sweeper or the admin API.
    #[tokio::test]
    async fn unreadable_records_are_swept_and_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(&dir.path().join("s.redb")).unwrap();
        let good = crate::session::SessionId::generate().unwrap().key();
        store.insert(&good, &super::super::conformance::record("alice", "kc", 1000)).await.unwrap();
        let bad = crate::session::SessionId::generate().unwrap().key();
        let bad_key = bad.0.to_vec();
        store
            .write(move |txn| {
                txn.open_table(SESSIONS)
                    .map_err(err)?
                    .insert(bad_key.as_slice(), b"\x00garbage".as_slice())
                    .map_err(err)?;
                txn.open_table(EXPIRY).map_err(err)?.insert((5, bad_key.as_slice()), ()).map_err(err)?;
                Ok(())
            })
            .await
            .unwrap();
        assert!(matches!(store.get(&bad).await, Err(StoreError::Corrupt(_))), "reads fail closed");
        let listed = store.find_by_prefix("").await.unwrap();
        assert_eq!(listed.len(), 1, "the admin listing skips it");
        store.sweep(10).await.expect("the sweep is not wedged by it");
        assert!(store.get(&bad).await.unwrap().is_none(), "and removes it");
        assert!(store.get(&good).await.unwrap().is_some(), "the good record stays");
        let stale =
            store.write(|txn| Ok(txn.open_table(EXPIRY).map_err(err)?.iter().map_err(err)?.count())).await.unwrap();
        assert_eq!(stale, 1, "only the good record's expiry entry remains");
    }
}

#[cfg(test)]
#[path = "embedded_damage.rs"]
mod damage;
