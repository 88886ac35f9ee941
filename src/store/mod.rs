//! RocksDB state: the identity graph, the profiles, the dedup set, and the offsets and outbox that tie
//! state to Kafka's transactions (see docs/DESIGN.md).
//!
//! Column families, keys and values (every value starts with a format version byte):
//!
//! | cf            | key                            | value                              |
//! |---------------|--------------------------------|------------------------------------|
//! | `identifiers` | type `\0` value                | node id (u64 BE)                   |
//! | `profiles`    | node id (u64 BE)               | v2 + postcard(Profile)             |
//! | `profile_ids` | public profile id              | node id (u64 BE)                   |
//! | `redirects`   | retired public profile id      | public profile id it moved to      |
//! | `events`      | SHA-256(event_id)[..16]        | write time, ms (i64 BE); dedup set |
//! | `links`       | u16 BE len(a) + a + b          | v2 + postcard(Evidence), merge op  |
//! | `parts`       | type `\0` value                | v2 + postcard(Profile), merge op   |
//! | `meta`        | `next_node`, `checkpoint`      | u64 BE, v2 + postcard(Checkpoint) |
//! | `shards`      | shard (u32 BE) + kind + key    | see src/scaleout/state.rs          |
//! | `meta`        | `changelog/` + shard (u32 BE)  | next changelog offset (i64 BE)     |
//!
//! `a` and `b` in `links` are identifier keys; every link is stored in both directions so that the
//! links of one identifier are one prefix scan. `links` and `parts` have associative merge operators
//! ([`Evidence::join`], [`Profile::absorb`]), so adding evidence or an event's part is a blind write.

mod overlay;

use std::path::Path;
use std::sync::Arc;

use rocksdb::{
    BlockBasedOptions, Cache, ColumnFamilyDescriptor, Options, WriteBatch, WriteOptions, DB,
};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::model::{Identifier, NodeId, ProfileId};
use crate::profile::Profile;
use crate::stitch::Evidence;

pub use overlay::Overlay;

/// The version byte in front of every encoded value: 2 is postcard. Version 1 (bincode, unmaintained per
/// RUSTSEC-2025-0141) is refused with an error saying how to rebuild.
const FORMAT_V2: u8 = 2;
const FORMAT_V1_BINCODE: u8 = 1;
/// Longest redirect chain followed by a lookup.
const MAX_REDIRECT_HOPS: usize = 32;

pub(crate) const CF_IDENTIFIERS: &str = "identifiers";
pub(crate) const CF_PROFILES: &str = "profiles";
pub(crate) const CF_PROFILE_IDS: &str = "profile_ids";
pub(crate) const CF_REDIRECTS: &str = "redirects";
pub(crate) const CF_EVENTS: &str = "events";
pub(crate) const CF_LINKS: &str = "links";
pub(crate) const CF_PARTS: &str = "parts";
pub(crate) const CF_META: &str = "meta";
pub(crate) const CF_SHARDS: &str = "shards";
const CFS: &[&str] = &[
    CF_IDENTIFIERS,
    CF_PROFILES,
    CF_PROFILE_IDS,
    CF_REDIRECTS,
    CF_EVENTS,
    CF_LINKS,
    CF_PARTS,
    CF_META,
    CF_SHARDS,
];

