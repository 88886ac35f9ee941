//! Sharded state: each shard's part of the identity graph (the components it owns, in the classic
//! [`GraphStore`] shape) and its protocol tables, as key-value records in RocksDB (column family
//! `shards`). A batch writes through an overlay whose changes are also the shard's changelog records.
//!
//! | key: shard (u32 BE), kind, rest   | value (v2 + postcard)                                        |
//! |-----------------------------------|--------------------------------------------------------------|
//! | `n` identifier key                | `NodeId`: the node of an identifier this shard owns; local only |
//! | `P` node (u64 BE)                 | `Profile`                                                     |
//! | `l` identifier key                | links: `[(Identifier, Evidence)]`                             |
//! | `t` identifier key                | the identifier's part (`Profile`)                             |
//! | `i` profile id                    | `NodeId`: the live profile with this public id; local only   |
//! | `R` profile id                    | `ProfileId`: where a retired id redirects                      |
//! | `F` profile id                    | `[ProfileId]`: the retired ids redirecting to it; local only  |
//! | `N`                               | the next node number                                          |
//! | `d` identifier key                | directory entry of an identifier homed here (`Dir`)           |
//! | `g` identifier key                | how many times an identifier owned here was placed            |
//! | `m` identifier key                | where an identifier that left this shard went (`Moved`)       |
//! | `M` profile id                    | where a profile id that left this shard went (shard)          |
//! | `f` SHA-256(event id)[..16]       | when an event homed here was seen (ms, i64 BE); local only    |
//! | `E` when (i64 BE), first id       | the ids of a batch's `f` records (16 bytes each): their changelog record |
//! | `e` SHA-256(event id)[..16]       | when an event was seen, as versions before kept it (swept, not written) |
//! | `w` event id                      | an event applied here once its components arrive (`Pending`) |
//! | `W` identifier key                | the events pending here that located the identifier          |
//! | `k` identifier key                | messages about an identifier in flight to here, parked until it arrives |
//! | `K` event id                      | fetches parked behind a pending event of higher priority     |
//! | `s` HMAC(salt, identifier key)    | a suppressed identifier homed here: when (ms, i64)           |
//! | `C`                               | the shard count the changelog was written with (u32)          |
//!
//! A batch's changes go to partition `shard` of the changelog topic (same key and value; a delete is a
//! tombstone; `f` records travel packed in their `E` record, and the node, index and redirect-list
//! records are left out, see [`Restore`]) inside the batch's transaction. The local copy is written only
//! after that transaction committed, with the changelog offsets it reached, so it is never ahead of the
//! changelog: a crash in between leaves it behind, and the restore on start-up catches up
//! (docs/DESIGN.md, "Scale-out").

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ops::ControlFlow;
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde::Serialize;
use sha2::{Digest, Sha256};

use super::ShardId;
use crate::model::{Event, Identifier, NodeId, ProfileId};
use crate::profile::{Enrichment, Profile, ProfileHead, Seal};
use crate::stitch::graph::{add_evidence, remove_evidence, LinkValue};
use crate::stitch::{Evidence, GraphStore};
use crate::store::{
    decode_value, encode_value, identifier_key, value_body, KeyRest, Store, StoreError, CF_SHARDS,
};

pub(crate) const NODE: u8 = b'n';
pub(crate) const PROFILE: u8 = b'P';
const LINKS: u8 = b'l';
const PART: u8 = b't';
pub(crate) const INDEX: u8 = b'i';
pub(crate) const REDIRECT: u8 = b'R';
pub(crate) const REDIRECTED_FROM: u8 = b'F';
const NEXT_NODE: u8 = b'N';
pub(crate) const DIR: u8 = b'd';
pub(crate) const GEN: u8 = b'g';
const MOVED: u8 = b'm';
pub(crate) const MOVED_PROFILE: u8 = b'M';
/// Event ids as versions before kept them, one changelog record each.
const SEEN_LEGACY: u8 = b'e';
const SEEN: u8 = b'f';
const SEEN_BATCH: u8 = b'E';
/// Ids per `E` record: 64 KiB of them.
const IDS_PER_RECORD: usize = 4096;
const ID_LEN: usize = 16;
pub(crate) const PENDING: u8 = b'w';
pub(crate) const WAITING: u8 = b'W';
pub(crate) const PARKED: u8 = b'k';
pub(crate) const PARKED_BEHIND: u8 = b'K';
const SUPPRESSED: u8 = b's';
/// The shard count, one record per shard: a restore refuses a changelog written with another count.
const SHARD_COUNT: u8 = b'C';

/// The placement count of an identifier's first placement anywhere (its home had no directory entry,
/// `Absent(0)`): the count that an identifier in a graph without a `GEN` record has.
pub(crate) const FIRST_PLACEMENT: u32 = 1;

/// The key of an identifier on the suppression list: HMAC-SHA-256 of its state key under the salt
/// (`STITCHER_SUPPRESSION_SALT`), so the list never holds the identifier.
pub fn suppression_hash(salt: &crate::config::HashKey, id: &Identifier) -> [u8; 32] {
    crate::normalize::hmac_sha256(&salt.0, &identifier_key(id))
}

/// Kinds of the parent-pointer protocol of stitcher 0.2's scale-out mode, which this version refuses.
const FORMER_KINDS: [u8; 2] = [b'p', b'r'];

/// What every state key starts with: its shard (u32 BE) and its kind.
fn key_head(shard: ShardId, kind: u8) -> [u8; 5] {
    let [a, b, c, d] = shard.to_be_bytes();
    [a, b, c, d, kind]
}

pub(crate) fn key(shard: ShardId, kind: u8, rest: &(impl KeyRest + ?Sized)) -> Vec<u8> {
    let mut k = Vec::with_capacity(5 + rest.key_len());
    k.extend_from_slice(&key_head(shard, kind));
    rest.put_into(&mut k);
    k
}

/// A state key for a read: on the stack when it fits, as nearly every key does (a shard, a kind and an
/// identifier of a few dozen bytes), so that a read the batch answers copies nothing to the heap. The
/// overlay copies it on a miss, to keep what it found.
pub(crate) enum ReadKey {
    Inline(u8, [u8; READ_KEY_INLINE]),
    Heap(Vec<u8>),
}

const READ_KEY_INLINE: usize = 95;

impl ReadKey {
    pub(crate) fn new(shard: ShardId, kind: u8, rest: &(impl KeyRest + ?Sized)) -> Self {
        let len = 5 + rest.key_len();
        if len > READ_KEY_INLINE {
            return ReadKey::Heap(key(shard, kind, rest));
        }
        let mut buf = [0; READ_KEY_INLINE];
        buf[..5].copy_from_slice(&key_head(shard, kind));
        let mut at = 5;
        for piece in rest.pieces() {
            buf[at..at + piece.len()].copy_from_slice(piece);
            at += piece.len();
        }
        // `len` is at most READ_KEY_INLINE, under 256.
        ReadKey::Inline(len as u8, buf)
    }
}

impl std::ops::Deref for ReadKey {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match self {
            ReadKey::Inline(len, buf) => &buf[..usize::from(*len)],
            ReadKey::Heap(k) => k,
        }
    }
}

/// The shard a state key belongs to.
pub fn shard_of_key(key: &[u8]) -> Option<ShardId> {
    Some(ShardId::from_be_bytes(key.get(..4)?.try_into().ok()?))
}

/// A changelog record of the former scale-out protocol: the state must be rebuilt, not read.
pub fn refuse_former_format(key: &[u8]) -> Result<(), StoreError> {
    match key.get(4) {
        Some(kind) if FORMER_KINDS.contains(kind) => Err(StoreError::Corrupt {
            cf: CF_SHARDS,
            reason: "shard state of the parent-pointer protocol (stitcher 0.2 scale-out mode): this \
                     version keeps components whole at one shard and cannot read it; give \
                     [scaleout] a new topic (its changelog is <topic>-changelog), a new consumer \
                     group and an empty state directory, and let it replay the input topics (README \
                     \"Scale-out\")"
                .into(),
        }),
        _ => Ok(()),
    }
}

/// Why a changelog record (`key`, `value`) read from partition `partition` cannot belong to a state of
/// `shards` shards: its key names another shard, it is the mark of another shard count, or it is the
/// directory entry of an identifier homed at another shard (a changelog written with another shard
/// count, its topics given more partitions to match). `None` if it can (docs/DESIGN.md, "Dedup retention
/// and the shard count").
pub fn misplaced(
    key: &[u8],
    value: Option<&[u8]>,
    partition: i32,
    shards: ShardId,
) -> Option<String> {
    let shard = shard_of_key(key)?;
    if i64::from(shard) != i64::from(partition) {
        return Some(format!("a record of shard {shard}"));
    }
    match (key.get(4), key.get(5..)) {
        (Some(&SHARD_COUNT), _) => {
            let marked: ShardId = decode_value(value?, CF_SHARDS, "shard count").ok()?;
            (marked != shards).then(|| format!("the mark of a changelog of {marked} shards"))
        }
        (Some(&DIR), Some(id)) => {
            let home = super::home_of_key(id, shards);
            (home != shard).then(|| {
                format!(
                    "the directory entry of an identifier that {shards} shards place at shard {home}"
                )
            })
        }
        _ => None,
    }
}

/// Marks `shard`'s changelog with the shard count, `shards`, unless the view holds the mark already: once
/// per shard, in the first batch that changes anything (a restore brings the mark in with the rest).
pub fn mark_shard_count(
    view: &mut impl Kv,
    shard: ShardId,
    shards: ShardId,
) -> Result<(), StoreError> {
    let key = key(shard, SHARD_COUNT, b"");
    if !view.contains(&key)? {
        view.set(key, Some(encode_value(&shards, 8)?));
    }
    Ok(())
}

/// Reads of sharded state.
pub trait KvRead {
    /// Calls `f` with the value of `key` where it lies, without copying it (a read decodes the value; most
    /// reads are of the batch's own writes or of what it read before).
    fn read_with<R>(&self, key: &[u8], f: impl FnOnce(Option<&[u8]>) -> R)
        -> Result<R, StoreError>;

