//! The embedded store against a file damaged the way a disk or a bad copy damages it: single
//! pages overwritten with garbage (every page of the file, one at a time), several pages, the
//! header, the tail, truncation, zero-fill, and random damage from fixed seeds. For each, no panic
//! may leave the store API, and either the open fails as `Damaged` naming the file, or it succeeds
//! and every old session reads back as itself, as unknown, or as `Corrupt` — never as someone else.
//! Each case runs twice: with the start-up integrity check, and without it (so the run-time
//! containment of panics inside redb is exercised too).

use std::path::{Path, PathBuf};

use super::*;
use crate::session::SessionId;
use crate::session::conformance::record;

const PAGE: usize = 4096;

/// A real store with sessions of several users, index entries and marks, written through the API.
fn build_store(dir: &Path) -> (PathBuf, Vec<(SessionKey, String)>) {
    let path = dir.join("pristine.redb");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let store = EmbeddedStore::open(&path).unwrap();
    let mut keys = Vec::new();
    rt.block_on(async {
        for i in 0..120 {
            let key = SessionId::generate().unwrap().key();
            let user = format!("user-{}", i % 17);
            let mut r = record(&user, &format!("kc-{i}"), 1_000 + i);
            r.sealed_tokens = vec![i as u8; 200 + (i as usize * 13) % 400];
            store.insert(&key, &r).await.unwrap();
            keys.push((key, user));
        }
        for i in 0..40 {
            store.mark("jti", &format!("j-{i}"), 10_000).await.unwrap();
        }
        // Some churn so the file has freed pages and more than one commit behind it.
        for (k, _) in keys.drain(100..) {
            store.delete(&k).await.unwrap();
        }
    });
    drop(store);
    (path, keys)
}

/// Deterministic garbage (xorshift64*), so failures are reproducible.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    fn fill(&mut self, buf: &mut [u8]) {
        for b in buf {
            *b = self.next() as u8;
        }
    }
}

fn garbage_page(bytes: &mut [u8], page: usize, rng: &mut Rng) {
    let end = ((page + 1) * PAGE).min(bytes.len());
    rng.fill(&mut bytes[page * PAGE..end]);
}

#[derive(Default, Debug)]
struct Tally {
    cases: usize,
    refused: usize,
    opened: usize,
    corrupt_reads: usize,
    lost: usize,
    contained_panics: usize,
}

/// Open the damaged file and use every old session; assert the contract. `name` names the case.
fn probe(path: &Path, keys: &[(SessionKey, String)], check: bool, name: &str, t: &mut Tally) {
    t.cases += 1;
    let options = OpenOptions { integrity_check: check, ..OpenOptions::default() };
    let escaped = std::panic::catch_unwind(AssertUnwindSafe(|| {
        match EmbeddedStore::open_with(path, &options) {
            Err(OpenError::Damaged { path: p, what }) => {
                t.refused += 1;
                assert_eq!(p, path.display().to_string(), "{name}: the error names the file");
                if what.contains("storage library failure") {
                    t.contained_panics += 1;
                }
                let line = OpenError::Damaged { path: p, what }.to_string();
                assert!(line.contains("gatehouse sessions reset --store"), "{name}: {line}");
                assert!(!line.contains('\n'), "{name}: one line");
            }
            Err(e @ OpenError::Other { .. }) => {
                t.refused += 1;
                if std::env::var_os("GATEHOUSE_DAMAGE_VERBOSE").is_some() {
                    println!("{name} (check = {check}): {e}");
                }
                assert!(e.to_string().contains(&path.display().to_string()), "{name}: {e}");
            }
            Err(e @ OpenError::CheckTimeout { .. }) => panic!("{name}: {e}"),
            Ok(store) => {
                t.opened += 1;
                let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
                rt.block_on(async {
                    for (k, user) in keys {
                        match store.get(k).await {
                            Ok(Some(r)) => assert_eq!(&r.claims.sub, user, "{name}: a session reads as someone else"),
                            Ok(None) => t.lost += 1,
                            Err(e) => {
                                t.corrupt_reads += 1;
                                if e.to_string().contains("storage library failure") {
                                    t.contained_panics += 1;
                                }
                            }
                        }
                    }
                    // Every other operation returns (Ok or Err); none may panic.
                    let _ = store.list_by_user(&record("user-3", "", 0).claims.user_key()).await;
                    let _ = store.is_marked("jti", "j-3", 0).await;
                    let fresh = SessionId::generate().unwrap().key();
                    let inserted = store.insert(&fresh, &record("new", "kc-new", 5_000)).await;
                    if inserted.is_ok() {
                        // A write that worked must be readable (unless the file is damaged there too).
                        if let Ok(Some(r)) = store.get(&fresh).await {
                            assert_eq!(r.claims.sub, "new");
                        }
                    } else {
                        assert!(store.ping().await.is_err(), "{name}: a damaged file makes readiness fail");
                    }
                    let _ = store.sweep(1_500).await;
                    let _ = store.find_by_prefix("ab").await;
                    let _ = store.delete_by_provider_sid("kc-5").await;
                    let _ = store.delete_by_user(&record("user-4", "", 0).claims.user_key()).await;
                    let _ = store.ping().await;
                });
            }
        }
    }));
    assert!(escaped.is_ok(), "{name}: a panic escaped the store (check = {check})");
}