const META_NEXT_NODE: &[u8] = b"next_node";
const META_CHECKPOINT: &[u8] = b"checkpoint";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("rocksdb: {0}")]
    Rocks(#[from] rocksdb::Error),
    #[error("corrupt value in {cf}: {reason}")]
    Corrupt { cf: &'static str, reason: String },
    #[error("cannot encode state: {0}")]
    Encode(#[from] postcard::Error),
    #[error("missing column family {0}")]
    MissingCf(&'static str),
}

/// One record to produce, kept in the checkpoint until its transaction is known to be committed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutRecord {
    pub topic: String,
    /// A fixed partition (the internal topics of scale-out mode); otherwise the key decides. Not stored in
    /// checkpoints: only scale-out mode sets it, and it keeps no outbox.
    #[serde(skip)]
    pub partition: Option<i32>,
    pub key: Option<Vec<u8>>,
    /// `None` is a tombstone.
    pub payload: Option<Vec<u8>>,
    pub headers: Vec<(String, Vec<u8>)>,
}

/// Input position of one partition: the offset of the next message to read.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Position {
    pub topic: String,
    pub partition: i32,
    pub next_offset: i64,
}

/// Written atomically with the state changes of a batch: where the inputs stand after the batch, and the
/// records that the batch's transaction produces. On start-up, if Kafka's committed offsets are behind
/// `positions`, the transaction did not commit and `outbox` is produced again.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    pub sequence: u64,
    pub positions: Vec<Position>,
    pub outbox: Vec<OutRecord>,
}

/// The RocksDB database; cheap to clone and safe to share between the pipeline and lookups.
#[derive(Clone)]
pub struct Store {
    db: Arc<DB>,
}

impl Store {
    /// Opens (or creates) the state with a dedup set kept forever: for tools and tests.
    pub fn open(path: &Path, block_cache_mb: usize) -> Result<Self, StoreError> {
        Self::open_with(path, block_cache_mb, None)
    }

    /// Opens the state; with `dedup_retention`, compactions drop event ids applied longer ago than that
    /// (a duplicate arriving later is applied again), which bounds the dedup set by the event rate.
    pub fn open_with(
        path: &Path,
        block_cache_mb: usize,
        dedup_retention: Option<std::time::Duration>,
    ) -> Result<Self, StoreError> {
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        opts.increase_parallelism(2);
        opts.set_max_background_jobs(2);
        opts.set_bytes_per_sync(1 << 20);
        let cache = Cache::new_lru_cache(block_cache_mb.max(8) << 20);
        let cfs = CFS.iter().map(|name| {
            let mut block = BlockBasedOptions::default();
            block.set_block_cache(&cache);
            block.set_bloom_filter(10.0, false);
            block.set_cache_index_and_filter_blocks(true);
            // Fresh L0 files are read by every lookup: keep their index and filter blocks in the cache.
            block.set_pin_l0_filter_and_index_blocks_in_cache(true);
            if *name == CF_LINKS {
                // Links are read by prefix (all links of one identifier): the bloom filter is built on
                // that prefix, so a scan skips every file that holds none. Every scan opens an iterator on
                // each level's file, which reads its index block: keep those with the table readers (about
                // 1% of the column family) instead of letting data blocks evict them from the cache.
                block.set_whole_key_filtering(false);
                block.set_cache_index_and_filter_blocks(false);
            }
            let mut cf = Options::default();
            cf.set_block_based_table_factory(&block);
            cf.set_compression_type(rocksdb::DBCompressionType::Lz4);
            if *name == CF_EVENTS || *name == CF_IDENTIFIERS {
                // Point lookups only: optimise for them.
                cf.optimize_for_point_lookup(block_cache_mb.max(8) as u64);
            }
            if let (CF_EVENTS, Some(retention)) = (*name, dedup_retention) {
                let retention_ms = i64::try_from(retention.as_millis()).unwrap_or(i64::MAX);
                cf.set_compaction_filter("dedup_retention", move |_level, _key, value| {
                    if dedup_expired(value, crate::model::now_millis(), retention_ms) {
                        rocksdb::CompactionDecision::Remove
                    } else {
                        rocksdb::CompactionDecision::Keep
                    }
                });
            }
            if *name == CF_LINKS {
                cf.set_merge_operator_associative("evidence_join", merge_evidence);
                cf.set_prefix_extractor(rocksdb::SliceTransform::create(
                    "link_prefix",
                    link_prefix_of,
                    Some(has_link_prefix),
                ));
                cf.set_memtable_prefix_bloom_ratio(0.05);
            }
            if *name == CF_PARTS {
                cf.set_merge_operator_associative("profile_absorb", merge_parts);
            }
            ColumnFamilyDescriptor::new(*name, cf)
        });
        let db = DB::open_cf_descriptors(&opts, path, cfs)?;
        Ok(Self { db: Arc::new(db) })
    }

