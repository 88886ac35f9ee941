//! RocksDB state: the local copy of the shards this instance holds (column family `shards`, keys and values
//! in src/scaleout/state.rs), and where each copy stands in its changelog (column family `meta`). Every
//! value starts with a format version byte.
//!
//! | cf       | key                            | value                                        |
//! |----------|--------------------------------|----------------------------------------------|
//! | `shards` | shard (u32 BE) + kind + key    | see src/scaleout/state.rs                    |
//! | `meta`   | `changelog/` + shard (u32 BE)  | next changelog offset to apply (i64 BE)      |
//! | `meta`   | `shards`                       | the shard count the state was made with (u32 BE) |
//!
//! A state directory of stitcher 0.3 and earlier in its one-instance mode has other column families
//! (`identifiers`, `profiles`, ...) and a `checkpoint` in `meta`: it is opened only to be recognised and
//! refused ([`Store::has_former_state`]).

use std::ops::ControlFlow;
use std::path::Path;
use std::sync::{Arc, PoisonError, RwLock};

use rocksdb::{
    BlockBasedOptions, Cache, ColumnFamilyDescriptor, Env, Options, WriteBatch, WriteOptions, DB,
};
use serde::{Deserialize, Serialize};

use crate::model::{Identifier, NodeId, ProfileId};

/// The version byte in front of every encoded value: 3 is postcard with profiles that hold a story
/// (src/profile/story.rs) and events with attributes. Version 2 (postcard without them) and version 1
/// (bincode, unmaintained per RUSTSEC-2025-0141) are recognised only to be refused with what to do.
const FORMAT_V3: u8 = 3;
const FORMAT_V2: u8 = 2;
const FORMAT_V1_BINCODE: u8 = 1;
/// Most redirects followed from a retired profile id.
const MAX_REDIRECT_HOPS: usize = 32;

pub(crate) const CF_META: &str = "meta";
pub(crate) const CF_SHARDS: &str = "shards";
/// The column families this version writes; any other one found is opened as it is.
const CFS: &[&str] = &[CF_META, CF_SHARDS];
/// Column families of the former one-instance mode.
const FORMER_CFS: &[&str] = &[
    "identifiers",
    "profiles",
    "profile_ids",
    "redirects",
    "events",
    "links",
    "parts",
];

const META_CHECKPOINT: &[u8] = b"checkpoint";
const META_SHARDS: &[u8] = b"shards";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("rocksdb: {0}")]
    Rocks(rocksdb::Error),
    #[error("corrupt value in {cf}: {reason}")]
    Corrupt { cf: &'static str, reason: String },
    #[error("cannot encode state: {0}")]
    Encode(postcard::Error),
    #[error("missing column family {0}")]
    MissingCf(&'static str),
}

error_from!(StoreError {
    rocksdb::Error => Rocks,
    postcard::Error => Encode,
});

/// One record to produce in a batch's transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutRecord {
    pub topic: String,
    /// A fixed partition (the internal topics); otherwise the key decides.
    pub partition: Option<i32>,
    pub key: Option<Vec<u8>>,
    /// `None` is a tombstone.
    pub payload: Option<Vec<u8>>,
    pub headers: Vec<(String, Vec<u8>)>,
}

/// A record to produce, borrowed from where it was made: a batch's changelog is sent from its changes
/// without copying every key and value into an [`OutRecord`] first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordRef<'a> {
    pub topic: &'a str,
    /// A fixed partition (the internal topics); otherwise the key decides.
    pub partition: Option<i32>,
    pub key: Option<&'a [u8]>,
    /// `None` is a tombstone.
    pub payload: Option<&'a [u8]>,
    pub headers: &'a [(String, Vec<u8>)],
}

impl OutRecord {
    pub fn borrowed(&self) -> RecordRef<'_> {
        RecordRef {
            topic: &self.topic,
            partition: self.partition,
            key: self.key.as_deref(),
            payload: self.payload.as_deref(),
            headers: &self.headers,
        }
    }
}

/// Input position of one partition: the offset of the next message to read.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Position {
    pub topic: String,
    pub partition: i32,
    pub next_offset: i64,
}

/// The RocksDB database; cheap to clone and safe to share between the pipeline and lookups.
#[derive(Clone)]
pub struct Store {
    db: Arc<DB>,
    /// Per shard, whether a key with a given prefix exists, as last looked up ([`Store::has_prefix`]).
    prefixes: Arc<std::sync::Mutex<std::collections::HashMap<Vec<u8>, bool>>>,
    /// Held exclusively while a write lands, key by key (`unordered_write`), and shared by the readers that
    /// must see every write whole ([`Store::settled`]).
    landing: Arc<RwLock<()>>,
}