    /// A copy of the value (the service reads through [`KvRead::read_with`]).
    #[cfg(test)]
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.read_with(key, |v| v.map(<[u8]>::to_vec))
    }

    fn contains(&self, key: &[u8]) -> Result<bool, StoreError> {
        self.read_with(key, |v| v.is_some())
    }

    /// Calls `f` with the profile (a `PROFILE` or `PART` record) under `key`, decoded.
    fn with_profile<R>(
        &self,
        key: &[u8],
        f: impl FnOnce(Option<&Profile>) -> R,
    ) -> Result<R, StoreError> {
        Ok(f(decode_profile(self, key)?.as_ref()))
    }

    /// The profile under `key`, for the caller to keep.
    fn profile(&self, key: &[u8]) -> Result<Option<Profile>, StoreError> {
        decode_profile(self, key)
    }

    /// The seal of the profile under `key`, decoded from the head of the record only.
    fn seal(&self, key: &[u8]) -> Result<Option<Seal>, StoreError> {
        let head: Option<ProfileHead> = decode_record(self, key)?;
        Ok(head.as_ref().map(ProfileHead::seal))
    }
}

/// The record under `key`, decoded where it lies (its kind, named in errors, from the key).
fn decode_record<T: DeserializeOwned, K: KvRead + ?Sized>(
    kv: &K,
    key: &[u8],
) -> Result<Option<T>, StoreError> {
    let kind = record_kind(key);
    kv.read_with(key, |v| {
        v.map(|v| decode_value(v, CF_SHARDS, kind)).transpose()
    })?
}

fn decode_profile<K: KvRead + ?Sized>(kv: &K, key: &[u8]) -> Result<Option<Profile>, StoreError> {
    decode_record(kv, key)
}

/// A text of an encoded record, borrowed without checking that it is UTF-8: postcard encodes a `String`
/// and bytes alike (length, then the bytes), and compares as `String` does (byte by byte). For records
/// edited without decoding what the edit does not read (`ShardView::add_links`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Raw<'a>(&'a [u8]);

/// An `Identifier` (kind, value) borrowed from an encoded record.
type RawIdentifier<'a> = (Raw<'a>, Raw<'a>);

impl Serialize for Raw<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(self.0)
    }
}

impl<'de: 'a, 'a> serde::Deserialize<'de> for Raw<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        <&'a [u8]>::deserialize(d).map(Raw)
    }
}

fn raw_identifier(id: &Identifier) -> RawIdentifier<'_> {
    (Raw(id.kind.as_bytes()), Raw(id.value.as_bytes()))
}

/// A link of an encoded links record: its evidence borrowed, and the bytes of the link (identifier and
/// evidence) as they were read, until an event adds to it.
struct ReadLink<'a> {
    evidence: Evidence<Raw<'a>>,
    read: Option<&'a [u8]>,
}

impl<'a> LinkValue<Raw<'a>> for ReadLink<'a> {
    fn of(evidence: &Evidence<Raw<'a>>) -> Self {
        Self {
            evidence: evidence.clone(),
            read: None,
        }
    }

    fn join(&mut self, evidence: &Evidence<Raw<'a>>) {
        self.evidence.join(evidence);
        self.read = None;
    }
}

/// A links record's links, borrowed from it, each with its bytes.
fn read_links(v: &[u8]) -> Result<Vec<(RawIdentifier<'_>, ReadLink<'_>)>, StoreError> {
    let (n, mut rest): (usize, &[u8]) =
        postcard::take_from_bytes(value_body(v, CF_SHARDS, kind_name(LINKS))?)?;
    // A link takes at least a byte per field: a corrupt count cannot ask for more room than that.
    let mut links = Vec::with_capacity(n.min(rest.len()) + 1);
    for _ in 0..n {
        let ((id, evidence), after): ((RawIdentifier, Evidence<Raw>), &[u8]) =
            postcard::take_from_bytes(rest)?;
        let read = Some(&rest[..rest.len() - after.len()]);
        links.push((id, ReadLink { evidence, read }));
        rest = after;
    }
    Ok(links)
}

/// The links record of `links`, as `encode_value` writes the owned list: the count, then each link,
/// copied where it is unchanged since it was read.
fn write_links(
    links: &[(RawIdentifier<'_>, ReadLink<'_>)],
    capacity: usize,
) -> Result<Vec<u8>, StoreError> {
    let mut v = encode_value(&links.len(), capacity)?;
    for (id, link) in links {
        match link.read {
            Some(read) => v.extend_from_slice(read),
            None => v = postcard::to_extend(&(id, &link.evidence), v)?,
        }
    }
    Ok(v)
}

/// Reads and writes of sharded state.
pub trait Kv: KvRead {
    /// Sets (`Some`) or deletes (`None`) a key.
    fn set(&mut self, key: Vec<u8>, value: Option<Vec<u8>>);

    /// Tells the view that `key` holds nothing, which the protocol knows without reading it: a later read
    /// is answered without asking the store (most point reads are for absent keys, each a bloom filter
    /// probe per level of RocksDB).
    fn known_absent(&mut self, key: Vec<u8>);

    /// Whether any key starts with `prefix` (the event ids a version before wrote, while any are left).
    fn has_prefix(&self, prefix: &[u8]) -> Result<bool, StoreError>;

    /// Takes the profile under `key` out of the state: it is deleted unless the caller puts it back.
    fn take_profile(&mut self, key: &[u8]) -> Result<Option<Box<Profile>>, StoreError> {
        let p = decode_profile(self, key)?;
        if p.is_some() {
            self.set(key.to_vec(), None);
        }
        Ok(p.map(Box::new))
    }

    /// Sets (`Some`) or deletes (`None`) a profile (a `PROFILE` or `PART` record).
    fn set_profile(
        &mut self,
        key: Vec<u8>,
        profile: Option<Box<Profile>>,
    ) -> Result<(), StoreError> {
        let v = profile.as_deref().map(encode_profile).transpose()?;
        self.set(key, v);
        Ok(())
    }
}

/// Committed state: what lookups read.
impl KvRead for Store {
    fn read_with<R>(
        &self,
        key: &[u8],
        f: impl FnOnce(Option<&[u8]>) -> R,
    ) -> Result<R, StoreError> {
        Ok(f(self.shard_value(key)?.as_deref()))
    }
}

/// State in memory: the simulation's.
impl KvRead for BTreeMap<Vec<u8>, Vec<u8>> {
    fn read_with<R>(
        &self,
        key: &[u8],
        f: impl FnOnce(Option<&[u8]>) -> R,
    ) -> Result<R, StoreError> {
        Ok(f(BTreeMap::get(self, key).map(Vec::as_slice)))
    }
}

impl Kv for BTreeMap<Vec<u8>, Vec<u8>> {
    fn set(&mut self, key: Vec<u8>, value: Option<Vec<u8>>) {
        match value {
            Some(v) => self.insert(key, v),
            None => self.remove(&key),
        };
    }

    /// The simulation checks the protocol's claim.
    fn known_absent(&mut self, key: Vec<u8>) {
        debug_assert!(
            !self.contains_key(&key),
            "a record claimed absent is there: {}",
            String::from_utf8_lossy(&key)
        );
    }

    fn has_prefix(&self, prefix: &[u8]) -> Result<bool, StoreError> {
        Ok(self
            .range(prefix.to_vec()..)
            .next()
            .is_some_and(|(k, _)| k.starts_with(prefix)))
    }
}

/// A batch's state changes (`None`: deleted), hashed: the batch after it reads them at every read that
/// its own writes do not answer (docs/DESIGN.md, "Overlapped commits").
pub type Changes = HashMap<Vec<u8>, Option<Vec<u8>>, foldhash::fast::RandomState>;

/// One batch's view of the sharded state: reads see the batch's own writes. What a read found in the
/// store is kept for the batch (a protocol step reads the same records several times: an identifier's
/// node, its directory entry), and so is what it did not find: a record the batch created and deleted
/// again (a pending event, a reservation) leaves no tombstone in the changelog or the store.
///
/// Under it, before the store, may lie the changes of the batch before, committing while this one is
/// handled and not yet written to the store (docs/DESIGN.md, "Overlapped commits").
pub struct ShardOverlay<'s> {
    store: &'s Store,
    pending: Option<Arc<Changes>>,
    /// What the batch knows of each key it touched: its writes, what its reads found below, and the
    /// profiles decoded. One map, hashed (a tree of a batch's keys cost a dozen key comparisons per
    /// lookup), so that a read looks a key up once; what changes the store becomes the batch's
    /// [`Changes`].
    slots: RefCell<HashMap<Vec<u8>, Slot, foldhash::fast::RandomState>>,
}

/// One key as the batch knows it.
#[derive(Default)]
struct Slot {
    /// The key's current value (`None`: absent), unless `unencoded`.
    bytes: Option<Vec<u8>>,
    /// The batch wrote the key; else `bytes` is what a read found below (the pending batch, the store).
    written: bool,
    /// The batch's first look found nothing below: deleting the key then changes nothing.
    absent_below: bool,
    /// The current value decoded, for a profile or part the batch read whole or put: an event reads its
    /// profile several times (the seal at each step, the whole of it to change it, again for the output)
    /// and its part once to join into it. A write of the key's bytes drops it.
    profile: Option<Box<Profile>>,
    /// The value is `profile`, not encoded yet: a profile put several times in a batch (four in ten are,
    /// by the events of one visit) is encoded once, when the batch's changes are taken.
    unencoded: bool,
}

impl Slot {
    /// What the batch's first look at a key found below it.
    fn below(bytes: Option<Vec<u8>>) -> Self {
        Slot {
            absent_below: bytes.is_none(),
            bytes,
            ..Slot::default()
        }
    }

    /// Whether the batch wrote a value that changes the store: a deletion of a record its first look
    /// found absent does not.
    fn is_change(&self) -> bool {
        self.written && (self.unencoded || self.bytes.is_some() || !self.absent_below)
    }

    /// The value as the changes carry it, if it is one.
    fn into_change(self, key: &[u8]) -> Result<Option<Option<Vec<u8>>>, StoreError> {
        if !self.is_change() {
            return Ok(None);
        }
        if self.unencoded {
            let p = self.profile.as_deref().ok_or_else(|| unencoded_lost(key))?;
            return Ok(Some(Some(encode_profile(p)?)));
        }
        Ok(Some(self.bytes))
    }

