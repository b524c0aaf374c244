//! The embedded store (default, one node): a redb file, durable across restarts and `kill -9`
//! (every commit is fsynced). redb has no TTLs, so an expiry index drives the sweeper, and the
//! user and Keycloak-`sid` indexes are written in the same transaction as the record.

use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use redb::{
    Database, MultimapTableDefinition, ReadableDatabase, ReadableMultimapTable, ReadableTable, TableDefinition,
};

use super::{RefreshGuard, SessionKey, SessionRecord, SessionStore, StoreError, key_hex};
use crate::clock::UnixTime;

const SESSIONS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("sessions");
const BY_USER: MultimapTableDefinition<&str, &[u8]> = MultimapTableDefinition::new("sessions_by_user");
const BY_SID: MultimapTableDefinition<&str, &[u8]> = MultimapTableDefinition::new("sessions_by_provider_sid");
const EXPIRY: TableDefinition<(i64, &[u8]), ()> = TableDefinition::new("sessions_by_expiry");
/// `kind:id` → expiry (back-channel `jti` replay cache, logout tombstones).
const MARKS: TableDefinition<&str, i64> = TableDefinition::new("marks");

pub struct EmbeddedStore {
    db: Arc<Database>,
}

fn err(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

impl EmbeddedStore {
    /// Open or create the file. Holds an exclusive lock: one Gatehouse process per file.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| err(format!("cannot create {}: {e}", dir.display())))?;
        }
        let db = Database::create(path).map_err(|e| err(format!("cannot open {}: {e}", path.display())))?;
        let txn = db.begin_write().map_err(err)?;
        {
            txn.open_table(SESSIONS).map_err(err)?;
            txn.open_multimap_table(BY_USER).map_err(err)?;
            txn.open_multimap_table(BY_SID).map_err(err)?;
            txn.open_table(EXPIRY).map_err(err)?;
            txn.open_table(MARKS).map_err(err)?;
        }
        txn.commit().map_err(err)?;
        Ok(Self { db: Arc::new(db) })
    }

    /// Run a write transaction off the async runtime (redb is blocking and fsyncs on commit).
    async fn write<T: Send + 'static>(
        &self,
        f: impl FnOnce(&redb::WriteTransaction) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || {
            let txn = db.begin_write().map_err(err)?;
            let out = f(&txn)?;
            txn.commit().map_err(err)?;
            Ok(out)
        })
        .await
        .map_err(err)?
    }
}

fn index_add(txn: &redb::WriteTransaction, key: &[u8], r: &SessionRecord) -> Result<(), StoreError> {
    txn.open_multimap_table(BY_USER).map_err(err)?.insert(r.claims.user_key().as_str(), key).map_err(err)?;
    if let Some(sid) = &r.provider_sid {
        txn.open_multimap_table(BY_SID).map_err(err)?.insert(sid.as_str(), key).map_err(err)?;
    }
    txn.open_table(EXPIRY).map_err(err)?.insert((r.expires_at(), key), ()).map_err(err)?;
    Ok(())
}

fn index_remove(txn: &redb::WriteTransaction, key: &[u8], r: &SessionRecord) -> Result<(), StoreError> {
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
fn remove_record(txn: &redb::WriteTransaction, key: &[u8]) -> Result<Option<SessionRecord>, StoreError> {
    let old = {
        let mut t = txn.open_table(SESSIONS).map_err(err)?;
        let removed = t.remove(key).map_err(err)?;
        match removed.map(|g| SessionRecord::decode(g.value())) {
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
) -> Result<Vec<(SessionKey, SessionRecord)>, StoreError> {
    let keys: Vec<Vec<u8>> = {
        let t = txn.open_multimap_table(index).map_err(err)?;
        let vals = t.get(value).map_err(err)?;
        vals.map(|v| v.map(|g| g.value().to_vec())).collect::<Result<_, _>>().map_err(err)?
    };
    remove_all(txn, keys)
}

fn remove_all(
    txn: &redb::WriteTransaction,
    keys: Vec<Vec<u8>>,
) -> Result<Vec<(SessionKey, SessionRecord)>, StoreError> {
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
        let (key, bytes, record) = (key.0, record.encode()?, record.clone());
        self.write(move |txn| {
            txn.open_table(SESSIONS).map_err(err)?.insert(key.as_slice(), bytes.as_slice()).map_err(err)?;
            index_add(txn, &key, &record)
        })
        .await
    }

    async fn get(&self, key: &SessionKey) -> Result<Option<SessionRecord>, StoreError> {
        // Reads run inline: a read transaction on cached pages takes microseconds, far less than
        // a hop to the blocking pool; the hot path (/auth/me, the exchange) is read-mostly.
        let txn = self.db.begin_read().map_err(err)?;
        let t = txn.open_table(SESSIONS).map_err(err)?;
        let found = t.get(key.0.as_slice()).map_err(err)?;
        found.map(|g| SessionRecord::decode(g.value())).transpose()
    }

    async fn compare_and_swap(
        &self,
        key: &SessionKey,
        expected: u64,
        record: &SessionRecord,
    ) -> Result<bool, StoreError> {
        let (key, bytes, record) = (key.0, record.encode()?, record.clone());
        self.write(move |txn| {
            let old = {
                let t = txn.open_table(SESSIONS).map_err(err)?;
                let g = t.get(key.as_slice()).map_err(err)?;
                g.map(|g| SessionRecord::decode(g.value())).transpose()?
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
        let txn = self.db.begin_read().map_err(err)?;
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
                out.push((SessionKey(key), SessionRecord::decode(g.value())?));
            }
        }
        Ok(out)
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

    async fn ping(&self) -> Result<(), StoreError> {
        self.db.begin_read().map_err(err)?;
        Ok(())
    }

    async fn find_by_prefix(&self, hex_prefix: &str) -> Result<Vec<(SessionKey, SessionRecord)>, StoreError> {
        // An admin operation: a scan is fine.
        let txn = self.db.begin_read().map_err(err)?;
        let t = txn.open_table(SESSIONS).map_err(err)?;
        let mut out = Vec::new();
        for entry in t.iter().map_err(err)? {
            let (k, v) = entry.map_err(err)?;
            let Ok(key) = <[u8; 32]>::try_from(k.value()) else { continue };
            let key = SessionKey(key);
            if key_hex(&key).starts_with(hex_prefix) {
                match SessionRecord::decode(v.value()) {
                    Ok(r) => out.push((key, r)),
                    Err(e) => tracing::warn!(error = %e, "skipped an unreadable session record"),
                }
            }
        }
        Ok(out)
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
        let txn = self.db.begin_read().map_err(err)?;
        let t = txn.open_table(MARKS).map_err(err)?;
        Ok(t.get(format!("{kind}:{id}").as_str()).map_err(err)?.is_some_and(|g| g.value() > now))
    }

    async fn lock_refresh(&self, _key: &SessionKey) -> Result<RefreshGuard, StoreError> {
        // One process owns the file (exclusive lock), so the exchange's in-process lock suffices.
        Ok(Box::new(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn conformance() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(&dir.path().join("s.redb")).unwrap();
        super::super::conformance::run(&store).await;
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