thread_local! {
    /// Whether this thread is inside [`Store::settled`].
    static SETTLED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Marks the thread inside [`Store::settled`] until dropped (a panic included).
struct Settled;

impl Settled {
    fn enter() -> Self {
        SETTLED.set(true);
        Settled
    }
}

impl Drop for Settled {
    fn drop(&mut self) {
        SETTLED.set(false);
    }
}

/// What a data block takes in the block cache, about (RocksDB's default block size of 4 KiB and its
/// bookkeeping): the clock cache sizes its table by it.
const BLOCK_CHARGE: usize = 4 << 10;

/// Stops RocksDB's per-operation counting on the calling thread. Its perf context counts every key
/// comparison, block read and memtable probe unless a thread turns it off (the default level counts), in
/// a thread-local whose every touch goes through a TLS initialiser: 2% of the service's instructions,
/// for counts nothing reads. A batch's reads ([`ShardOverlay`](crate::scaleout::state::ShardOverlay))
/// and its write call it first: a thread-local store, once per batch.
pub fn uncounted() {
    rocksdb::perf::set_perf_stats(rocksdb::perf::PerfStatsLevel::Disable);
}

impl Store {
    /// Opens (or creates) the state.
    pub fn open(path: &Path, block_cache_mb: usize) -> Result<Self, StoreError> {
        let mut opts = Options::default();
        // Flushes and compactions run at the lowest CPU priority (nice 19): on a core they share with the
        // batch thread they take what it leaves, instead of stalling a batch for a flush's hundreds of
        // milliseconds; should they fall behind, RocksDB's write stall holds the batch thread back until
        // they catch up (docs/DESIGN.md, "Background work yields"). Applied by each background thread
        // at its next job; process-wide (the default environment), and the service opens one store.
        let mut env = Env::new()?;
        env.lower_thread_pool_cpu_priority();
        env.lower_high_priority_thread_pool_cpu_priority();
        opts.set_env(&env);
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        opts.increase_parallelism(2);
        opts.set_max_background_jobs(2);
        opts.set_bytes_per_sync(1 << 20);
        // The WAL holds only the synced writes (the shard count, a shard wiped): after a crash it is
        // recovered up to its first damaged record, a consistent prefix.
        opts.set_wal_recovery_mode(rocksdb::DBRecoveryMode::PointInTime);
        // The shard changes are written without the WAL (`write_shard_changes`): what a crash takes from the
        // memtables is what the column families held since their last flush, and they are flushed together,
        // so the state and the changelog positions in `meta` are lost together, never one without the other.
        opts.set_atomic_flush(true);
        // A write's keys go into the memtable as concurrent inserts, which follow the batch's own hint (its
        // keys are sorted) instead of searching the skip list from its top for each: the write lands key
        // by key, which only readers under `settled` are shielded from (docs/DESIGN.md, "A write lands key
        // by key").
        opts.set_unordered_write(true);
        // A clock cache: a lookup is a few atomic operations on an open-addressed table, where the LRU
        // cache took a shard's mutex and moved the entry in its list (every point read looks up a block).
        let cache = Cache::new_hyper_clock_cache(block_cache_mb.max(8) << 20, BLOCK_CHARGE);
        let mut names: Vec<String> = CFS.iter().map(|c| c.to_string()).collect();
        // A former state's column families must be opened too (RocksDB opens all or none).
        if let Ok(existing) = DB::list_cf(&opts, path) {
            names.extend(
                existing
                    .into_iter()
                    .filter(|c| c != "default" && !CFS.contains(&c.as_str())),
            );
        }
        let cfs = names.into_iter().map(|name| {
            let mut block = BlockBasedOptions::default();
            block.set_block_cache(&cache);
            block.set_bloom_filter(10.0, false);
            // Filters and indexes held by the table readers, whole: a point read (most are for absent
            // keys) probes each file's filter directly, without a block-cache lookup or a partition
            // index search per file.
            block.set_cache_index_and_filter_blocks(false);
            // Point reads within a data block by hash rather than binary search.
            block.set_data_block_index_type(rocksdb::DataBlockIndexType::BinaryAndHash);
            block.set_data_block_hash_ratio(0.75);
            let mut cf = Options::default();
            cf.set_block_based_table_factory(&block);
            // About half of the point reads are for absent keys (new identifiers' directory entries,
            // event ids): a bloom filter over the memtable's keys answers them without its skip list.
            cf.set_memtable_whole_key_filtering(true);
            cf.set_memtable_prefix_bloom_ratio(0.1);
            cf.set_compression_type(rocksdb::DBCompressionType::Lz4);
            // The memtables keep RocksDB's default size (64 MiB). On the one core of the pinned bench, 16
            // MiB made the batch's write cheaper and its flushes and compactions dearer by more, and 128
            // MiB the other way round: both slower (docs/BENCHMARKS.md, forty-seventh session).
            ColumnFamilyDescriptor::new(name, cf)
        });
        let db = DB::open_cf_descriptors(&opts, path, cfs)?;
        Ok(Self {
            db: Arc::new(db),
            prefixes: Default::default(),
            landing: Default::default(),
        })
    }

    pub(crate) fn cf(&self, name: &'static str) -> Result<&rocksdb::ColumnFamily, StoreError> {
        self.db.cf_handle(name).ok_or(StoreError::MissingCf(name))
    }

    /// Whether this is the state directory of the former one-instance mode (stitcher 0.3 and earlier).
    pub fn has_former_state(&self) -> Result<bool, StoreError> {
        Ok(FORMER_CFS.iter().any(|c| self.db.cf_handle(c).is_some())
            || self
                .db
                .get_cf(self.cf(CF_META)?, META_CHECKPOINT)?
                .is_some())
    }

    /// Writes a batch atomically and durably (WAL synced).
    fn write(&self, batch: WriteBatch) -> Result<(), StoreError> {
        let mut opts = WriteOptions::default();
        opts.set_sync(true);
        self.land(batch, &opts)
    }

    /// Writes a batch, shutting out the readers under [`Store::settled`] while its keys land.
    fn land(&self, batch: WriteBatch, opts: &WriteOptions) -> Result<(), StoreError> {
        let _landing = self.landing.write().unwrap_or_else(PoisonError::into_inner);
        self.db.write_opt(batch, opts)?;
        Ok(())
    }

    /// Runs `f` while no write is landing: its reads see each write whole or not at all, and a snapshot
    /// taken in it stays immutable. RocksDB inserts a write's keys one by one after publishing them
    /// (`unordered_write`); the pipeline never reads a key while it lands (it reads its pending layer
    /// first), but lookups and scans would see a batch half written.
    pub fn settled<R>(&self, f: impl FnOnce() -> R) -> R {
        // Taken once per thread: a second read lock behind a waiting write would wait for ever.
        if SETTLED.get() {
            return f();
        }
        let _settled = self.landing.read().unwrap_or_else(PoisonError::into_inner);
        let _inside = Settled::enter();
        f()
    }

    /// Approximate live data size per column family, in bytes (for the state-size metric and reports).
    pub fn approximate_sizes(&self) -> Vec<(&'static str, u64)> {
        CFS.iter()
            .filter_map(|name| {
                let cf = self.db.cf_handle(name)?;
                let size = self
                    .db
                    .property_int_value_cf(cf, "rocksdb.estimate-live-data-size")
                    .ok()
                    .flatten()?;
                let mem = self
                    .db
                    .property_int_value_cf(cf, "rocksdb.cur-size-all-mem-tables")
                    .ok()
                    .flatten()?;
                Some((*name, size + mem))
            })
            .collect()
    }

    /// RocksDB's memory by part, in bytes: `memtables` (written, not yet flushed), `table_readers` (the
    /// tables' filters and indexes, held outside the block cache and growing with the state) and
    /// `block_cache` (data blocks, at most `state.block_cache_mb`).
    pub fn memory_usage(&self) -> Vec<(&'static str, u64)> {
        let sum = |property: &str| -> u64 {
            CFS.iter()
                .filter_map(|name| {
                    let cf = self.db.cf_handle(name)?;
                    self.db.property_int_value_cf(cf, property).ok().flatten()
                })
                .sum()
        };
        // One cache is shared by every column family: read once.
        let cache = self
            .db
            .cf_handle(CF_SHARDS)
            .and_then(|cf| {
                self.db
                    .property_int_value_cf(cf, "rocksdb.block-cache-usage")
                    .ok()
                    .flatten()
            })
            .unwrap_or(0);
        vec![
            ("memtables", sum("rocksdb.cur-size-all-mem-tables")),
            ("table_readers", sum("rocksdb.estimate-table-readers-mem")),
            ("block_cache", cache),
        ]
    }

    /// A value of the sharded state.
    pub(crate) fn shard_value(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.db.get_cf(self.cf(CF_SHARDS)?, key)?)
    }

    /// Whether the state holds scale-out shards.
    pub fn has_shard_state(&self) -> Result<bool, StoreError> {
        let mut it = self
            .db
            .iterator_cf(self.cf(CF_SHARDS)?, rocksdb::IteratorMode::Start);
        Ok(it.next().transpose()?.is_some())
    }

    /// Whether a key of the sharded state starts with `prefix`: looked up once, then remembered until
    /// [`Store::forget_prefixes`] (a restore) or [`Store::prefix_emptied`] (a sweep that found none left).
    pub(crate) fn has_prefix(&self, prefix: &[u8]) -> Result<bool, StoreError> {
        if let Some(&known) = self
            .prefixes
            .lock()
            .ok()
            .as_ref()
            .and_then(|p| p.get(prefix))
        {
            return Ok(known);
        }
        let mut any = false;
        self.scan_shards(prefix, prefix, 1, |_, _| {
            any = true;
            Ok(ControlFlow::Break(()))
        })?;
        if let Ok(mut p) = self.prefixes.lock() {
            p.insert(prefix.to_vec(), any);
        }
        Ok(any)
    }

    /// A sweep found no key left under `prefix`, and nothing writes one any more.
    pub(crate) fn prefix_emptied(&self, prefix: &[u8]) {
        if let Ok(mut p) = self.prefixes.lock() {
            p.insert(prefix.to_vec(), false);
        }
    }

    /// A restore may have written any key: every prefix is looked up again.
    pub(crate) fn forget_prefixes(&self) {
        if let Ok(mut p) = self.prefixes.lock() {
            p.clear();
        }
    }

    /// Calls `f` with at most `limit` records of the sharded state whose key starts with `prefix`, from
    /// the first key at or after `from`, in key order, from a consistent snapshot, until `f` breaks. The
    /// records are lent where the iterator holds them, not copied.
    pub(crate) fn scan_shards(
        &self,
        prefix: &[u8],
        from: &[u8],
        limit: usize,
        mut f: impl FnMut(&[u8], &[u8]) -> Result<ControlFlow<()>, StoreError>,
    ) -> Result<(), StoreError> {
        let snapshot = self.settled(|| self.db.snapshot());
        let mut ro = rocksdb::ReadOptions::default();
        ro.set_snapshot(&snapshot);
        let mut it = self.db.raw_iterator_cf_opt(self.cf(CF_SHARDS)?, ro);
        it.seek(from);
        for _ in 0..limit {
            let Some((k, v)) = it.item() else { break };
            if !k.starts_with(prefix) || f(k, v)?.is_break() {
                break;
            }
            it.next();
        }
        it.status()?;
        Ok(())
    }

    /// The shards this state directory holds a copy of (restored at least once).
    pub fn local_shards(&self) -> Result<std::collections::BTreeSet<u32>, StoreError> {
        let mut shards = std::collections::BTreeSet::new();
        let prefix = b"changelog/";
        let mode = rocksdb::IteratorMode::From(prefix, rocksdb::Direction::Forward);
        for item in self.db.iterator_cf(self.cf(CF_META)?, mode) {
            let (k, _) = item?;
            let Some(rest) = k.strip_prefix(prefix.as_slice()) else {
                break;
            };
            if let Ok(b) = <[u8; 4]>::try_from(rest) {
                shards.insert(u32::from_be_bytes(b));
            }
        }
        Ok(shards)
    }

    /// How many shards the state was made with (identifiers are placed by hash modulo this number).
    pub fn shard_count(&self) -> Result<Option<u32>, StoreError> {
        Ok(self
            .db
            .get_cf(self.cf(CF_META)?, META_SHARDS)?
            .and_then(|v| <[u8; 4]>::try_from(v.as_slice()).ok())
            .map(u32::from_be_bytes))
    }

    /// Records how many shards the state is made with.
    pub fn put_shard_count(&self, shards: u32) -> Result<(), StoreError> {
        let mut batch = WriteBatch::default();
        batch.put_cf(self.cf(CF_META)?, META_SHARDS, shards.to_be_bytes());
        self.write(batch)
    }

    /// Where this instance's copy of a shard stands in the shard's changelog: the next offset to apply.
    pub fn changelog_position(&self, shard: u32) -> Result<Option<i64>, StoreError> {
        Ok(self
            .db
            .get_cf(self.cf(CF_META)?, changelog_meta_key(shard))?
            .and_then(|v| <[u8; 8]>::try_from(v.as_slice()).ok())
            .map(i64::from_be_bytes))
    }

    /// Writes sharded-state changes (`None` deletes) and the changelog positions they reach, in one write
    /// without the WAL (whole after a crash, and to readers under [`Store::settled`]), as Kafka Streams
    /// writes its stores: the changelog holds every change before it is written here, so a crash of the
    /// process or the machine takes what the memtables held since their last (atomic) flush, positions
    /// included, and leaves the copy behind at the position the flushed state reached; the restore replays
    /// the changelog from there (docs/DESIGN.md, crash table). A replay from an older position over records
    /// already written ends in the same state: each key ends at its last changelog record.
    pub fn write_shard_changes<K: AsRef<[u8]>, V: AsRef<[u8]>>(
        &self,
        changes: impl IntoIterator<Item = (K, Option<V>)>,
        positions: impl IntoIterator<Item = (u32, i64)>,
    ) -> Result<(), StoreError> {
        uncounted();
        // In key order: the memtable's skip list then finds each key's place from the one before (a few
        // levels) rather than from its top (a cache miss per level), most of the write's cost in hash
        // order. Stable, so that of two changes of one key (a changelog replay) the later still wins. A
        // batch's changes come sorted already (for its changelog records too) and are not sorted again.
        let mut changes: Vec<(K, Option<V>)> = changes.into_iter().collect();
        if !changes.is_sorted_by(|a, b| a.0.as_ref() <= b.0.as_ref()) {
            changes.sort_by(|a, b| a.0.as_ref().cmp(b.0.as_ref()));
        }
        let mut batch = WriteBatch::default();
        let cf = self.cf(CF_SHARDS)?;
        for (k, v) in changes {
            match v {
                Some(v) => batch.put_cf(cf, k, v),
                None => batch.delete_cf(cf, k),
            }
        }
        let meta = self.cf(CF_META)?;
        for (shard, next) in positions {
            batch.put_cf(meta, changelog_meta_key(shard), next.to_be_bytes());
        }
        let mut opts = WriteOptions::default();
        opts.disable_wal(true);
        opts.set_memtable_insert_hint_per_batch(true);
        self.land(batch, &opts)
    }

    /// Forgets this instance's copy of a shard (before restoring it from the start of its changelog).
    /// A range deletion is written only if the shard holds something: every later read of the memtable
    /// and files that hold a range tombstone pays for it (measured: half the CPU of a sharded instance
    /// that had wiped its empty shards at start-up).
    pub fn wipe_shard(&self, shard: u32) -> Result<(), StoreError> {
        self.forget_prefixes();
        let mut batch = WriteBatch::default();
        let from = shard.to_be_bytes().to_vec();
        let to = match shard.checked_add(1) {
            Some(next) => next.to_be_bytes().to_vec(),
            None => vec![0xff; 5],
        };
        let cf = self.cf(CF_SHARDS)?;
        let mut first = self.db.raw_iterator_cf(cf);
        first.seek(&from);
        first.status()?;
        if first.key().is_some_and(|k| k < to.as_slice()) {
            batch.delete_range_cf(cf, from, to);
        }
        batch.delete_cf(self.cf(CF_META)?, changelog_meta_key(shard));
        self.write(batch)
    }
}