    fn set(&mut self, value: Option<Vec<u8>>) {
        self.bytes = value;
        self.written = true;
        self.profile = None;
        self.unencoded = false;
    }

    /// Writes the profile as the key's value, to be encoded when the batch's changes are taken.
    fn put_profile(&mut self, p: Box<Profile>) {
        self.bytes = None;
        self.written = true;
        self.profile = Some(p);
        self.unencoded = true;
    }

    /// Debug builds check that a kept profile is the decoding of the key's current value (which it is by
    /// definition while it is not encoded).
    fn check_kept(&self, key: &[u8], kept: &Profile) {
        if cfg!(debug_assertions) && !self.unencoded {
            let current: Option<Result<Profile, _>> = self
                .bytes
                .as_deref()
                .map(|v| decode_value(v, CF_SHARDS, record_kind(key)));
            debug_assert!(
                matches!(&current, Some(Ok(p)) if p == kept),
                "the kept profile of {} is not its current value",
                String::from_utf8_lossy(key)
            );
        }
    }
}

impl<'s> ShardOverlay<'s> {
    pub fn new(store: &'s Store) -> Self {
        Self::over(store, None)
    }

    /// An overlay over `pending`, the changes of a batch not yet written to `store`.
    pub fn over(store: &'s Store, pending: Option<Arc<Changes>>) -> Self {
        crate::store::uncounted();
        Self {
            store,
            pending,
            slots: RefCell::new(HashMap::default()),
        }
    }

    /// Room for `keys` keys from the start: a batch's map grows to tens of thousands of keys, and each
    /// doubling hashes every key again. The pipeline gives the size of the batch before.
    pub fn with_capacity(self, keys: usize) -> Self {
        self.slots.borrow_mut().reserve(keys);
        self
    }

    /// How many keys the batch touched (read or wrote).
    pub fn keys(&self) -> usize {
        self.slots.borrow().len()
    }

    /// The committed state under the overlay.
    pub fn store(&self) -> &'s Store {
        self.store
    }

    /// The changes: the batch's changelog records, and what is written to the store once the batch
    /// committed. The profiles put last are encoded here.
    pub fn into_changes(self) -> Result<Changes, StoreError> {
        let slots = self.slots.into_inner();
        let mut changes = Changes::with_capacity_and_hasher(slots.len(), Default::default());
        for (key, slot) in slots {
            if let Some(value) = slot.into_change(&key)? {
                changes.insert(key, value);
            }
        }
        pack_seen(&mut changes);
        Ok(changes)
    }

    pub fn is_empty(&self) -> bool {
        !self.slots.borrow().values().any(Slot::is_change)
    }

    /// Whether a layer above the store (this batch's writes, the pending batch's changes) holds `key`:
    /// then what the store holds for it is not current.
    fn shadows(&self, key: &[u8]) -> bool {
        self.slots.borrow().get(key).is_some_and(|s| s.written)
            || self.pending.as_ref().is_some_and(|p| p.contains_key(key))
    }

    /// The value under the batch: the pending batch's change, or the store's.
    fn below(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        match self.pending.as_ref().and_then(|p| p.get(key)) {
            Some(v) => Ok(v.clone()),
            None => self.store.shard_value(key),
        }
    }
}

/// The profile a slot's bytes encode.
fn decode_slot(key: &[u8], slot: &Slot) -> Result<Option<Profile>, StoreError> {
    slot.bytes
        .as_deref()
        .map(|v| decode_value(v, CF_SHARDS, record_kind(key)))
        .transpose()
}

impl KvRead for ShardOverlay<'_> {
    fn read_with<R>(
        &self,
        key: &[u8],
        f: impl FnOnce(Option<&[u8]>) -> R,
    ) -> Result<R, StoreError> {
        if let Some(slot) = self.slots.borrow().get(key) {
            if slot.unencoded {
                let p = slot.profile.as_deref().ok_or_else(|| unencoded_lost(key))?;
                return Ok(f(Some(&encode_profile(p)?)));
            }
            return Ok(f(slot.bytes.as_deref()));
        }
        let slot = Slot::below(self.below(key)?);
        let r = f(slot.bytes.as_deref());
        self.slots.borrow_mut().insert(key.to_vec(), slot);
        Ok(r)
    }

    fn contains(&self, key: &[u8]) -> Result<bool, StoreError> {
        if let Some(slot) = self.slots.borrow().get(key) {
            return Ok(slot.unencoded || slot.bytes.is_some());
        }
        self.read_with(key, |v| v.is_some())
    }

    /// Decoded once for the batch: the next look at the profile is free. `f` runs inside the borrow of
    /// the batch's map, so it must not read the overlay.
    fn with_profile<R>(
        &self,
        key: &[u8],
        f: impl FnOnce(Option<&Profile>) -> R,
    ) -> Result<R, StoreError> {
        let slots = self.slots.borrow();
        // Decoded from the bytes the batch holds, or from what lies below (a slot to keep, `Some`).
        let (p, below) = match slots.get(key) {
            Some(slot) => match slot.profile.as_deref() {
                Some(p) => {
                    slot.check_kept(key, p);
                    return Ok(f(Some(p)));
                }
                None => (decode_slot(key, slot)?, None),
            },
            None => {
                let slot = Slot::below(self.below(key)?);
                (decode_slot(key, &slot)?, Some(slot))
            }
        };
        drop(slots);
        let r = f(p.as_ref());
        let mut slots = self.slots.borrow_mut();
        match below {
            Some(mut slot) => {
                slot.profile = p.map(Box::new);
                slots.insert(key.to_vec(), slot);
            }
            None => {
                if let (Some(p), Some(slot)) = (p, slots.get_mut(key)) {
                    slot.profile = Some(Box::new(p));
                }
            }
        }
        Ok(r)
    }

    fn profile(&self, key: &[u8]) -> Result<Option<Profile>, StoreError> {
        if let Some(slot) = self.slots.borrow().get(key) {
            if let Some(p) = slot.profile.as_deref() {
                slot.check_kept(key, p);
                return Ok(Some(p.clone()));
            }
        }
        decode_profile(self, key)
    }

    /// From the whole profile, decoded once for the batch: the next look at it is free.
    fn seal(&self, key: &[u8]) -> Result<Option<Seal>, StoreError> {
        self.with_profile(key, |p| p.map(Profile::seal))
    }
}

fn encode_profile(p: &Profile) -> Result<Vec<u8>, StoreError> {
    encode_value(p, 512)
}

/// A key marked unencoded without its profile: a defect of the overlay, not of the data.
fn unencoded_lost(key: &[u8]) -> StoreError {
    StoreError::Corrupt {
        cf: CF_SHARDS,
        reason: format!(
            "the batch's profile under {} was lost before it was encoded",
            String::from_utf8_lossy(key)
        ),
    }
}

impl Kv for ShardOverlay<'_> {
    fn has_prefix(&self, prefix: &[u8]) -> Result<bool, StoreError> {
        self.store.has_prefix(prefix)
    }

    fn set(&mut self, key: Vec<u8>, value: Option<Vec<u8>>) {
        self.slots.get_mut().entry(key).or_default().set(value);
    }

    /// The kept profile moves out, or the record is decoded; either way it is deleted until put back.
    fn take_profile(&mut self, key: &[u8]) -> Result<Option<Box<Profile>>, StoreError> {
        let kept = match self.slots.get_mut().get_mut(key) {
            Some(slot) => match slot.profile.take() {
                Some(p) => {
                    slot.check_kept(key, &p);
                    Some(p)
                }
                None => decode_slot(key, slot)?.map(Box::new),
            },
            None => {
                let slot = Slot::below(self.below(key)?);
                let p = decode_slot(key, &slot)?;
                self.slots.get_mut().insert(key.to_vec(), slot);
                p.map(Box::new)
            }
        };
        if kept.is_some() {
            self.set(key.to_vec(), None);
        }
        Ok(kept)
    }

    /// Encoded when the batch's changes are taken ([`ShardOverlay::into_changes`]), unless its bytes are
    /// read before.
    fn set_profile(
        &mut self,
        key: Vec<u8>,
        profile: Option<Box<Profile>>,
    ) -> Result<(), StoreError> {
        match profile {
            Some(p) => self.slots.get_mut().entry(key).or_default().put_profile(p),
            None => self.set(key, None),
        }
        Ok(())
    }

    fn known_absent(&mut self, key: Vec<u8>) {
        if self.pending.as_ref().is_some_and(|p| p.contains_key(&key)) {
            return;
        }
        self.slots
            .get_mut()
            .entry(key)
            .or_insert_with(|| Slot::below(None));
    }
}

/// Deletes the event ids of `shard` seen before `before` (ms): the `E` records older than that, oldest
/// first, with their `f` records, until about `limit` ids are gone (at least one record); then, while a
/// version before left `e` records, at most `limit` of those from the cursor `from`. The deletions are the
/// batch's (`overlay`): an `E` record's tombstone goes to the changelog, its `f` records are local. Returns
/// where the `e` cursor goes on next time: `None` when it reached their end (or there are none).
pub fn sweep_seen(
    overlay: &mut ShardOverlay<'_>,
    shard: ShardId,
    from: Option<&[u8]>,
    limit: usize,
    before: i64,
) -> Result<Option<Vec<u8>>, StoreError> {
    let batches = key(shard, SEEN_BATCH, &[]);
    let mut expired: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
    let mut ids = 0;
    overlay
        .store()
        .scan_shards(&batches, &batches, limit.max(1), |k, v| {
            // In time order: past the first one not expired, none is. Read no further: every record
            // is kept for the retention (30 days by default), so a scan that went on to `limit` read
            // thousands of whole batches' ids per batch once the service had run a while.
            if ids >= limit || batch_time(k).is_none_or(|t| t >= before) {
                return Ok(ControlFlow::Break(()));
            }
            // A record written or deleted above the store since is not this one.
            if !overlay.shadows(k) {
                ids += v.len() / ID_LEN;
                expired.push((k.to_vec(), v.to_vec()));
            }
            Ok(ControlFlow::Continue(()))
        })?;
    for (k, v) in expired {
        for id in v.chunks_exact(ID_LEN) {
            overlay.set(key(shard, SEEN, id), None);
        }
        overlay.set(k, None);
    }
    sweep_legacy(overlay, shard, from, limit, before)
}

