//! Shards: the identity graph split in shards shared by the instances of one consumer group, as Kafka
//! assigns the partitions of an internal topic (one partition per shard); one instance holding every shard
//! is the smallest deployment. Every component is kept whole at one shard, its owner, where the stitcher
//! decides everything about it; [`owner`] is the protocol that moves components between shards,
//! [`crate::pipeline`] runs it on Kafka with state in RocksDB backed by a changelog topic ([`state`]),
//! [`lookup`] and [`routing`] answer lookups from any instance.
//! docs/DESIGN.md, "Scale-out" and "One engine for N instances", has the diagram and the argument.

pub mod lookup;
pub mod owner;
pub mod routing;
pub mod state;

use sha2::{Digest, Sha256};

use crate::model::{Event, Identifier};

/// A shard number: a partition of the internal topic and of the changelog.
pub type ShardId = u32;

/// The shard that keeps an identifier's directory entry (which shard owns its component).
pub fn home(id: &Identifier, shards: ShardId) -> ShardId {
    hash_mod(shards, || crate::store::identifier_key(id))
}

/// [`home`] of the identifier whose state key (type, NUL, value) is `key`.
pub(crate) fn home_of_key(key: &[u8], shards: ShardId) -> ShardId {
    hash_mod(shards, || key)
}

/// The shard an event enters at, where it is deduplicated: the first home of its identifiers (where its
/// first `Locate` goes, so entering costs no hop of its own); the hash of its id if it has none. Every copy
/// of an event enters at the same shard: it depends on nothing but the event's identifiers.
pub fn entry_shard(ev: &Event, shards: ShardId) -> ShardId {
    ev.identifiers
        .iter()
        .map(|x| home(x, shards))
        .min()
        .unwrap_or_else(|| hash_mod(shards, || ev.event_id.as_bytes()))
}

/// The shard of a key, by its hash; one shard (the smallest deployment) homes everything at 0 without
/// making or hashing the key.
fn hash_mod<B: AsRef<[u8]>>(shards: ShardId, key: impl FnOnce() -> B) -> ShardId {
    if shards <= 1 {
        return 0;
    }
    let d = Sha256::digest(key().as_ref());
    u32::from_be_bytes([d[0], d[1], d[2], d[3]]) % shards
}