fn changelog_meta_key(shard: u32) -> Vec<u8> {
    let mut k = b"changelog/".to_vec();
    k.extend_from_slice(&shard.to_be_bytes());
    k
}

/// Follows redirects from `id` to a live profile id (at most [`MAX_REDIRECT_HOPS`]): the live id and its
/// node, or `None` if the chain ends nowhere.
pub fn follow_redirects<E>(
    id: &ProfileId,
    mut live: impl FnMut(&ProfileId) -> Result<Option<NodeId>, E>,
    mut redirect_of: impl FnMut(&ProfileId) -> Result<Option<ProfileId>, E>,
) -> Result<Option<(ProfileId, NodeId)>, E> {
    let mut current = id.clone();
    for _ in 0..MAX_REDIRECT_HOPS {
        if let Some(node) = live(&current)? {
            return Ok(Some((current, node)));
        }
        match redirect_of(&current)? {
            Some(next) => current = next,
            None => return Ok(None),
        }
    }
    Ok(None)
}

pub(crate) fn identifier_key(id: &Identifier) -> Vec<u8> {
    let mut k = Vec::with_capacity(id.key_len());
    id.put_into(&mut k);
    k
}

/// What follows a shard state key's shard and kind: bytes, or an identifier (its state key), written into
/// the key in place, so that a record's key is one allocation, or none (`scaleout::state::ReadKey`).
pub(crate) trait KeyRest {
    /// The bytes, as up to three pieces one after another.
    fn pieces(&self) -> [&[u8]; 3];