/// The sweep of the `e` records a version before wrote, one changelog tombstone each.
fn sweep_legacy(
    overlay: &mut ShardOverlay<'_>,
    shard: ShardId,
    from: Option<&[u8]>,
    limit: usize,
    before: i64,
) -> Result<Option<Vec<u8>>, StoreError> {
    let prefix = key(shard, SEEN_LEGACY, &[]);
    if !overlay.store().has_prefix(&prefix)? {
        return Ok(None);
    }
    let mut expired = Vec::new();
    let mut last = None;
    let mut scanned = 0;
    let mut left = 0;
    overlay
        .store()
        .scan_shards(&prefix, from.unwrap_or(&prefix), limit, |k, v| {
            scanned += 1;
            // A record written or deleted above the store since is not this one.
            if millis(v).is_some_and(|t| t < before) && !overlay.shadows(k) {
                expired.push(k.to_vec());
            } else {
                left += 1;
            }
            last = Some(k.to_vec());
            Ok(ControlFlow::Continue(()))
        })?;
    if from.is_none() && scanned < limit && left == 0 {
        // A whole pass, and every record it found goes with this batch: nothing writes one any more.
        overlay.store().prefix_emptied(&prefix);
    }
    for k in expired {
        overlay.set(k, None);
    }
    Ok(last.filter(|_| scanned == limit).map(|mut k| {
        k.push(0); // the next key after it
        k
    }))
}

/// The time in an `E` record's key.
fn batch_time(k: &[u8]) -> Option<i64> {
    k.get(5..13).and_then(millis)
}

/// A time in ms, as event-id records hold it (i64 BE).
fn millis(bytes: &[u8]) -> Option<i64> {
    <[u8; 8]>::try_from(bytes).ok().map(i64::from_be_bytes)
}

/// Packs the batch's new `f` records into `E` records, per shard, at most [`IDS_PER_RECORD`] ids each,
/// keyed by the latest time among them and their first id: what the changelog carries of them. Each `f`
/// record is then valued with its `E` record's time, as a restore writes it.
fn pack_seen(changes: &mut Changes) {
    let mut seen: BTreeMap<ShardId, Vec<(Vec<u8>, i64)>> = BTreeMap::new();
    for (k, v) in changes.iter() {
        if let (Some(SEEN), Some(shard), Some(v)) = (k.get(4).copied(), shard_of_key(k), v) {
            let at = millis(v).unwrap_or(0);
            seen.entry(shard).or_default().push((k.clone(), at));
        }
    }
    for (shard, mut ids) in seen {
        ids.sort_unstable();
        for chunk in ids.chunks(IDS_PER_RECORD) {
            let at = chunk.iter().map(|(_, at)| *at).max().unwrap_or(0);
            let mut rest = at.to_be_bytes().to_vec();
            rest.extend_from_slice(&chunk[0].0[5..]);
            let mut value = Vec::with_capacity(chunk.len() * ID_LEN);
            for (f, _) in chunk {
                value.extend_from_slice(&f[5..]);
                changes.insert(f.clone(), Some(at.to_be_bytes().to_vec()));
            }
            changes.insert(key(shard, SEEN_BATCH, rest.as_slice()), Some(value));
        }
    }
}

/// Whether a change stays in the local copy only: an `f` record, which the changelog carries in its `E`
/// record, a node or profile-index record, which a restore derives from the profile records, and the
/// list of ids redirecting to a profile, which it derives from the redirects ([`Restore`]).
pub fn local_only(key: &[u8]) -> bool {
    matches!(key.get(4), Some(&(SEEN | NODE | INDEX | REDIRECTED_FROM)))
}

/// A restore's chunk: the changelog records read and not written to the local copy yet, as the local
/// copy will hold them (each key's last value), with the records derived from them that the changelog
/// does not carry ([`local_only`]): the `f` records of an `E` record (for its tombstone, the deletion of
/// those its last value listed), the node and profile-index records of a profile record, and the lists
/// of ids redirecting to a profile, of the redirects (docs/DESIGN.md, "Indexes derived, not logged").
/// Those records in the changelog of a version before are skipped: the profiles and redirects give them.
#[derive(Default)]
pub struct Restore {
    chunk: Changes,
    /// Changelog records applied since the restore began.
    pub applied: u64,
}

impl Restore {
    /// Applies one changelog record, after every record before it.
    pub fn apply(
        &mut self,
        store: &Store,
        key: Vec<u8>,
        value: Option<Vec<u8>>,
    ) -> Result<(), StoreError> {
        match (key.get(4).copied(), shard_of_key(&key)) {
            (Some(NODE | INDEX | REDIRECTED_FROM), _) => return Ok(()),
            (Some(SEEN_BATCH), Some(shard)) => {
                self.expand_seen(store, shard, &key, value.as_deref())?
            }
            (Some(PROFILE), Some(shard)) => self.derive(store, shard, &key, value.as_deref())?,
            (Some(REDIRECT), Some(shard)) => {
                self.redirected_from(store, shard, &key, value.as_deref())?
            }
            _ => {}
        }
        self.applied += 1;
        self.chunk.insert(key, value);
        Ok(())
    }

    /// Records in the chunk.
    pub fn held(&self) -> usize {
        self.chunk.len()
    }

    /// The chunk, to be written to the local copy; the next one starts empty.
    pub fn take(&mut self) -> Changes {
        std::mem::take(&mut self.chunk)
    }

    /// What `key` holds as of the records applied: the chunk's value, else the local copy's.
    fn current(&self, store: &Store, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        match self.chunk.get(key) {
            Some(v) => Ok(v.clone()),
            None => store.shard_value(key),
        }
    }

    /// The `f` records an `E` record packs, or for its tombstone the deletion of those it listed.
    fn expand_seen(
        &mut self,
        store: &Store,
        shard: ShardId,
        key: &[u8],
        value: Option<&[u8]>,
    ) -> Result<(), StoreError> {
        let at = batch_time(key).unwrap_or(0).to_be_bytes();
        let ids = match value {
            Some(ids) => Some(ids.to_vec()),
            None => self.current(store, key)?,
        };
        for id in ids.iter().flat_map(|ids| ids.chunks_exact(ID_LEN)) {
            self.chunk
                .insert(self::key(shard, SEEN, id), value.map(|_| at.to_vec()));
        }
        Ok(())
    }

    /// The node and index records of a profile record at a node: every identifier of the new profile
    /// and its id name the node; an identifier or id of the profile it replaces that the new one lacks
    /// loses its record if that still names the node.
    fn derive(
        &mut self,
        store: &Store,
        shard: ShardId,
        key: &[u8],
        value: Option<&[u8]>,
    ) -> Result<(), StoreError> {
        let node = profile_node(key)?;
        let head = |v: &[u8]| decode_value::<ProfileHead>(v, CF_SHARDS, "profile");
        let new = value.map(head).transpose()?;
        let new_id = new.as_ref().map(ProfileHead::id);
        if let Some(old) = self.current(store, key)? {
            let old = head(&old)?;
            for x in old.identifiers() {
                if !new.as_ref().is_some_and(|n| n.holds(x)) {
                    self.unname(store, self::key(shard, NODE, x), node)?;
                }
            }
            let id = old.id();
            if new_id.as_ref() != Some(&id) {
                self.unname(store, self::key(shard, INDEX, id.0.as_bytes()), node)?;
            }
        }
        if let (Some(new), Some(id)) = (new, new_id) {
            let named = encode_value(&node, 16)?;
            for x in new.identifiers() {
                self.chunk
                    .insert(self::key(shard, NODE, x), Some(named.clone()));
            }
            self.chunk
                .insert(self::key(shard, INDEX, id.0.as_bytes()), Some(named));
        }
        Ok(())
    }

    /// The lists of ids redirecting to a profile, after a redirect record: its id leaves the list of the
    /// profile it redirected to and joins that of the one it redirects to now, as
    /// [`ShardView::put_redirect`] and [`ShardView::delete_redirect`] keep them.
    fn redirected_from(
        &mut self,
        store: &Store,
        shard: ShardId,
        key: &[u8],
        value: Option<&[u8]>,
    ) -> Result<(), StoreError> {
        let from = ProfileId(String::from_utf8_lossy(&key[5..]).into_owned());
        let target = |v: &[u8]| decode_value::<ProfileId>(v, CF_SHARDS, "redirect");
        if let Some(old) = self.current(store, key)? {
            self.edit_redirected_from(store, shard, &target(&old)?, |ids| {
                ids.retain(|x| *x != from)
            })?;
        }
        if let Some(new) = value {
            self.edit_redirected_from(store, shard, &target(new)?, |ids| ids.push(from.clone()))?;
        }
        Ok(())
    }

    fn edit_redirected_from(
        &mut self,
        store: &Store,
        shard: ShardId,
        to: &ProfileId,
        f: impl FnOnce(&mut Vec<ProfileId>),
    ) -> Result<(), StoreError> {
        let k = self::key(shard, REDIRECTED_FROM, to.0.as_bytes());
        let mut ids: Vec<ProfileId> = match self.current(store, &k)? {
            Some(v) => decode_value(&v, CF_SHARDS, "ids redirecting here")?,
            None => Vec::new(),
        };
        f(&mut ids);
        self.chunk.insert(k, set_value(ids)?);
        Ok(())
    }

    /// Deletes a node or index record if it names `node`.
    fn unname(&mut self, store: &Store, key: Vec<u8>, node: NodeId) -> Result<(), StoreError> {
        let named = match self.current(store, &key)? {
            Some(v) => decode_value::<NodeId>(&v, CF_SHARDS, record_kind(&key))? == node,
            None => false,
        };
        if named {
            self.chunk.insert(key, None);
        }
        Ok(())
    }
}

/// The value of a record that holds a set as a sorted list: `None` (deleted) for an empty set.
fn set_value<T: Ord + Serialize>(mut set: Vec<T>) -> Result<Option<Vec<u8>>, StoreError> {
    set.sort();
    set.dedup();
    (!set.is_empty())
        .then(|| encode_value(&set, 64))
        .transpose()
}