fn damaged_copy(dir: &Path, pristine: &[u8], damage: impl FnOnce(&mut Vec<u8>)) -> PathBuf {
    let mut bytes = pristine.to_vec();
    damage(&mut bytes);
    let path = dir.join("damaged.redb");
    let _ = std::fs::remove_file(&path);
    std::fs::write(&path, &bytes).unwrap();
    path
}

fn run_case(
    dir: &Path,
    pristine: &[u8],
    keys: &[(SessionKey, String)],
    name: &str,
    t: &mut Tally,
    damage: impl Fn(&mut Vec<u8>),
) {
    for check in [true, false] {
        let path = damaged_copy(dir, pristine, &damage);
        probe(&path, keys, check, name, t);
    }
}

#[test]
fn every_single_page_overwritten_never_panics() {
    let dir = tempfile::tempdir().unwrap();
    let (pristine_path, keys) = build_store(dir.path());
    let pristine = std::fs::read(&pristine_path).unwrap();
    let pages = pristine.len().div_ceil(PAGE);
    assert!(pages >= 20, "the store spans enough pages to be meaningful ({pages})");
    let mut t = Tally::default();
    for page in 0..pages {
        run_case(dir.path(), &pristine, &keys, &format!("page {page} of {pages}"), &mut t, |b| {
            garbage_page(b, page, &mut Rng(page as u64 + 1))
        });
    }
    println!("every page: {pages} pages, {t:?}");
    assert!(t.refused > 0, "overwritten pages are detected at start-up");
    assert!(t.opened > 0, "pages outside the live trees do not stop start-up");
}

#[test]
fn header_tail_several_pages_truncation_and_zero_fill_never_panic() {
    let dir = tempfile::tempdir().unwrap();
    let (pristine_path, keys) = build_store(dir.path());
    let pristine = std::fs::read(&pristine_path).unwrap();
    let len = pristine.len();
    let pages = len.div_ceil(PAGE);
    let mut t = Tally::default();
    run_case(dir.path(), &pristine, &keys, "header page", &mut t, |b| garbage_page(b, 0, &mut Rng(7)));
    run_case(dir.path(), &pristine, &keys, "header magic", &mut t, |b| b[..16].fill(0xAB));
    run_case(dir.path(), &pristine, &keys, "last page", &mut t, |b| garbage_page(b, pages - 1, &mut Rng(8)));
    run_case(dir.path(), &pristine, &keys, "last 3 pages", &mut t, |b| {
        for p in pages - 3..pages {
            garbage_page(b, p, &mut Rng(p as u64 + 9));
        }
    });
    run_case(dir.path(), &pristine, &keys, "every 3rd page", &mut t, |b| {
        for p in (1..pages).step_by(3) {
            garbage_page(b, p, &mut Rng(p as u64 + 11));
        }
    });
    run_case(dir.path(), &pristine, &keys, "all garbage", &mut t, |b| Rng(12).fill(b));
    run_case(dir.path(), &pristine, &keys, "zero-filled", &mut t, |b| b.fill(0));
    run_case(dir.path(), &pristine, &keys, "interior zero page", &mut t, |b| {
        b[(pages / 2) * PAGE..(pages / 2 + 1) * PAGE].fill(0)
    });
    for cut in [len / 2, len - PAGE, len - 1, PAGE, 100, 0] {
        run_case(dir.path(), &pristine, &keys, &format!("truncated to {cut}"), &mut t, |b| b.truncate(cut));
    }
    println!("shapes: {t:?}");
    assert!(t.refused > 0);
}

