//! Snapshots of the memory tier, so entries learned while Redis was unavailable survive a
//! crash. The file is written to a temporary name, fsynced and renamed, so a crash never
//! leaves a torn file; a checksum catches any other damage.
//!
//! Layout (little-endian): `RCSNAP2\n`, a byte saying whether other instances were known when
//! it was written, then the counter count and `(len, key, value)` triples, then the entry
//! count and `(len, key, expires_at_ms, len, encoded entry)` records, then the 128-bit xxh3 of
//! everything before it. `RCSNAP1` files (no flag byte) still load.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::{Buf, BufMut, Bytes, BytesMut};

use super::memory::{MemoryContents, MemoryStore};
use super::{CacheEntry, Keyspace, Source, Tier};

const MAGIC: &[u8; 8] = b"RCSNAP2\n";
const MAGIC_V1: &[u8; 8] = b"RCSNAP1\n";

/// Serialises `contents`.
pub fn encode(contents: &MemoryContents) -> Bytes {
    let mut out = BytesMut::with_capacity(
        64 + contents
            .entries
            .iter()
            .map(|(k, _, e)| k.len() + e.body.len() + 256)
            .sum::<usize>(),
    );
    out.put_slice(MAGIC);
    out.put_u8(u8::from(contents.others_known));
    out.put_u32_le(contents.gens.len() as u32);
    for (key, value) in &contents.gens {
        out.put_u32_le(key.len() as u32);
        out.put_slice(key.as_bytes());
        out.put_u64_le(*value);
    }
    out.put_u32_le(contents.entries.len() as u32);
    for (key, expires_at, entry) in &contents.entries {
        let encoded = entry.encode();
        out.put_u32_le(key.len() as u32);
        out.put_slice(key.as_bytes());
        out.put_u64_le(*expires_at);
        out.put_u32_le(encoded.len() as u32);
        out.put_slice(&encoded);
    }
    let sum = xxhash_rust::xxh3::xxh3_128(&out);
    out.put_u128_le(sum);
    out.freeze()
}

/// Inverse of [`encode`]; any damage is an error naming what is wrong.
pub fn decode(raw: &[u8]) -> Result<MemoryContents, String> {
    let v1 = raw.len() >= MAGIC_V1.len() && &raw[..MAGIC_V1.len()] == MAGIC_V1;
    if raw.len() < MAGIC.len() + 8 + 16 || !(v1 || &raw[..MAGIC.len()] == MAGIC) {
        return Err("not a runcache snapshot".into());
    }
    let (body, sum) = raw.split_at(raw.len() - 16);
    let mut sum_bytes = sum;
    if xxhash_rust::xxh3::xxh3_128(body) != sum_bytes.get_u128_le() {
        return Err("checksum mismatch".into());
    }
    let mut buf = &body[MAGIC.len()..];
    fn take<'a>(buf: &mut &'a [u8], n: usize) -> Result<&'a [u8], String> {
        if buf.len() < n {
            return Err("truncated".into());
        }
        let (head, tail) = buf.split_at(n);
        *buf = tail;
        Ok(head)
    }
    fn string(buf: &mut &[u8]) -> Result<String, String> {
        let len = take(buf, 4)?.get_u32_le() as usize;
        String::from_utf8(take(buf, len)?.to_vec()).map_err(|_| "bad key".to_owned())
    }
    let mut contents = MemoryContents::default();
    if !v1 {
        contents.others_known = take(&mut buf, 1)?[0] != 0;
    }
    let gens = take(&mut buf, 4)?.get_u32_le();
    for _ in 0..gens {
        let key = string(&mut buf)?;
        let value = take(&mut buf, 8)?.get_u64_le();
        contents.gens.push((key, value));
    }
    let entries = take(&mut buf, 4)?.get_u32_le();
    for _ in 0..entries {
        let key = string(&mut buf)?;
        let expires_at = take(&mut buf, 8)?.get_u64_le();
        let len = take(&mut buf, 4)?.get_u32_le() as usize;
        // The source is replaced on import: counters mean something only in the memory tier
        // that loads them.
        let source = Source {
            tier: Tier::Memory,
            incarnation: 0,
        };
        let entry = CacheEntry::decode(Bytes::copy_from_slice(take(&mut buf, len)?), source)
            .map_err(|e| e.to_string())?;
        contents.entries.push((key, expires_at, entry));
    }
    if !buf.is_empty() {
        return Err("trailing bytes".into());
    }
    Ok(contents)
}