    fn key_len(&self) -> usize {
        self.pieces().iter().map(|p| p.len()).sum()
    }

    fn put_into(&self, key: &mut Vec<u8>) {
        for piece in self.pieces() {
            key.extend_from_slice(piece);
        }
    }
}

impl KeyRest for [u8] {
    fn pieces(&self) -> [&[u8]; 3] {
        [self, &[], &[]]
    }
}

impl<const N: usize> KeyRest for [u8; N] {
    fn pieces(&self) -> [&[u8]; 3] {
        [self, &[], &[]]
    }
}

/// Type, NUL, value.
impl KeyRest for Identifier {
    fn pieces(&self) -> [&[u8]; 3] {
        [self.kind.as_bytes(), &[0], self.value.as_bytes()]
    }
}

#[cfg(test)]
pub(crate) fn decode_identifier(k: &[u8]) -> Result<Identifier, StoreError> {
    let text = std::str::from_utf8(k).map_err(|_| StoreError::Corrupt {
        cf: CF_SHARDS,
        reason: "identifier key is not UTF-8".into(),
    })?;
    let (kind, value) = text.split_once('\0').ok_or_else(|| StoreError::Corrupt {
        cf: CF_SHARDS,
        reason: "identifier key without a type".into(),
    })?;
    Ok(Identifier::new(kind, value))
}