    pub(crate) fn cf(&self, name: &'static str) -> Result<&rocksdb::ColumnFamily, StoreError> {
        self.db.cf_handle(name).ok_or(StoreError::MissingCf(name))
    }

    pub fn node_of(&self, id: &Identifier) -> Result<Option<NodeId>, StoreError> {
        self.db
            .get_pinned_cf(self.cf(CF_IDENTIFIERS)?, identifier_key(id))?
            .map(|v| decode_node(&v))
            .transpose()
    }

    pub fn profile(&self, node: NodeId) -> Result<Option<Profile>, StoreError> {
        self.db
            .get_pinned_cf(self.cf(CF_PROFILES)?, node.0.to_be_bytes())?
            .map(|v| decode_profile(&v))
            .transpose()
    }

    pub fn node_of_profile_id(&self, id: &ProfileId) -> Result<Option<NodeId>, StoreError> {
        self.db
            .get_pinned_cf(self.cf(CF_PROFILE_IDS)?, id.as_str())?
            .map(|v| decode_node(&v))
            .transpose()
    }

    pub fn redirect_of(&self, id: &ProfileId) -> Result<Option<ProfileId>, StoreError> {
        Ok(self
            .db
            .get_cf(self.cf(CF_REDIRECTS)?, id.as_str())?
            .map(|v| ProfileId(String::from_utf8_lossy(&v).into_owned())))
    }

    /// The identifiers linked to `id`, with the evidence of each link.
    pub fn links(&self, id: &Identifier) -> Result<Vec<(Identifier, Evidence)>, StoreError> {
        let prefix = link_prefix(id);
        let mut out = Vec::new();
        let mut ro = rocksdb::ReadOptions::default();
        ro.set_prefix_same_as_start(true);
        for item in self.db.iterator_cf_opt(
            self.cf(CF_LINKS)?,
            ro,
            rocksdb::IteratorMode::From(&prefix, rocksdb::Direction::Forward),
        ) {
            let (k, v) = item?;
            let Some(other) = k.strip_prefix(prefix.as_slice()) else {
                break;
            };
            out.push((decode_identifier(other)?, decode_evidence(&v)?));
        }
        Ok(out)
    }

    /// What the events anchored on `id` contributed.
    pub fn part(&self, id: &Identifier) -> Result<Option<Profile>, StoreError> {
        self.db
            .get_pinned_cf(self.cf(CF_PARTS)?, identifier_key(id))?
            .map(|v| decode_profile(&v))
            .transpose()
    }

    pub fn has_event(&self, event_id: &str) -> Result<bool, StoreError> {
        Ok(self
            .db
            .get_pinned_cf(self.cf(CF_EVENTS)?, event_key(event_id))?
            .is_some())
    }

    pub fn next_node(&self) -> Result<u64, StoreError> {
        Ok(match self.db.get_cf(self.cf(CF_META)?, META_NEXT_NODE)? {
            Some(v) => decode_node(&v)?.0,
            None => 1,
        })
    }

    pub fn checkpoint(&self) -> Result<Option<Checkpoint>, StoreError> {
        self.db
            .get_cf(self.cf(CF_META)?, META_CHECKPOINT)?
            .map(|v| decode_value(&v, CF_META, "checkpoint"))
            .transpose()
    }

    /// Adds the checkpoint to a batch.
    pub fn put_checkpoint(
        &self,
        batch: &mut WriteBatch,
        cp: &Checkpoint,
    ) -> Result<(), StoreError> {
        batch.put_cf(self.cf(CF_META)?, META_CHECKPOINT, encode_value(cp, 256)?);
        Ok(())
    }

    /// Writes a batch atomically and durably (WAL synced): the state must be on disk before the Kafka
    /// transaction that depends on it commits.
    pub fn write(&self, batch: WriteBatch) -> Result<(), StoreError> {
        let mut opts = WriteOptions::default();
        opts.set_sync(true);
        self.db.write_opt(batch, &opts)?;
        Ok(())
    }