/// The node a profile record's key names.
fn profile_node(key: &[u8]) -> Result<NodeId, StoreError> {
    key.get(5..)
        .and_then(|b| <[u8; 8]>::try_from(b).ok())
        .map(|b| NodeId(u64::from_be_bytes(b)))
        .ok_or_else(|| StoreError::Corrupt {
            cf: CF_SHARDS,
            reason: "a profile key without a node number".into(),
        })
}

/// Every live profile in `shards` of the local copy, with its shard and node, from one snapshot per shard.
pub fn for_each_profile(
    store: &Store,
    shards: &BTreeSet<ShardId>,
    mut f: impl FnMut(ShardId, NodeId, Profile),
) -> Result<(), StoreError> {
    for shard in shards {
        let prefix = key(*shard, PROFILE, &[]);
        store.scan_shards(&prefix, &prefix, usize::MAX, |k, v| {
            f(
                *shard,
                profile_node(k)?,
                decode_value(v, CF_SHARDS, "profile")?,
            );
            Ok(ControlFlow::Continue(()))
        })?;
    }
    Ok(())
}

/// Typed reads of one shard's records.
pub struct ShardRead<'k, K: ?Sized> {
    pub kv: &'k K,
    pub shard: ShardId,
}

impl<K: KvRead + ?Sized> ShardRead<'_, K> {
    fn read<T: DeserializeOwned>(
        &self,
        kind: u8,
        rest: &(impl KeyRest + ?Sized),
    ) -> Result<Option<T>, StoreError> {
        decode_record(self.kv, &ReadKey::new(self.shard, kind, rest))
    }

    pub fn node_of(&self, id: &Identifier) -> Result<Option<NodeId>, StoreError> {
        self.read(NODE, id)
    }

    pub fn profile(&self, node: NodeId) -> Result<Option<Profile>, StoreError> {
        self.kv
            .profile(&ReadKey::new(self.shard, PROFILE, &node.0.to_be_bytes()))
    }

    pub fn with_profile<R>(
        &self,
        node: NodeId,
        f: impl FnOnce(Option<&Profile>) -> R,
    ) -> Result<R, StoreError> {
        self.kv
            .with_profile(&ReadKey::new(self.shard, PROFILE, &node.0.to_be_bytes()), f)
    }

    pub fn seal(&self, node: NodeId) -> Result<Option<Seal>, StoreError> {
        self.kv
            .seal(&ReadKey::new(self.shard, PROFILE, &node.0.to_be_bytes()))
    }

    /// The identifiers of the profile under `node` (none if there is none).
    pub fn identifiers(&self, node: NodeId) -> Result<Vec<Identifier>, StoreError> {
        self.with_profile(node, |p| {
            p.map(|p| p.identifiers.keys().cloned().collect())
                .unwrap_or_default()
        })
    }

    pub fn indexed(&self, id: &ProfileId) -> Result<Option<NodeId>, StoreError> {
        self.read(INDEX, id.0.as_bytes())
    }

    pub fn redirect_of(&self, id: &ProfileId) -> Result<Option<ProfileId>, StoreError> {
        self.read(REDIRECT, id.0.as_bytes())
    }

    pub fn links(&self, id: &Identifier) -> Result<Vec<(Identifier, Evidence)>, StoreError> {
        Ok(self.read(LINKS, id)?.unwrap_or_default())
    }

    pub fn part(&self, id: &Identifier) -> Result<Option<Profile>, StoreError> {
        self.kv.profile(&ReadKey::new(self.shard, PART, id))
    }

    pub fn dir<T: DeserializeOwned>(&self, id: &Identifier) -> Result<Option<T>, StoreError> {
        self.read(DIR, id)
    }

    pub fn moved<T: DeserializeOwned>(&self, id: &Identifier) -> Result<Option<T>, StoreError> {
        self.read(MOVED, id)
    }

    pub fn redirects_to(&self, id: &ProfileId) -> Result<Vec<ProfileId>, StoreError> {
        Ok(self
            .read(REDIRECTED_FROM, id.0.as_bytes())?
            .unwrap_or_default())
    }
}

impl<K: KvRead + ?Sized> crate::inspect::GraphRead for ShardRead<'_, K> {
    fn profile(&self, node: NodeId) -> Result<Option<Profile>, StoreError> {
        ShardRead::profile(self, node)
    }
    fn links(&self, id: &Identifier) -> Result<Vec<(Identifier, Evidence)>, StoreError> {
        ShardRead::links(self, id)
    }
    fn part(&self, id: &Identifier) -> Result<Option<Profile>, StoreError> {
        ShardRead::part(self, id)
    }
    fn redirects_to(&self, id: &ProfileId) -> Result<Vec<ProfileId>, StoreError> {
        ShardRead::redirects_to(self, id)
    }
}

/// What a state record is, by its key: named in errors, and in the bench's tally of the changelog.
pub fn record_kind(key: &[u8]) -> &'static str {
    match key.get(4).copied() {
        Some(kind) => kind_name(kind),
        None => "record",
    }
}

fn kind_name(kind: u8) -> &'static str {
    match kind {
        NODE => "node",
        PROFILE => "profile",
        LINKS => "links",
        PART => "part",
        INDEX => "profile index",
        REDIRECT => "redirect",
        REDIRECTED_FROM => "ids redirecting here",
        NEXT_NODE => "next node",
        DIR => "directory entry",
        GEN => "placement count",
        MOVED | MOVED_PROFILE => "forwarding pointer",
        PENDING => "pending event",
        WAITING => "events waiting on an identifier",
        PARKED | PARKED_BEHIND => "parked messages",
        SUPPRESSED => "suppression",
        SHARD_COUNT => "shard count",
        SEEN | SEEN_LEGACY => "event id",
        SEEN_BATCH => "event ids of a batch",
        _ => "record",
    }
}

/// One shard of a [`Kv`]: the classic graph ([`GraphStore`]) and the protocol's tables.
pub struct ShardView<'k, K: ?Sized> {
    pub kv: &'k mut K,
    pub shard: ShardId,
}