/// A value with its format version byte in front.
pub(crate) fn encode_value<T: Serialize>(
    value: &T,
    capacity: usize,
) -> Result<Vec<u8>, StoreError> {
    let mut v = Vec::with_capacity(capacity);
    v.push(FORMAT_V3);
    Ok(postcard::to_extend(value, v)?)
}

pub(crate) fn decode_value<'a, T: serde::Deserialize<'a>>(
    v: &'a [u8],
    cf: &'static str,
    what: &str,
) -> Result<T, StoreError> {
    Ok(postcard::from_bytes(value_body(v, cf, what)?)?)
}

/// A value's encoding without its format version byte, if this version reads that format.
pub(crate) fn value_body<'a>(
    v: &'a [u8],
    cf: &'static str,
    what: &str,
) -> Result<&'a [u8], StoreError> {
    match v.split_first() {
        Some((&FORMAT_V3, rest)) => Ok(rest),
        Some((&old @ (FORMAT_V1_BINCODE | FORMAT_V2), _)) => Err(StoreError::Corrupt {
            cf,
            reason: format!(
                "{what} written in state format {old} by an earlier stitcher; this version reads format 3: \
                 start with an empty state directory and let it replay the input topics (README \"Upgrading\")"
            ),
        }),
        _ => Err(StoreError::Corrupt {
            cf,
            reason: format!("unknown {what} format"),
        }),
    }
}