    /// A fresh overlay for one batch of changes.
    pub fn overlay(&self) -> Result<Overlay<'_>, StoreError> {
        Overlay::new(self)
    }

    /// Resolves a public id, following redirects of merged profiles. Returns the id it resolved to.
    pub fn resolve_profile_id(
        &self,
        id: &ProfileId,
    ) -> Result<Option<(ProfileId, NodeId)>, StoreError> {
        follow_redirects(id, |p| self.node_of_profile_id(p), |p| self.redirect_of(p))
    }

    /// Every live profile, for exports and reports. Reads a consistent snapshot.
    pub fn for_each_profile(&self, mut f: impl FnMut(NodeId, Profile)) -> Result<(), StoreError> {
        let snapshot = self.db.snapshot();
        let mut ro = rocksdb::ReadOptions::default();
        ro.set_snapshot(&snapshot);
        for item in self
            .db
            .iterator_cf_opt(self.cf(CF_PROFILES)?, ro, rocksdb::IteratorMode::Start)
        {
            let (k, v) = item?;
            f(decode_node(&k)?, decode_profile(&v)?);
        }
        Ok(())
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

    pub(crate) fn db(&self) -> &DB {
        &self.db
    }

    /// A value of the sharded state (scale-out mode).
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

    /// Where this instance's copy of a shard stands in the shard's changelog: the next offset to apply.
    pub fn changelog_position(&self, shard: u32) -> Result<Option<i64>, StoreError> {
        Ok(self
            .db
            .get_cf(self.cf(CF_META)?, changelog_meta_key(shard))?
            .and_then(|v| <[u8; 8]>::try_from(v.as_slice()).ok())
            .map(i64::from_be_bytes))
    }

    /// Adds sharded-state changes (`None` deletes) and changelog positions to a batch.
    pub fn put_shard_changes<'a>(
        &self,
        batch: &mut WriteBatch,
        changes: impl IntoIterator<Item = (&'a [u8], Option<&'a [u8]>)>,
        positions: impl IntoIterator<Item = (u32, i64)>,
    ) -> Result<(), StoreError> {
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
        Ok(())
    }

    /// Forgets this instance's copy of a shard (before restoring it from the start of its changelog).
    /// A range deletion is written only if the shard holds something: every later read of the memtable
    /// and files that hold a range tombstone pays for it (measured: half the CPU of a sharded instance
    /// that had wiped its empty shards at start-up).
    pub fn wipe_shard(&self, shard: u32) -> Result<(), StoreError> {
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
    let mut k = Vec::with_capacity(id.kind.len() + id.value.len() + 1);
    k.extend_from_slice(id.kind.as_bytes());
    k.push(0);
    k.extend_from_slice(id.value.as_bytes());
    k
}

pub(crate) fn decode_identifier(k: &[u8]) -> Result<Identifier, StoreError> {
    let text = std::str::from_utf8(k).map_err(|_| StoreError::Corrupt {
        cf: CF_LINKS,
        reason: "identifier key is not UTF-8".into(),
    })?;
    let (kind, value) = text.split_once('\0').ok_or_else(|| StoreError::Corrupt {
        cf: CF_LINKS,
        reason: "identifier key without a type".into(),
    })?;
    Ok(Identifier::new(kind, value))
}

/// The `links` prefix extractor: the first identifier's length and key.
fn link_prefix_of(key: &[u8]) -> &[u8] {
    match key {
        [a, b, rest @ ..] => {
            let len = usize::from(u16::from_be_bytes([*a, *b]));
            &key[..(2 + len).min(2 + rest.len())]
        }
        _ => key,
    }
}

fn has_link_prefix(key: &[u8]) -> bool {
    match key {
        [a, b, rest @ ..] => rest.len() >= usize::from(u16::from_be_bytes([*a, *b])),
        _ => false,
    }
}