/// Writes `data` to `path` atomically: temporary file, fsync, rename, fsync of the directory.
fn write_atomically(path: &Path, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(data)?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir)?.sync_all()
}

/// What loading a snapshot did.
#[derive(Debug, Clone, Default, serde::Serialize, utoipa::ToSchema)]
pub struct SnapshotStatus {
    /// Snapshot file.
    pub path: String,
    /// Entries loaded at start.
    pub loaded_entries: u64,
    /// Entries dropped at start (expired, or of another key version).
    pub dropped_entries: u64,
    /// Why the snapshot found at start could not be used.
    pub load_error: Option<String>,
    /// Snapshots written by this process.
    pub written: u64,
}

/// Takes and loads snapshots of the memory tier.
#[derive(Debug)]
pub struct Snapshotter {
    path: PathBuf,
    every_changes: u64,
    interval: Duration,
    written_at_changes: AtomicU64,
    last_write: Mutex<Instant>,
    status: Mutex<SnapshotStatus>,
}

impl Snapshotter {
    /// A snapshotter writing to `path` after `every_changes` changes, or after `interval`
    /// with at least one change.
    pub fn new(path: PathBuf, every_changes: u64, interval: Duration) -> Self {
        let status = SnapshotStatus {
            path: path.display().to_string(),
            ..SnapshotStatus::default()
        };
        Self {
            path,
            every_changes: every_changes.max(1),
            interval,
            written_at_changes: AtomicU64::new(0),
            last_write: Mutex::new(Instant::now()),
            status: Mutex::new(status),
        }
    }