/// A RocksDB store in a temporary directory, removed on drop. For tests and benches.
pub struct TempStore {
    pub store: Store,
    _dir: tempfile_dir::TempDir,
}

mod tempfile_dir {
    /// A directory under the system temp dir, removed on drop.
    pub struct TempDir(pub std::path::PathBuf);
    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

impl TempStore {
    pub fn new() -> Result<Self, StoreError> {
        Self::with_block_cache(64)
    }

    /// With a block cache of `block_cache_mb` MiB (`state.block_cache_mb`).
    pub fn with_block_cache(block_cache_mb: usize) -> Result<Self, StoreError> {
        let path = std::env::temp_dir().join(format!(
            "stitcher-{}-{}",
            std::process::id(),
            rand::random::<u64>()
        ));
        let store = Store::open(&path, block_cache_mb)?;
        Ok(Self {
            store,
            _dir: tempfile_dir::TempDir(path),
        })
    }

    pub fn path(&self) -> &Path {
        &self._dir.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    /// Values are postcard behind version byte 3; state of formats 1 (bincode) and 2 is refused, saying
    /// how to rebuild.
    #[test]
    fn values_round_trip_and_old_formats_are_refused() {
        let p = Position {
            topic: "t".into(),
            partition: 2,
            next_offset: 99,
        };
        let v = encode_value(&p, 16).unwrap();
        assert_eq!(v[0], FORMAT_V3);
        let back: Position = decode_value(&v, CF_META, "position").unwrap();
        assert_eq!(back, p);
        for version in [FORMAT_V1_BINCODE, FORMAT_V2] {
            let mut old = v.clone();
            old[0] = version;
            let err = decode_value::<Position>(&old, CF_META, "position").unwrap_err();
            assert!(
                err.to_string().contains(&format!("format {version}")),
                "{err}"
            );
        }
    }

    /// RocksDB's flushes and compactions run at nice 19, so that on a core shared with the batch thread
    /// they take what it leaves. A background thread lowers itself when it takes a job: after a flush
    /// (the high-priority pool) and a compaction (the low one), each pool has a thread that did.
    #[test]
    fn background_work_runs_at_the_lowest_cpu_priority() {
        let t = TempStore::new().unwrap();
        let cf = t.store.cf(CF_SHARDS).unwrap();
        for round in 0..2u8 {
            let changes = (0..100u8).map(|i| (vec![round, i], Some(vec![i])));
            t.store.write_shard_changes(changes, []).unwrap();
            t.store.db.flush_cf(cf).unwrap();
        }
        t.store
            .db
            .compact_range_cf(cf, None::<&[u8]>, None::<&[u8]>);
        let nice_of = |pool: &str| -> Vec<i64> {
            std::fs::read_dir("/proc/self/task")
                .unwrap()
                .flatten()
                .filter(|task| {
                    std::fs::read_to_string(task.path().join("comm"))
                        .unwrap_or_default()
                        .trim_end()
                        == pool
                })
                .filter_map(|task| {
                    let stat = std::fs::read_to_string(task.path().join("stat")).ok()?;
                    // After the name: state, ppid, ..., priority (15), nice (16).
                    let fields: Vec<&str> = stat[stat.rfind(')')? + 2..].split(' ').collect();
                    fields.get(16)?.parse().ok()
                })
                .collect()
        };
        for pool in ["rocksdb:high", "rocksdb:low"] {
            let nice = nice_of(pool);
            assert!(nice.contains(&19), "{pool} threads' nice values: {nice:?}");
        }
    }

    /// A write lands key by key (`unordered_write`): a reader under `settled` still sees each batch whole,
    /// in its point reads and in a scan's snapshot, while batches land on another thread. Without the lock
    /// the reads catch batches half landed.
    #[test]
    fn a_write_lands_whole_for_settled_readers() {
        const BATCHES: u64 = 150;
        const FILL: usize = 2000;
        let t = TempStore::new().unwrap();
        let (first, last) = (b"x/0".to_vec(), b"x/9".to_vec());
        let batch = |n: u64| {
            let v = n.to_be_bytes().to_vec();
            let fill = (0..FILL).map(|i| format!("x/5{i:05}").into_bytes());
            std::iter::once(first.clone())
                .chain(fill)
                .chain([last.clone()])
                .map(move |k| (k, Some(v.clone())))
        };
        t.store.write_shard_changes(batch(0), []).unwrap();
        let done = std::sync::atomic::AtomicBool::new(false);
        let value = |v: Option<Vec<u8>>| u64::from_be_bytes(v.unwrap().try_into().unwrap());
        let (reads, seen) = std::thread::scope(|scope| {
            scope.spawn(|| {
                for n in 1..=BATCHES {
                    t.store.write_shard_changes(batch(n), []).unwrap();
                }
                done.store(true, std::sync::atomic::Ordering::Release);
            });
            let (mut reads, mut seen) = (0, std::collections::BTreeSet::new());
            while !done.load(std::sync::atomic::Ordering::Acquire) {
                let (a, z) = t.store.settled(|| {
                    let a = value(t.store.shard_value(&first).unwrap());
                    let z = value(t.store.shard_value(&last).unwrap());
                    (a, z)
                });
                assert_eq!(a, z, "point reads of one batch's first and last keys");
                let mut scanned = Vec::new();
                t.store
                    .scan_shards(b"x/", b"x/", usize::MAX, |_, v| {
                        scanned.push(value(Some(v.to_vec())));
                        Ok(ControlFlow::Continue(()))
                    })
                    .unwrap();
                assert_eq!(scanned.len(), FILL + 2);
                assert!(
                    scanned.iter().all(|v| *v == scanned[0]),
                    "a scan's snapshot holds one batch"
                );
                reads += 1;
                seen.insert(a);
            }
            (reads, seen)
        });
        // The reads overlapped the writes: they saw batches come and go.
        assert!(seen.len() > 5, "{reads} reads saw only batches {seen:?}");
    }

    /// A reader under `settled` that scans (which settles too) does not wait for a write that waits for
    /// it: the thread's second `settled` takes no second read lock.
    #[test]
    fn settled_nests_while_a_write_waits() {
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::{mpsc, Barrier};
        let t = Arc::new(TempStore::new().unwrap());
        let entered = Arc::new(Barrier::new(2));
        let written = Arc::new(AtomicBool::new(false));
        let writer = {
            let (t, entered, written) = (t.clone(), entered.clone(), written.clone());
            std::thread::spawn(move || {
                entered.wait();
                t.store
                    .write_shard_changes([(b"k".to_vec(), Some(b"v".to_vec()))], [])
                    .unwrap();
                written.store(true, Ordering::Release);
            })
        };
        let (done, finished) = mpsc::channel();
        {
            let (t, written) = (t.clone(), written.clone());
            // Not joined if it hangs: the test fails on the timeout below instead.
            std::thread::spawn(move || {
                t.store.settled(|| {
                    entered.wait();
                    // Time for the write to queue behind this reader.
                    std::thread::sleep(std::time::Duration::from_millis(50));
                    assert!(!written.load(Ordering::Acquire), "the write waits");
                    t.store
                        .scan_shards(b"k", b"k", 1, |_, _| Ok(ControlFlow::Break(())))
                        .unwrap();
                });
                done.send(()).unwrap();
            });
        }
        finished
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("a nested settled read hung behind a waiting write");
        writer.join().unwrap();
        assert!(written.load(Ordering::Acquire));
    }

    /// A state directory of the former one-instance mode is recognised (to be refused at start).
    #[test]
    fn a_former_state_directory_is_recognised() {
        let t = TempStore::new().unwrap();
        assert!(!t.store.has_former_state().unwrap());
        let path = t.path().to_path_buf();
        drop(t.store);
        {
            let mut opts = Options::default();
            opts.create_missing_column_families(true);
            let db = DB::open_cf(&opts, &path, ["meta", "shards", "identifiers"]).unwrap();
            drop(db);
        }
        let store = Store::open(&path, 8).unwrap();
        assert!(store.has_former_state().unwrap());
    }

    /// A scan reads from `from`, within `prefix`, at most `limit` records, and no further than the record
    /// at which its caller breaks (the dedup sweep stops at the first batch of ids not expired).
    #[test]
    fn a_scan_stops_at_its_prefix_its_limit_or_where_its_caller_breaks() {
        let t = TempStore::new().unwrap();
        let keys: Vec<Vec<u8>> = (0u8..6)
            .map(|i| vec![b'a', i])
            .chain([b"b0".to_vec()])
            .collect();
        t.store
            .write_shard_changes(keys.iter().map(|k| (k, Some(&b"v"[..]))), [])
            .unwrap();
        let scan = |from: &[u8], limit: usize, stop_at: Option<u8>| {
            let mut seen = Vec::new();
            t.store
                .scan_shards(b"a", from, limit, |k, v| {
                    assert_eq!(v, b"v");
                    seen.push(k[1]);
                    Ok(if Some(k[1]) == stop_at {
                        ControlFlow::Break(())
                    } else {
                        ControlFlow::Continue(())
                    })
                })
                .unwrap();
            seen
        };
        assert_eq!(scan(b"a", usize::MAX, None), [0, 1, 2, 3, 4, 5]);
        assert_eq!(scan(&[b'a', 2], usize::MAX, None), [2, 3, 4, 5]);
        assert_eq!(scan(b"a", 3, None), [0, 1, 2]);
        assert_eq!(scan(b"a", usize::MAX, Some(1)), [0, 1]);
        assert!(t.store.has_prefix(b"b").unwrap());
        assert!(!t.store.has_prefix(b"c").unwrap());
    }

    #[test]
    fn shard_changes_are_written_in_any_order_and_the_later_change_of_a_key_wins() {
        let t = TempStore::new().unwrap();
        let changes: Vec<(&[u8], Option<&[u8]>)> = vec![
            (b"0003", Some(b"c")),
            (b"0001", Some(b"a")),
            (b"0002", Some(b"first")),
            (b"0002", Some(b"second")),
            (b"0001", None),
        ];
        t.store.write_shard_changes(changes, [(0, 5)]).unwrap();
        assert_eq!(t.store.shard_value(b"0001").unwrap(), None);
        assert_eq!(
            t.store.shard_value(b"0002").unwrap().as_deref(),
            Some(&b"second"[..])
        );
        assert_eq!(
            t.store.shard_value(b"0003").unwrap().as_deref(),
            Some(&b"c"[..])
        );
        assert_eq!(t.store.changelog_position(0).unwrap(), Some(5));
        // In order already (a batch's changes; a replay's by chance), two changes of a key included: the
        // later still wins.
        let sorted: Vec<(&[u8], Option<&[u8]>)> = vec![
            (b"0004", Some(b"first")),
            (b"0004", Some(b"second")),
            (b"0005", Some(b"e")),
        ];
        t.store.write_shard_changes(sorted, [(0, 8)]).unwrap();
        assert_eq!(
            t.store.shard_value(b"0004").unwrap().as_deref(),
            Some(&b"second"[..])
        );
        let memory: BTreeMap<_, _> = t.store.memory_usage().into_iter().collect();
        assert_eq!(
            memory.keys().copied().collect::<Vec<_>>(),
            ["block_cache", "memtables", "table_readers"]
        );
        assert!(memory["memtables"] > 0, "{memory:?}");
    }

    /// Shard changes go without the WAL: a process that dies loses what it wrote since the last flush,
    /// changelog positions and state together (the column families flush atomically), and keeps what was
    /// flushed; a store closed cleanly flushes first. The writer is this test run again as a child process
    /// that aborts without closing the store.
    #[test]
    fn a_crash_loses_unflushed_shard_changes_with_their_positions_and_a_close_keeps_them() {
        const CHILD: &str = "STITCHER_TEST_STORE_CRASH";
        let write = |store: &Store, key: &[u8], position: i64| {
            store
                .write_shard_changes([(key, Some(b"v".as_slice()))], [(0, position)])
                .unwrap()
        };
        if let Some(path) = std::env::var_os(CHILD) {
            let store = Store::open(Path::new(&path), 8).unwrap();
            write(&store, b"0001", 1);
            let cfs = [store.cf(CF_META).unwrap(), store.cf(CF_SHARDS).unwrap()];
            store
                .db
                .flush_cfs_opt(&cfs, &rocksdb::FlushOptions::default())
                .unwrap();
            write(&store, b"0002", 2);
            std::process::abort();
        }
        let dir = TempStore::new().unwrap();
        let path = dir.path().join("crashed");
        let status = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "store::tests::a_crash_loses_unflushed_shard_changes_with_their_positions_and_a_close_keeps_them",
                "--nocapture",
            ])
            .env(CHILD, &path)
            .status()
            .unwrap();
        assert!(!status.success(), "the child aborts");
        let store = Store::open(&path, 8).unwrap();
        assert_eq!(store.changelog_position(0).unwrap(), Some(1));
        assert!(store.shard_value(b"0001").unwrap().is_some());
        assert_eq!(store.shard_value(b"0002").unwrap(), None);

        write(&store, b"0002", 2);
        drop(store);
        let store = Store::open(&path, 8).unwrap();
        assert_eq!(store.changelog_position(0).unwrap(), Some(2));
        assert!(store.shard_value(b"0002").unwrap().is_some());
    }
}