/// Prefix of every link of `id`: the length of its key, then the key.
pub(crate) fn link_prefix(id: &Identifier) -> Vec<u8> {
    let key = identifier_key(id);
    let len = u16::try_from(key.len()).unwrap_or(u16::MAX);
    let mut k = Vec::with_capacity(key.len() + 2);
    k.extend_from_slice(&len.to_be_bytes());
    k.extend_from_slice(&key);
    k
}

pub(crate) fn link_key(a: &Identifier, b: &Identifier) -> Vec<u8> {
    let mut k = link_prefix(a);
    k.extend_from_slice(&identifier_key(b));
    k
}

/// A value with its format version byte in front.
pub(crate) fn encode_value<T: Serialize>(
    value: &T,
    capacity: usize,
) -> Result<Vec<u8>, StoreError> {
    let mut v = Vec::with_capacity(capacity);
    v.push(FORMAT_V2);
    Ok(postcard::to_extend(value, v)?)
}

pub(crate) fn decode_value<T: serde::de::DeserializeOwned>(
    v: &[u8],
    cf: &'static str,
    what: &str,
) -> Result<T, StoreError> {
    match v.split_first() {
        Some((&FORMAT_V2, rest)) => Ok(postcard::from_bytes(rest)?),
        Some((&FORMAT_V1_BINCODE, _)) => Err(StoreError::Corrupt {
            cf,
            reason: format!(
                "{what} written by stitcher 0.1 (format 1, bincode); this version reads format 2: start \
                 with an empty state directory and let it replay the input topics (README \"Upgrading\")"
            ),
        }),
        _ => Err(StoreError::Corrupt {
            cf,
            reason: format!("unknown {what} format"),
        }),
    }
}

pub(crate) fn encode_evidence(e: &Evidence) -> Result<Vec<u8>, StoreError> {
    encode_value(e, 64)
}

pub(crate) fn decode_evidence(v: &[u8]) -> Result<Evidence, StoreError> {
    decode_value(v, CF_LINKS, "evidence")
}

/// Folds a stored value and merge operands with `join`. `None` (a corrupt input) fails the read.
fn fold_operands<T>(
    existing: Option<&[u8]>,
    operands: &rocksdb::MergeOperands,
    decode: fn(&[u8]) -> Result<T, StoreError>,
    join: fn(&mut T, T),
    encode: fn(&T) -> Result<Vec<u8>, StoreError>,
) -> Option<Vec<u8>> {
    let mut acc: Option<T> = match existing {
        Some(v) => Some(decode(v).ok()?),
        None => None,
    };
    for op in operands {
        let more = decode(op).ok()?;
        match &mut acc {
            Some(a) => join(a, more),
            None => acc = Some(more),
        }
    }
    encode(&acc?).ok()
}

/// The `links` merge operator: joins the evidence of all operands.
fn merge_evidence(
    _key: &[u8],
    existing: Option<&[u8]>,
    operands: &rocksdb::MergeOperands,
) -> Option<Vec<u8>> {
    fold_operands(
        existing,
        operands,
        decode_evidence,
        |a, b| a.join(&b),
        encode_evidence,
    )
}

/// The `parts` merge operator: absorbs every operand (parts join like profiles).
fn merge_parts(
    _key: &[u8],
    existing: Option<&[u8]>,
    operands: &rocksdb::MergeOperands,
) -> Option<Vec<u8>> {
    fold_operands(
        existing,
        operands,
        decode_profile,
        Profile::absorb,
        encode_profile,
    )
}

/// Whether a dedup entry written at the time in `value` is older than the retention. Entries without a
/// time are kept.
fn dedup_expired(value: &[u8], now_ms: i64, retention_ms: i64) -> bool {
    match <[u8; 8]>::try_from(value) {
        Ok(bytes) => now_ms.saturating_sub(i64::from_be_bytes(bytes)) > retention_ms,
        Err(_) => false,
    }
}

pub(crate) fn event_key(event_id: &str) -> [u8; 16] {
    let digest = Sha256::digest(event_id.as_bytes());
    let mut k = [0u8; 16];
    k.copy_from_slice(&digest[..16]);
    k
}