impl<K: Kv + ?Sized> ShardView<'_, K> {
    pub fn read(&self) -> ShardRead<'_, K> {
        ShardRead {
            kv: &*self.kv,
            shard: self.shard,
        }
    }

    pub(crate) fn get<T: DeserializeOwned>(
        &self,
        kind: u8,
        rest: &(impl KeyRest + ?Sized),
    ) -> Result<Option<T>, StoreError> {
        self.read().read(kind, rest)
    }

    /// Writes a record, or deletes it when `value` is `None`.
    pub(crate) fn put<T: Serialize>(
        &mut self,
        kind: u8,
        rest: &(impl KeyRest + ?Sized),
        value: Option<&T>,
    ) -> Result<(), StoreError> {
        let v = value.map(|v| encode_value(v, 64)).transpose()?;
        self.kv.set(key(self.shard, kind, rest), v);
        Ok(())
    }

    /// Takes a profile or part out of the state: it is deleted unless put back.
    fn take_profile(
        &mut self,
        kind: u8,
        rest: &(impl KeyRest + ?Sized),
    ) -> Result<Option<Box<Profile>>, StoreError> {
        self.kv.take_profile(&ReadKey::new(self.shard, kind, rest))
    }

    fn set_profile(
        &mut self,
        kind: u8,
        rest: &(impl KeyRest + ?Sized),
        profile: Option<Box<Profile>>,
    ) -> Result<(), StoreError> {
        self.kv.set_profile(key(self.shard, kind, rest), profile)
    }

    /// An identifier about to be placed for the first time anywhere (located new at gen 1): no shard
    /// holds a record of it yet, so its node, links, part and forwarding pointer are not read from the
    /// store.
    pub fn first_placement(&mut self, id: &Identifier) {
        for kind in [NODE, LINKS, PART, MOVED] {
            self.known_absent(kind, id);
        }
    }

    /// A record the protocol knows is absent: not read from the store ([`Kv::known_absent`]).
    pub(crate) fn known_absent(&mut self, kind: u8, rest: &(impl KeyRest + ?Sized)) {
        self.kv.known_absent(key(self.shard, kind, rest));
    }

    /// Records how many times `id`, now in this shard's graph, was placed. The first placement (most of
    /// them: every new identifier) writes no record: an identifier in the graph without one was placed once.
    pub fn set_gen(&mut self, id: &Identifier, gen: u32) -> Result<(), StoreError> {
        if gen == FIRST_PLACEMENT {
            return Ok(());
        }
        self.put(GEN, id, Some(&gen))
    }

    /// How many times `id`, leaving this shard's graph, was placed; its record goes with it.
    pub fn take_gen(&mut self, id: &Identifier) -> Result<u32, StoreError> {
        match self.get::<u32>(GEN, id)? {
            Some(gen) => {
                self.put::<u32>(GEN, id, None)?;
                Ok(gen)
            }
            None => Ok(FIRST_PLACEMENT),
        }
    }

    pub fn moved<T: DeserializeOwned>(&self, id: &Identifier) -> Result<Option<T>, StoreError> {
        self.read().moved(id)
    }

    pub fn set_moved<T: Serialize>(
        &mut self,
        id: &Identifier,
        moved: Option<&T>,
    ) -> Result<(), StoreError> {
        self.put(MOVED, id, moved)
    }

    /// Removes the forwarding pointer of `id` if there is one (a blind delete would add a changelog
    /// tombstone for every identifier placed).
    pub fn clear_moved<T: Serialize + DeserializeOwned>(
        &mut self,
        id: &Identifier,
    ) -> Result<(), StoreError> {
        if self.moved::<T>(id)?.is_some() {
            self.set_moved::<T>(id, None)?;
        }
        Ok(())
    }

    /// Sets (`Some`) or deletes (`None`) the directory entry of `id`.
    pub fn set_dir<T: Serialize>(
        &mut self,
        id: &Identifier,
        dir: Option<&T>,
    ) -> Result<(), StoreError> {
        self.put(DIR, id, dir)
    }

    /// Whether the identifier with this suppression hash is on this shard's suppression list.
    pub fn suppressed(&self, hash: &[u8; 32]) -> Result<bool, StoreError> {
        self.kv
            .contains(&ReadKey::new(self.shard, SUPPRESSED, hash))
    }

    /// Puts an identifier on the suppression list (at `at`, ms) or, with `None`, takes it off.
    pub fn set_suppressed(&mut self, hash: &[u8; 32], at: Option<i64>) -> Result<(), StoreError> {
        self.put(SUPPRESSED, hash, at.as_ref())
    }

    /// Records the id of an event that entered here at `at` (ms); false if it was seen before.
    pub fn first_seen(&mut self, event_id: &str, at: i64) -> Result<bool, StoreError> {
        let digest = Sha256::digest(event_id.as_bytes());
        let id = &digest[..ID_LEN];
        let k = key(self.shard, SEEN, id);
        if self.kv.contains(&k)? {
            return Ok(false);
        }
        // Ids seen before the upgrade, until the sweep has taken the last of them.
        let legacy = key(self.shard, SEEN_LEGACY, &[]);
        if self.kv.has_prefix(&legacy)?
            && self
                .kv
                .contains(&ReadKey::new(self.shard, SEEN_LEGACY, id))?
        {
            return Ok(false);
        }
        // When it was seen: past `processing.dedup_retention` the record is swept ([`sweep_seen`]).
        self.kv.set(k, Some(at.to_be_bytes().to_vec()));
        Ok(true)
    }

    fn edit_redirected_from(
        &mut self,
        to: &ProfileId,
        f: impl FnOnce(&mut Vec<ProfileId>),
    ) -> Result<(), StoreError> {
        self.edit_set(REDIRECTED_FROM, to.0.as_bytes(), f)
    }

    /// Edits a record that holds a sorted set as a list; an empty set deletes the record.
    pub(crate) fn edit_set<T: Ord + Serialize + DeserializeOwned>(
        &mut self,
        kind: u8,
        rest: &(impl KeyRest + ?Sized),
        f: impl FnOnce(&mut Vec<T>),
    ) -> Result<(), StoreError> {
        let mut set: Vec<T> = self.get(kind, rest)?.unwrap_or_default();
        f(&mut set);
        let value = set_value(set)?;
        self.kv.set(key(self.shard, kind, rest), value);
        Ok(())
    }

    fn edit_links(
        &mut self,
        id: &Identifier,
        f: impl FnOnce(&mut Vec<(Identifier, Evidence)>),
    ) -> Result<(), StoreError> {
        let mut links = self.read().links(id)?;
        f(&mut links);
        let value = (!links.is_empty()).then_some(&links);
        self.put(LINKS, id, value)
    }

    /// Adds `evidence` to the links between every two of `ids`, as `edit_links` with [`add_evidence`]
    /// would for each, with each record's links borrowed from its encoding: most events touch one link of
    /// about ten, and decoding the others into owned strings and encoding them again was most of the edit.
    /// The links the event does not touch are copied as they were read ([`read_links`], [`write_links`]):
    /// an identifier seen with many others (a customer's email with every cookie of every visit) has a
    /// long record, and each event that adds one more link to it re-encoded all of them. Each record
    /// comes out byte for byte as the owned edit writes it (a test checks).
    fn add_links(&mut self, ids: &[Identifier], evidence: &Evidence) -> Result<(), StoreError> {
        let raw: Vec<RawIdentifier> = ids.iter().map(raw_identifier).collect();
        let evidence = evidence.map(|s| Raw(s.as_bytes()));
        for (id, x) in ids.iter().zip(&raw) {
            let key = key(self.shard, LINKS, id);
            let value = self.kv.read_with(&key, |v| {
                let mut links = v.map(read_links).transpose()?.unwrap_or_default();
                add_evidence(&mut links, x, &raw, &evidence);
                (!links.is_empty())
                    .then(|| write_links(&links, v.map_or(64, |v| v.len() + 64)))
                    .transpose()
            })??;
            self.kv.set(key, value);
        }
        Ok(())
    }

    /// Sets an identifier's links wholesale (a component arriving).
    pub fn put_links(
        &mut self,
        id: &Identifier,
        links: &[(Identifier, Evidence)],
    ) -> Result<(), StoreError> {
        let value = (!links.is_empty()).then_some(&links);
        self.put(LINKS, id, value)
    }

    /// Removes an identifier's links wholesale (a component leaving) and returns them.
    pub fn take_links(
        &mut self,
        id: &Identifier,
    ) -> Result<Vec<(Identifier, Evidence)>, StoreError> {
        let links = self.read().links(id)?;
        self.put::<()>(LINKS, id, None)?;
        Ok(links)
    }

    pub fn put_redirect(&mut self, from: &ProfileId, to: &ProfileId) -> Result<(), StoreError> {
        if let Some(old) = self.read().redirect_of(from)? {
            self.edit_redirected_from(&old, |v| v.retain(|x| x != from))?;
        }
        self.put(REDIRECT, from.0.as_bytes(), Some(to))?;
        self.edit_redirected_from(to, |v| v.push(from.clone()))
    }

    pub fn delete_redirect(&mut self, id: &ProfileId) -> Result<(), StoreError> {
        if let Some(to) = self.read().redirect_of(id)? {
            self.put::<ProfileId>(REDIRECT, id.0.as_bytes(), None)?;
            self.edit_redirected_from(&to, |v| v.retain(|x| x != id))?;
        }
        Ok(())
    }
}

/// The classic stitcher runs on a shard's graph unchanged. Two differences: errors are kept in the
/// view's first failure (the trait's writes cannot fail; the protocol checks [`ShardGraph::error`]),
/// and `first_sighting` is always true, because events are deduplicated at their home before they are
/// located (`e` records), not where they are applied.
pub struct ShardGraph<'v, 'k, K: ?Sized> {
    pub view: &'v mut ShardView<'k, K>,
    pub error: Option<StoreError>,
}

impl<K: Kv + ?Sized> ShardGraph<'_, '_, K> {
    fn keep(&mut self, r: Result<(), StoreError>) {
        if let (Err(e), None) = (r, &self.error) {
            self.error = Some(e);
        }
    }

    /// The first write that failed, if any.
    pub fn finish(self) -> Result<(), StoreError> {
        self.error.map_or(Ok(()), Err)
    }
}

impl<K: Kv + ?Sized> GraphStore for ShardGraph<'_, '_, K> {
    type Error = StoreError;