/// Random damage from fixed seeds (`GATEHOUSE_DAMAGE_SEEDS=N` runs more): a few pages, flipped
/// bytes, a truncation, in any combination.
#[test]
fn random_damage_from_fixed_seeds_never_panics() {
    let dir = tempfile::tempdir().unwrap();
    let (pristine_path, keys) = build_store(dir.path());
    let pristine = std::fs::read(&pristine_path).unwrap();
    let seeds: u64 = std::env::var("GATEHOUSE_DAMAGE_SEEDS").ok().and_then(|s| s.parse().ok()).unwrap_or(60);
    let mut t = Tally::default();
    for seed in 1..=seeds {
        run_case(dir.path(), &pristine, &keys, &format!("seed {seed}"), &mut t, |b| {
            let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
            for _ in 0..1 + rng.below(3) {
                if b.is_empty() {
                    break;
                }
                match rng.below(3) {
                    0 => {
                        let page = rng.below(b.len().div_ceil(PAGE));
                        garbage_page(b, page, &mut rng)
                    }
                    1 => {
                        for _ in 0..1 + rng.below(16) {
                            let i = rng.below(b.len());
                            b[i] ^= 1 << rng.below(8);
                        }
                    }
                    _ => {
                        if rng.below(4) == 0 {
                            let cut = rng.below(b.len());
                            b.truncate(cut);
                        }
                    }
                }
            }
        });
    }
    println!("random: {seeds} seeds, {t:?}");
}

#[test]
fn move_aside_keeps_the_damaged_file_and_starts_empty() {
    let dir = tempfile::tempdir().unwrap();
    let (pristine_path, _) = build_store(dir.path());
    let mut bytes = std::fs::read(&pristine_path).unwrap();
    Rng(3).fill(&mut bytes);
    let path = dir.path().join("sessions.redb");
    std::fs::write(&path, &bytes).unwrap();
    assert!(matches!(EmbeddedStore::open_with(&path, &OpenOptions::default()), Err(OpenError::Damaged { .. })));
    let options = OpenOptions { on_corrupt: OnCorrupt::MoveAside, ..OpenOptions::default() };
    let store = EmbeddedStore::open_with(&path, &options).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        store.ping().await.unwrap();
        assert!(store.find_by_prefix("").await.unwrap().is_empty(), "a fresh, empty store");
    });
    let aside: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("sessions.redb.damaged-"))
        .collect();
    assert_eq!(aside.len(), 1, "{aside:?}");
    assert_eq!(std::fs::read(dir.path().join(&aside[0])).unwrap(), bytes, "the damaged file is kept as it was");
}

#[test]
fn check_file_reports_counts_and_damage() {
    let dir = tempfile::tempdir().unwrap();
    let (path, keys) = build_store(dir.path());
    let r = check_file(&path, 1_050).unwrap();
    assert_eq!(r.sessions, keys.len() as u64);
    assert_eq!(r.unreadable, 0);
    assert_eq!(r.marks, 40);
    assert_eq!(r.user_index_entries, keys.len() as u64);
    assert_eq!(r.expiry_index_entries, keys.len() as u64);
    assert!(!in_use(&path));
    {
        let _open = EmbeddedStore::open(&path).unwrap();
        assert!(in_use(&path), "a running store holds the file");
        assert!(matches!(check_file(&path, 0), Err(OpenError::Other { .. })));
    }
    let mut bytes = std::fs::read(&path).unwrap();
    let pages = bytes.len().div_ceil(PAGE);
    // Damage every page after the header: the live trees are certainly hit.
    for p in 1..pages {
        garbage_page(&mut bytes, p, &mut Rng(p as u64));
    }
    std::fs::write(&path, &bytes).unwrap();
    match check_file(&path, 0) {
        Err(OpenError::Damaged { path: p, .. }) => assert_eq!(p, path.display().to_string()),
        other => panic!("expected Damaged, got {other:?}"),
    }
}

/// A panic inside a contained call becomes an error and the hook stays quiet; outside, panics are
/// still panics.
#[test]
fn contained_turns_a_panic_into_an_error() {
    #[allow(clippy::panic)]
    let out: Result<(), String> = contained(|| panic!("boom"));
    let e = out.unwrap_err();
    assert!(e.contains("boom") && e.contains("embedded_damage.rs"), "{e}");
    assert_eq!(contained(|| 5).unwrap(), 5);
}