    /// Counters for `/cache/stats`.
    pub fn status(&self) -> SnapshotStatus {
        self.status
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Loads the snapshot into `memory`, keeping only live entries of `version`. A missing
    /// file is normal; a damaged one is reported (warning, `load_error`) and ignored. Returns
    /// whether other instances were known when it was written.
    pub async fn load(&self, memory: &MemoryStore, keys: &Keyspace, version: &str) -> bool {
        let path = self.path.clone();
        let read = tokio::task::spawn_blocking(move || std::fs::read(path)).await;
        let raw = match read {
            Ok(Ok(raw)) => raw,
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::NotFound => return false,
            Ok(Err(e)) => return self.load_failed(e.to_string()),
            Err(e) => return self.load_failed(e.to_string()),
        };
        let mut contents = match decode(&raw) {
            Ok(c) => c,
            Err(e) => return self.load_failed(e),
        };
        let others_known = contents.others_known;
        let now = crate::domain::policy::now_ms();
        let before = contents.entries.len();
        contents.entries.retain(|(key, expires_at, _)| {
            *expires_at > now && keys.logical(version, key).is_some()
        });
        let loaded = contents.entries.len() as u64;
        let dropped = (before as u64).saturating_sub(loaded);
        memory.import(contents);
        self.written_at_changes
            .store(memory.changes(), Ordering::Relaxed);
        tracing::info!(path = %self.path.display(), loaded, dropped, "memory snapshot loaded");
        let mut status = self.status.lock().unwrap_or_else(|e| e.into_inner());
        status.loaded_entries = loaded;
        status.dropped_entries = dropped;
        others_known
    }

    fn load_failed(&self, reason: String) -> bool {
        tracing::warn!(path = %self.path.display(), reason = %reason, "memory snapshot unusable; starting with an empty memory tier");
        self.status
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .load_error = Some(reason);
        false
    }

    /// Writes a snapshot if enough changed since the last one (or `force` and anything did),
    /// recording whether other instances are known (`others_known`).
    pub async fn maybe_write(&self, memory: &MemoryStore, force: bool, others_known: bool) {
        let changes = memory.changes();
        let pending = changes.saturating_sub(self.written_at_changes.load(Ordering::Relaxed));
        if pending == 0 {
            return;
        }
        let elapsed = self
            .last_write
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .elapsed();
        if !(force || pending >= self.every_changes || elapsed >= self.interval) {
            return;
        }
        let mut contents = memory.export();
        contents.others_known = others_known;
        let count = contents.entries.len();
        let path = self.path.clone();
        let result =
            tokio::task::spawn_blocking(move || write_atomically(&path, &encode(&contents))).await;
        *self.last_write.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
        match result {
            Ok(Ok(())) => {
                self.written_at_changes.store(changes, Ordering::Relaxed);
                self.status
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .written += 1;
                tracing::debug!(path = %self.path.display(), entries = count, "memory snapshot written");
            }
            Ok(Err(e)) => {
                tracing::error!(path = %self.path.display(), error = %e, "cannot write the memory snapshot")
            }
            Err(e) => tracing::error!(error = %e, "snapshot task failed"),
        }
    }

    /// Removes the snapshot: once back on Redis it would only hold entries that missed
    /// later invalidations.
    pub async fn discard(&self) {
        let path = self.path.clone();
        let removed = tokio::task::spawn_blocking(move || std::fs::remove_file(path)).await;
        if let Ok(Ok(())) = removed {
            tracing::info!(path = %self.path.display(), "memory snapshot removed: serving from redis again");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(body: &'static [u8]) -> CacheEntry {
        let source = Source {
            tier: Tier::Memory,
            incarnation: 0,
        };
        CacheEntry::new(
            200,
            "application/json",
            Bytes::from_static(body),
            1,
            Duration::from_secs(60),
            vec![],
            crate::store::Stamp::new(source, vec![1], 0),
        )
    }

    #[test]
    fn snapshots_round_trip_and_detect_damage() {
        let contents = MemoryContents {
            entries: vec![("p:v1:model:metrics:1".into(), 99, entry(b"{\"a\":1}"))],
            gens: vec![("p:_gen:v1:run:1".into(), 3)],
            others_known: true,
        };
        let raw = encode(&contents);
        assert_eq!(decode(&raw).expect("decodes"), contents);
        let mut damaged = raw.to_vec();
        damaged[20] ^= 1;
        assert_eq!(decode(&damaged), Err("checksum mismatch".into()));
        assert!(decode(&raw[..raw.len() - 1]).is_err());
        assert!(decode(b"garbage").is_err());
    }

    #[tokio::test]
    async fn loading_drops_expired_entries_and_other_versions() {
        let dir = std::env::temp_dir().join(format!("runcache-snap-{}", uuid::Uuid::new_v4()));
        let path = dir.join("memory.snapshot");
        let far = crate::domain::policy::now_ms() + 60_000;
        let contents = MemoryContents {
            entries: vec![
                ("p:v2:model:metrics:1".into(), far, entry(b"1")),
                ("p:v1:model:metrics:2".into(), far, entry(b"2")),
                ("p:v2:model:metrics:3".into(), 1, entry(b"3")),
            ],
            gens: vec![],
            others_known: false,
        };
        write_atomically(&path, &encode(&contents)).expect("write");
        let memory = MemoryStore::new(1 << 20, 1 << 16, Keyspace::new("p"));
        let snap = Snapshotter::new(path, 10, Duration::from_secs(60));
        snap.load(&memory, &Keyspace::new("p"), "v2").await;
        memory.run_pending_tasks();
        assert_eq!(memory.entry_count(), 1);
        assert_eq!(
            (snap.status().loaded_entries, snap.status().dropped_entries),
            (1, 2)
        );
        let _ = std::fs::remove_dir_all(dir);
    }
}