    fn node_of(&mut self, id: &Identifier) -> Result<Option<NodeId>, StoreError> {
        self.view.read().node_of(id)
    }
    fn set_node(&mut self, id: &Identifier, node: NodeId) {
        let r = self.view.put(NODE, id, Some(&node));
        self.keep(r);
    }
    fn remove_identifier(&mut self, id: &Identifier) {
        let r = self.view.put::<NodeId>(NODE, id, None);
        self.keep(r);
    }
    fn take_profile(&mut self, node: NodeId) -> Result<Option<Box<Profile>>, StoreError> {
        self.view.take_profile(PROFILE, &node.0.to_be_bytes())
    }
    fn seal(&mut self, node: NodeId) -> Result<Option<Seal>, StoreError> {
        self.view.read().seal(node)
    }
    fn put_profile(&mut self, node: NodeId, profile: Box<Profile>) {
        let r = self
            .view
            .set_profile(PROFILE, &node.0.to_be_bytes(), Some(profile));
        self.keep(r);
    }
    fn delete_profile(&mut self, node: NodeId) {
        let r = self
            .view
            .put::<Profile>(PROFILE, &node.0.to_be_bytes(), None);
        self.keep(r);
    }
    fn allocate_node(&mut self) -> Result<NodeId, StoreError> {
        let next: u64 = self.view.get(NEXT_NODE, &[])?.unwrap_or(1);
        self.view.put(NEXT_NODE, &[], Some(&(next + 1)))?;
        Ok(NodeId(next))
    }
    fn first_sighting(&mut self, _event_id: &str) -> Result<bool, StoreError> {
        Ok(true)
    }
    fn redirect(&mut self, from: &ProfileId, to: &ProfileId) {
        let r = self
            .view
            .put_redirect(from, to)
            .and_then(|()| self.view.delete_redirect(to));
        self.keep(r);
    }
    fn remove_redirect(&mut self, id: &ProfileId) {
        let r = self.view.delete_redirect(id);
        self.keep(r);
    }
    fn redirect_of(&mut self, id: &ProfileId) -> Result<Option<ProfileId>, StoreError> {
        self.view.read().redirect_of(id)
    }
    fn redirects_to(&mut self, id: &ProfileId) -> Result<Vec<ProfileId>, StoreError> {
        self.view.read().redirects_to(id)
    }
    fn index(&mut self, id: &ProfileId, node: NodeId) {
        let r = self.view.put(INDEX, id.0.as_bytes(), Some(&node));
        self.keep(r);
    }
    fn unindex(&mut self, id: &ProfileId) {
        let r = self.view.put::<NodeId>(INDEX, id.0.as_bytes(), None);
        self.keep(r);
    }
    fn indexed(&mut self, id: &ProfileId) -> Result<Option<NodeId>, StoreError> {
        self.view.read().indexed(id)
    }
    fn links(&mut self, id: &Identifier) -> Result<Vec<(Identifier, Evidence)>, StoreError> {
        self.view.read().links(id)
    }
    fn link_all(&mut self, ids: &[Identifier], evidence: &Evidence) {
        if ids.len() < 2 {
            return;
        }
        let r = self.view.add_links(ids, evidence);
        self.keep(r);
    }
    fn remove_link(&mut self, a: &Identifier, b: &Identifier) {
        for (x, y) in [(a, b), (b, a)] {
            let r = self.view.edit_links(x, |m| remove_evidence(m, y));
            self.keep(r);
        }
    }
    fn take_part(&mut self, id: &Identifier) -> Result<Option<Box<Profile>>, StoreError> {
        self.view.take_profile(PART, id)
    }
    fn put_part(&mut self, id: &Identifier, part: Box<Profile>) {
        let r = self.view.set_profile(PART, id, Some(part));
        self.keep(r);
    }
    fn add_to_part(&mut self, id: &Identifier, ev: &Event, cfg: &Enrichment) {
        let r = self.view.take_profile(PART, id).and_then(|p| {
            let part = Profile::part_with(p, ev, cfg);
            self.view.set_profile(PART, id, Some(part))
        });
        self.keep(r);
    }
    fn delete_part(&mut self, id: &Identifier) {
        let r = self.view.put::<Profile>(PART, id, None);
        self.keep(r);
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::store::TempStore;

    fn committed(store: &Store, changes: &[(&[u8], Option<&[u8]>)]) {
        store
            .write_shard_changes(changes.iter().copied(), [])
            .unwrap();
    }

    #[test]
    fn a_read_key_is_the_key_on_the_stack_or_off_it() {
        let short = Identifier::new("email", "a@example.com");
        let long = Identifier::new("cookie", "c".repeat(200));
        for id in [&short, &long] {
            assert_eq!(&*ReadKey::new(7, LINKS, id), key(7, LINKS, id).as_slice());
        }
        assert!(matches!(
            ReadKey::new(7, LINKS, &short),
            ReadKey::Inline(..)
        ));
        assert!(matches!(ReadKey::new(7, LINKS, &long), ReadKey::Heap(_)));
        let node = 42u64.to_be_bytes();
        assert_eq!(
            &*ReadKey::new(0, PROFILE, &node),
            key(0, PROFILE, &node).as_slice()
        );
        // The longest rest that fits, and one byte more.
        for n in [READ_KEY_INLINE - 5, READ_KEY_INLINE - 4] {
            let rest = vec![b'x'; n];
            assert_eq!(
                &*ReadKey::new(1, PART, rest.as_slice()),
                key(1, PART, rest.as_slice()).as_slice()
            );
        }
    }

    /// A changelog's directory entries tell the shard count that wrote it: read with that count nothing
    /// is misplaced; read with another, exactly the identifiers that count homes elsewhere are named. A
    /// record in another shard's partition is named too.
    #[test]
    fn a_changelog_written_with_another_shard_count_is_recognised() {
        use crate::scaleout::home;
        let ids: Vec<Identifier> = (0..200)
            .map(|i| Identifier::new("email", format!("p{i}@example.com")))
            .collect();
        let written = |id: &Identifier| (home(id, 4), key(home(id, 4), DIR, id));
        for id in &ids {
            let (shard, dir) = written(id);
            assert_eq!(misplaced(&dir, None, shard as i32, 4), None);
            assert_eq!(
                misplaced(&key(shard, LINKS, id), None, shard as i32, 8),
                None
            );
        }
        for shards in [1, 8, 5] {
            let refused: Vec<&Identifier> = ids
                .iter()
                .filter(|id| {
                    let (shard, dir) = written(id);
                    misplaced(&dir, None, shard as i32, shards).is_some()
                })
                .collect();
            let moved: Vec<&Identifier> = ids
                .iter()
                .filter(|id| home(id, shards) != home(id, 4))
                .collect();
            assert!(!moved.is_empty(), "{shards} shards move some of 200");
            assert_eq!(refused, moved, "{shards} shards");
        }
        let (shard, dir) = written(&ids[0]);
        let elsewhere = (shard + 1) as i32;
        assert_eq!(
            misplaced(&dir, None, elsewhere, 4).as_deref(),
            Some(format!("a record of shard {shard}").as_str())
        );
        let tmp = TempStore::new().unwrap();
        let mut view = ShardOverlay::new(&tmp.store);
        mark_shard_count(&mut view, 2, 4).unwrap();
        let changes = view.into_changes().unwrap();
        let (mark, value) = changes.iter().next().unwrap();
        assert_eq!(changes.len(), 1);
        assert_eq!(misplaced(mark, value.as_deref(), 2, 4), None);
        assert_eq!(
            misplaced(mark, value.as_deref(), 2, 8).as_deref(),
            Some("the mark of a changelog of 4 shards")
        );
        let moved = ids.iter().find(|id| home(id, 8) != home(id, 4)).unwrap();
        let (shard, dir) = written(moved);
        assert_eq!(
            misplaced(&dir, None, shard as i32, 8),
            Some(format!(
                "the directory entry of an identifier that 8 shards place at shard {}",
                home(moved, 8)
            ))
        );
    }

    #[test]
    fn a_batch_changes_only_what_differs_from_the_store() {
        let t = TempStore::new().unwrap();
        let (kept, gone, brief) = (
            key(0, NODE, b"a"),
            key(0, NODE, b"b"),
            key(0, PENDING, b"e"),
        );
        committed(&t.store, &[(&kept, Some(b"1")), (&gone, Some(b"2"))]);

        let mut overlay = ShardOverlay::new(&t.store);
        assert_eq!(overlay.get(&kept).unwrap(), Some(b"1".to_vec()));
        assert_eq!(overlay.get(&brief).unwrap(), None);
        // A record created and deleted within the batch (read first, so known absent below).
        overlay.set(brief.clone(), Some(b"x".to_vec()));
        assert_eq!(overlay.get(&brief).unwrap(), Some(b"x".to_vec()));
        overlay.set(brief.clone(), None);
        // A record the store holds, deleted without being read: its tombstone stays.
        overlay.set(gone.clone(), None);
        // The committed value read earlier is not served after a write.
        overlay.set(kept.clone(), Some(b"3".to_vec()));
        assert_eq!(overlay.get(&kept).unwrap(), Some(b"3".to_vec()));
        assert_eq!(overlay.get(&gone).unwrap(), None);

        assert!(!overlay.is_empty());
        let mut changes: Vec<_> = overlay.into_changes().unwrap().into_iter().collect();
        changes.sort();
        assert_eq!(
            changes,
            vec![(kept.clone(), Some(b"3".to_vec())), (gone.clone(), None)]
        );

        let mut idle = ShardOverlay::new(&t.store);
        assert_eq!(idle.get(&brief).unwrap(), None);
        idle.set(brief.clone(), None);
        assert!(
            idle.is_empty(),
            "deleting what the store does not hold changes nothing"
        );
    }

    /// RocksDB counts by default, per thread; a batch's reads and its write turn that off (each on a
    /// thread of its own here, as the poll and commit threads are: the level is the thread's).
    #[test]
    fn a_batch_leaves_rocksdb_counting_nothing() {
        use rocksdb::perf::{PerfContext, PerfMetric};
        let t = TempStore::new().unwrap();
        let k = key(0, NODE, b"a");
        let counted = |f: &(dyn Fn() + Sync)| {
            std::thread::scope(|s| {
                s.spawn(|| {
                    let mut ctx = PerfContext::default();
                    ctx.reset();
                    f();
                    ctx.metric(PerfMetric::UserKeyComparisonCount)
                        + ctx.metric(PerfMetric::GetFromMemtableCount)
                })
                .join()
                .unwrap()
            })
        };
        committed(&t.store, &[(&k, Some(b"1"))]);
        let read = || {
            t.store.shard_value(&k).unwrap();
        };
        assert!(counted(&read) > 0, "RocksDB's default counts");
        let batch = || {
            let overlay = ShardOverlay::new(&t.store);
            assert_eq!(overlay.get(&k).unwrap(), Some(b"1".to_vec()));
            t.store
                .write_shard_changes([(k.clone(), Some(b"2".to_vec()))], [])
                .unwrap();
            t.store.shard_value(&k).unwrap();
        };
        assert_eq!(counted(&batch), 0);
        // The commit thread writes without an overlay before it.
        let write = || {
            t.store
                .write_shard_changes([(k.clone(), Some(b"3".to_vec()))], [])
                .unwrap();
            t.store.shard_value(&k).unwrap();
        };
        assert_eq!(counted(&write), 0);
    }

    #[derive(Debug, Clone)]
    enum Op {
        /// Write the key's bytes (as a step that is not a profile write does, deleting it for one).
        Set(usize, Option<u8>),
        SetProfile(usize, Option<u8>),
        /// Take the profile out, then delete it or put it back changed (as a join into a part does).
        Take(usize, Option<u8>),
        Read(usize),
        /// Tell the overlay the key holds nothing, where the model says so (as the protocol does).
        KnownAbsent(usize),
    }

    fn op() -> impl proptest::strategy::Strategy<Value = Op> {
        use proptest::prelude::*;
        let k = 0..4usize;
        let v = proptest::option::of(0..4u8);
        prop_oneof![
            (k.clone(), v.clone()).prop_map(|(k, v)| Op::Set(k, v)),
            (k.clone(), v.clone()).prop_map(|(k, v)| Op::SetProfile(k, v)),
            (k.clone(), v).prop_map(|(k, v)| Op::Take(k, v)),
            k.clone().prop_map(Op::Read),
            k.prop_map(Op::KnownAbsent),
        ]
    }

    fn a_profile(n: u8) -> Box<Profile> {
        let mut p = Profile::empty();
        p.events = u64::from(n);
        p.shared = n % 2 == 1;
        Box::new(p)
    }

    /// Everything a batch can read of a record, by every path.
    type Reads = (
        bool,
        Option<Vec<u8>>,
        Option<Profile>,
        Option<Profile>,
        Option<Seal>,
    );

    fn reads<K: KvRead>(kv: &K, k: &[u8]) -> Reads {
        (
            kv.contains(k).unwrap(),
            kv.get(k).unwrap(),
            kv.profile(k).unwrap(),
            kv.with_profile(k, |p| p.cloned()).unwrap(),
            kv.seal(k).unwrap(),
        )
    }

    proptest::proptest! {
        /// The overlay's decoded profiles never differ from its bytes: any sequence of writes, takes,
        /// reads and claims of absence reads the same through the overlay (over committed records and
        /// a pending batch's changes) as through the plain map the simulation uses, and leaves the same
        /// changes.
        #[test]
        fn decoded_profiles_read_as_their_bytes(ops in proptest::collection::vec(op(), 1..40)) {
            let t = TempStore::new().unwrap();
            let keys = [key(0, PROFILE, &1u64.to_be_bytes()), key(0, PROFILE, &2u64.to_be_bytes()), key(0, PART, b"x"), key(0, PART, b"y")];
            let bytes = |n: u8| encode_value(&a_profile(n), 0).unwrap();
            let mut model: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();
            for (k, n) in [(&keys[0], 0), (&keys[2], 1), (&keys[3], 2)] {
                committed(&t.store, &[(k.as_slice(), Some(bytes(n).as_slice()))]);
                model.insert(k.clone(), bytes(n));
            }
            // The batch before, committing while this one runs: it rewrote one record the store
            // holds, deleted another, and created one.
            let pending: Changes = [(keys[2].clone(), Some(bytes(3))), (keys[3].clone(), None), (keys[1].clone(), Some(bytes(2)))].into_iter().collect();
            for (k, v) in &pending {
                model.set(k.clone(), v.clone());
            }
            let mut overlay = ShardOverlay::over(&t.store, Some(Arc::new(pending.clone())));
            for op in ops {
                match op {
                    Op::Set(k, v) => {
                        overlay.set(keys[k].clone(), v.map(bytes));
                        model.set(keys[k].clone(), v.map(bytes));
                    }
                    Op::SetProfile(k, v) => {
                        overlay.set_profile(keys[k].clone(), v.map(a_profile)).unwrap();
                        model.set_profile(keys[k].clone(), v.map(a_profile)).unwrap();
                    }
                    Op::Take(k, v) => {
                        let (a, b) = (overlay.take_profile(&keys[k]).unwrap(), model.take_profile(&keys[k]).unwrap());
                        proptest::prop_assert_eq!(&a, &b);
                        let back = a.map(|mut p| { p.events += u64::from(v.unwrap_or(0)); p }).filter(|_| v.is_some());
                        overlay.set_profile(keys[k].clone(), back.clone()).unwrap();
                        model.set_profile(keys[k].clone(), back).unwrap();
                    }
                    Op::Read(k) => proptest::prop_assert_eq!(reads(&overlay, &keys[k]), reads(&model, &keys[k])),
                    Op::KnownAbsent(k) => {
                        if !model.contains_key(&keys[k]) {
                            overlay.known_absent(keys[k].clone());
                        }
                    }
                }
            }
            for k in &keys {
                proptest::prop_assert_eq!(reads(&overlay, k), reads(&model, k));
            }
            let mut after = BTreeMap::new();
            for k in &keys {
                if let Some(v) = t.store.shard_value(k).unwrap() {
                    after.insert(k.clone(), v);
                }
            }
            for (k, v) in pending.into_iter().chain(overlay.into_changes().unwrap()) {
                match v {
                    Some(v) => after.insert(k, v),
                    None => after.remove(&k),
                };
            }
            proptest::prop_assert_eq!(after, model);
        }
    }

    /// The whole sharded state of a store, key by key.
    pub(crate) fn dump(store: &Store) -> BTreeMap<Vec<u8>, Vec<u8>> {
        let mut all = BTreeMap::new();
        store
            .scan_shards(&[], &[], usize::MAX, |k, v| {
                all.insert(k.to_vec(), v.to_vec());
                Ok(ControlFlow::Continue(()))
            })
            .unwrap();
        all
    }

    /// A store restored from `log` in chunks of `chunk` records, as the pipeline's restore writes them.
    fn restore(log: &[(Vec<u8>, Option<Vec<u8>>)], chunk: usize) -> TempStore {
        let t = TempStore::new().unwrap();
        restore_onto(&t.store, log, chunk);
        t
    }

    /// Applies `log` to `store` in chunks of `chunk` records, as the pipeline's restore writes them.
    pub(crate) fn restore_onto(store: &Store, log: &[(Vec<u8>, Option<Vec<u8>>)], chunk: usize) {
        let mut restore = Restore::default();
        for (i, (k, v)) in log.iter().enumerate() {
            restore.apply(store, k.clone(), v.clone()).unwrap();
            if (i + 1) % chunk == 0 || i + 1 == log.len() {
                store.write_shard_changes(restore.take(), []).unwrap();
            }
        }
    }

    /// What log compaction leaves of `log`: each key's last record, in the order of those, and the
    /// tombstones among them unless their delete retention passed.
    pub(crate) fn compacted(
        log: &[(Vec<u8>, Option<Vec<u8>>)],
        tombstones: bool,
    ) -> Vec<(Vec<u8>, Option<Vec<u8>>)> {
        let last: HashMap<&Vec<u8>, usize> =
            log.iter().enumerate().map(|(i, (k, _))| (k, i)).collect();
        log.iter()
            .enumerate()
            .filter(|(i, (k, v))| last[k] == *i && (tombstones || v.is_some()))
            .map(|(_, r)| r.clone())
            .collect()
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(crate::env_or("PROPTEST_CASES", 64)))]