pub(crate) fn decode_node(v: &[u8]) -> Result<NodeId, StoreError> {
    let bytes: [u8; 8] = v.try_into().map_err(|_| StoreError::Corrupt {
        cf: CF_IDENTIFIERS,
        reason: format!("node id of {} bytes", v.len()),
    })?;
    Ok(NodeId(u64::from_be_bytes(bytes)))
}

pub(crate) fn encode_profile(p: &Profile) -> Result<Vec<u8>, StoreError> {
    encode_value(p, 512)
}

pub(crate) fn decode_profile(v: &[u8]) -> Result<Profile, StoreError> {
    decode_value(v, CF_PROFILES, "profile")
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
        Self::with_dedup_retention(None)
    }

    /// A temporary store whose compactions drop event ids older than `retention`.
    pub fn with_dedup_retention(
        retention: Option<std::time::Duration>,
    ) -> Result<Self, StoreError> {
        let path = std::env::temp_dir().join(format!(
            "stitcher-{}-{}",
            std::process::id(),
            rand::random::<u64>()
        ));
        let store = Store::open_with(&path, 64, retention)?;
        Ok(Self {
            store,
            _dir: tempfile_dir::TempDir(path),
        })
    }

    pub fn path(&self) -> &Path {
        &self._dir.0
    }
}

impl Store {
    /// Retired ids that redirect directly to `id` (a scan of the redirects column family).
    pub fn redirects_to(&self, id: &ProfileId) -> Result<Vec<ProfileId>, StoreError> {
        let mut out = Vec::new();
        for item in self
            .db
            .iterator_cf(self.cf(CF_REDIRECTS)?, rocksdb::IteratorMode::Start)
        {
            let (k, v) = item?;
            if v.as_ref() == id.as_str().as_bytes() {
                out.push(ProfileId(String::from_utf8_lossy(&k).into_owned()));
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Values are postcard behind version byte 2; state of format 1 (bincode) is refused, saying how to
    /// rebuild.
    #[test]
    fn values_round_trip_and_old_formats_are_refused() {
        let cp = Checkpoint {
            sequence: 7,
            positions: vec![Position {
                topic: "t".into(),
                partition: 2,
                next_offset: 99,
            }],
            outbox: vec![],
        };
        let v = encode_value(&cp, 16).unwrap();
        assert_eq!(v[0], FORMAT_V2);
        let back: Checkpoint = decode_value(&v, CF_META, "checkpoint").unwrap();
        assert_eq!(back.sequence, 7);
        assert_eq!(back.positions[0].next_offset, 99);
        let mut old = v.clone();
        old[0] = FORMAT_V1_BINCODE;
        let err = decode_value::<Checkpoint>(&old, CF_META, "checkpoint").unwrap_err();
        assert!(err.to_string().contains("format 1"), "{err}");
    }

    #[test]
    fn compaction_drops_event_ids_older_than_the_retention() {
        let t =
            TempStore::with_dedup_retention(Some(std::time::Duration::from_secs(3600))).unwrap();
        let db = t.store.db();
        let cf = t.store.cf(CF_EVENTS).unwrap();
        let now = crate::model::now_millis();
        db.put_cf(cf, event_key("old"), (now - 2 * 3_600_000).to_be_bytes())
            .unwrap();
        db.put_cf(cf, event_key("fresh"), (now - 60_000).to_be_bytes())
            .unwrap();
        db.put_cf(cf, event_key("timeless"), []).unwrap();
        db.flush_cf(cf).unwrap();
        db.compact_range_cf(cf, None::<&[u8]>, None::<&[u8]>);
        assert!(!t.store.has_event("old").unwrap());
        assert!(t.store.has_event("fresh").unwrap());
        assert!(t.store.has_event("timeless").unwrap());
        assert!(dedup_expired(&0i64.to_be_bytes(), 10, 5));
        assert!(!dedup_expired(&8i64.to_be_bytes(), 10, 5));
    }
}