        /// Event ids written live over batches with sweeps (over ids a version before left as `e`
        /// records) equal those a restore rebuilds from the changelog, whole and compacted: the local copy's
        /// `f` records are exactly the ids of its `E` records. And an id seen again within the retention is
        /// a duplicate, wherever it was first recorded.
        #[test]
        fn event_ids_restored_equal_event_ids_written(
            batches in proptest::collection::vec(
                (proptest::collection::vec(0u16..400, 0..60), 0i64..4_000, 1usize..40),
                1..25,
            ),
            legacy in proptest::collection::vec(0u16..400, 0..40),
            shards in 1u32..4,
            retention in 1_000i64..10_000,
            chunk in 1usize..50,
        ) {
            let live = TempStore::new().unwrap();
            let mut log: Vec<(Vec<u8>, Option<Vec<u8>>)> = Vec::new();
            let id = |n: u16| format!("event-{n}");
            let mut t = 1_000_000i64;
            // What a version before left: `e` records, in the store and the changelog alike.
            let mut first_seen_at: HashMap<u16, i64> = HashMap::new();
            for &n in &legacy {
                let digest = Sha256::digest(id(n).as_bytes());
                let k = key(u32::from(n) % shards, SEEN_LEGACY, &digest[..ID_LEN]);
                let v = (t - 500).to_be_bytes().to_vec();
                first_seen_at.entry(n).or_insert(t - 500);
                log.push((k.clone(), Some(v.clone())));
                live.store.write_shard_changes([(k, Some(v))], []).unwrap();
            }
            live.store.forget_prefixes();
            for (events, step, budget) in &batches {
                t += step;
                let mut overlay = ShardOverlay::new(&live.store);
                // Each event a millisecond after the one before, as they come.
                for (i, &n) in events.iter().enumerate() {
                    let t = t + i as i64;
                    let shard = u32::from(n) % shards;
                    let first = ShardView { kv: &mut overlay, shard }.first_seen(&id(n), t).unwrap();
                    match first_seen_at.get(&n) {
                        Some(&at) if t - at <= retention => {
                            proptest::prop_assert!(!first, "event {} first seen at {} again at {}", n, at, t)
                        }
                        _ if first => {
                            first_seen_at.insert(n, t);
                        }
                        _ => {}
                    }
                }
                for shard in 0..shards {
                    let mut from = None;
                    loop {
                        from = sweep_seen(&mut overlay, shard, from.as_deref(), *budget, t - retention).unwrap();
                        if from.is_none() {
                            break;
                        }
                    }
                }
                let changes = overlay.into_changes().unwrap();
                let mut records: Vec<_> = changes
                    .iter()
                    .filter(|(k, _)| !local_only(k))
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect();
                records.sort();
                proptest::prop_assert!(records.iter().all(|(k, _)| k.get(4) != Some(&SEEN)));
                log.extend(records);
                live.store.write_shard_changes(changes, []).unwrap();
            }
            let written = dump(&live.store);
            for (k, v) in &written {
                if k.get(4) == Some(&SEEN_BATCH) {
                    proptest::prop_assert_eq!(v.len() % ID_LEN, 0);
                }
            }
            let packed: BTreeSet<Vec<u8>> = written
                .iter()
                .filter(|(k, _)| k.get(4) == Some(&SEEN_BATCH))
                .flat_map(|(k, v)| v.chunks_exact(ID_LEN).map(|id| key(shard_of_key(k).unwrap(), SEEN, id)))
                .collect();
            let ids: BTreeSet<Vec<u8>> = written.keys().filter(|k| k.get(4) == Some(&SEEN)).cloned().collect();
            proptest::prop_assert_eq!(&ids, &packed);
            proptest::prop_assert_eq!(&dump(&restore(&log, chunk).store), &written);
            proptest::prop_assert_eq!(&dump(&restore(&compacted(&log, false), chunk).store), &written);
        }
    }

    /// An event's identifiers (kind, value), and its evidence (event, first time, time since).
    type LinkEvent = (Vec<(u8, u8)>, (u8, i64, i64));

    fn link_ops() -> impl proptest::strategy::Strategy<Value = Vec<LinkEvent>> {
        // Identifiers from a small alphabet (one of them not ASCII, so that byte order is what orders
        // them), so that events meet links already there; evidence with ties in time and event id.
        let ids = proptest::collection::vec((0u8..3, 0u8..5), 1..5);
        proptest::collection::vec((ids, (0u8..4, 0i64..5, 0i64..5)), 1..30)
    }

    proptest::proptest! {
        /// A links record edited borrowed from its encoding (`add_links`, what every event does) is byte
        /// for byte the record the owned edit (`edit_links` with `add_evidence`) writes, event after event.
        #[test]
        fn links_edited_borrowed_are_the_links_edited_owned(events in link_ops()) {
            let identifier = |(k, v): (u8, u8)| {
                Identifier::new(["email", "cookie", "é-id"][usize::from(k)], format!("v{v}é{}", v % 2))
            };
            let (mut borrowed, mut owned) = (BTreeMap::new(), BTreeMap::new());
            for (ids, (e, first, last)) in events {
                let ids: Vec<Identifier> = ids.into_iter().map(identifier).collect();
                let evidence = Evidence {
                    events: 1,
                    first_at: first,
                    first_event: format!("e{e}"),
                    first_channel: format!("ch{e}"),
                    last_at: first + last,
                };
                ShardView { kv: &mut borrowed, shard: 0 }.add_links(&ids, &evidence).unwrap();
                for x in &ids {
                    ShardView { kv: &mut owned, shard: 0 }
                        .edit_links(x, |m| add_evidence(m, x, &ids, &evidence))
                        .unwrap();
                }
                proptest::prop_assert_eq!(&borrowed, &owned);
            }
        }
    }
}
