//! Dead letters: the original key and bytes, with headers saying where they came from and what was wrong.
//!
//! Every record the service produces must fit what the producer, the broker and the topic accept
//! ([`record_bytes`] against `output.max_record_bytes`, lowered at start-up to the broker's and topics'
//! limits). A dead letter too large for that carries the first part of its payload and headers saying so
//! ([`fit`]); an output record too large is replaced by a dead letter that says where it was going
//! ([`unproducible`]). So one message can never make a transaction fail again and again.

use sha2::{Digest, Sha256};

use crate::store::{OutRecord, RecordRef};

pub const HEADER_TOPIC: &str = "dlq.source.topic";
pub const HEADER_PARTITION: &str = "dlq.source.partition";
pub const HEADER_OFFSET: &str = "dlq.source.offset";
pub const HEADER_STAGE: &str = "dlq.stage";
pub const HEADER_ERROR: &str = "dlq.error";
/// `true` when the payload is only the first part of the original.
pub const HEADER_TRUNCATED: &str = "dlq.payload.truncated";
/// Size in bytes of the original payload (set with [`HEADER_TRUNCATED`]).
pub const HEADER_SIZE: &str = "dlq.payload.size";
/// Hex SHA-256 of the original payload (set with [`HEADER_TRUNCATED`]).
pub const HEADER_SHA256: &str = "dlq.payload.sha256";
/// For a record that could not be produced: the topic it was going to.
pub const HEADER_OUTPUT_TOPIC: &str = "dlq.output.topic";

/// What a record costs in a Kafka record batch besides its key, value and headers (length varints,
/// attributes, deltas; generous).
const RECORD_OVERHEAD: usize = 64;
/// Room kept free under the limit for the batch header and for headers added by [`fit`].
const MARGIN: usize = 1024;

/// Where a bad message came from.
#[derive(Debug, Clone, Copy)]
pub struct Source<'a> {
    pub topic: &'a str,
    pub partition: i32,
    pub offset: i64,
}

/// The dead-letter record for a message that failed at `stage` with `error`, fitted to `limit` bytes.
pub fn record(
    dlq_topic: &str,
    src: Source<'_>,
    key: Option<&[u8]>,
    payload: Option<&[u8]>,
    stage: &str,
    error: &str,
    limit: usize,
) -> OutRecord {
    let record = OutRecord {
        topic: dlq_topic.to_string(),
        partition: None,
        key: key.map(<[u8]>::to_vec),
        payload: Some(payload.map(<[u8]>::to_vec).unwrap_or_default()),
        headers: vec![
            (HEADER_TOPIC.into(), src.topic.as_bytes().to_vec()),
            (
                HEADER_PARTITION.into(),
                src.partition.to_string().into_bytes(),
            ),
            (HEADER_OFFSET.into(), src.offset.to_string().into_bytes()),
            (HEADER_STAGE.into(), stage.as_bytes().to_vec()),
            (HEADER_ERROR.into(), truncate_str(error, 1024).into_bytes()),
        ],
    };
    fit(record, limit)
}

/// The size a record takes on the wire, near enough to compare with `message.max.bytes`.
pub fn record_bytes(r: RecordRef<'_>) -> usize {
    RECORD_OVERHEAD
        + r.key.map_or(0, <[u8]>::len)
        + r.payload.map_or(0, <[u8]>::len)
        + r.headers
            .iter()
            .map(|(k, v)| k.len() + v.len() + 8)
            .sum::<usize>()
}

/// Whether `r` fits in a record of at most `limit` bytes, with the margin kept free.
pub fn fits(r: RecordRef<'_>, limit: usize) -> bool {
    record_bytes(r) + MARGIN <= limit
}

/// `r` if it fits; otherwise `r` with its payload cut to what fits (none if even the key and headers
/// leave no room) and headers giving the original size and SHA-256.
pub fn fit(mut r: OutRecord, limit: usize) -> OutRecord {
    if fits(r.borrowed(), limit) {
        return r;
    }
    let payload = r.payload.take().unwrap_or_default();
    r.headers.extend([
        (HEADER_TRUNCATED.to_string(), b"true".to_vec()),
        (
            HEADER_SIZE.to_string(),
            payload.len().to_string().into_bytes(),
        ),
        (
            HEADER_SHA256.to_string(),
            hex::encode(Sha256::digest(&payload)).into_bytes(),
        ),
    ]);
    if !fits(r.borrowed(), limit) {
        // Not even the key fits: keep its hash only.
        let key = r.key.take().unwrap_or_default();
        r.headers.push((
            "dlq.key.sha256".to_string(),
            hex::encode(Sha256::digest(&key)).into_bytes(),
        ));
    }
    let room = limit.saturating_sub(record_bytes(r.borrowed()) + MARGIN);
    r.payload = Some(payload[..room.min(payload.len())].to_vec());
    r
}

/// The dead letter standing in for an output record that cannot be produced (larger than `limit`, or
/// refused by the broker for its size): where it was going, its key, and as much of its payload as fits.
pub fn unproducible(dlq_topic: &str, r: RecordRef<'_>, error: &str, limit: usize) -> OutRecord {
    let mut headers = vec![
        (HEADER_OUTPUT_TOPIC.to_string(), r.topic.as_bytes().to_vec()),
        (HEADER_STAGE.to_string(), b"output".to_vec()),
        (
            HEADER_ERROR.to_string(),
            truncate_str(error, 1024).into_bytes(),
        ),
    ];
    headers.extend(r.headers.iter().cloned());
    fit(
        OutRecord {
            topic: dlq_topic.to_string(),
            partition: None,
            key: r.key.map(<[u8]>::to_vec),
            payload: r.payload.map(<[u8]>::to_vec),
            headers,
        },
        limit,
    )
}

/// At most `max` bytes of `s`, cut at a character boundary.
pub fn truncate_str(s: &str, max: usize) -> String {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn src() -> Source<'static> {
        Source {
            topic: "web-events",
            partition: 3,
            offset: 42,
        }
    }

    fn header<'a>(r: &'a OutRecord, name: &str) -> Option<&'a [u8]> {
        r.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_slice())
    }

    #[test]
    fn small_dead_letters_keep_their_bytes() {
        let r = record(
            "dlq",
            src(),
            Some(b"k"),
            Some(b"{bad"),
            "decode",
            "eof",
            1_000_000,
        );
        assert_eq!(r.payload.as_deref(), Some(&b"{bad"[..]));
        assert_eq!(header(&r, HEADER_TRUNCATED), None);
    }

    #[test]
    fn large_dead_letters_are_cut_to_the_limit_and_say_so() {
        let payload = vec![b'x'; 1_040_019];
        let limit = 1_000_000;
        let r = record(
            "dlq",
            src(),
            Some(b"k"),
            Some(&payload),
            "decode",
            "bad json",
            limit,
        );
        assert!(record_bytes(r.borrowed()) <= limit - MARGIN);
        assert!(r.payload.as_ref().unwrap().len() > limit / 2);
        assert_eq!(header(&r, HEADER_TRUNCATED), Some(&b"true"[..]));
        assert_eq!(header(&r, HEADER_SIZE), Some(&b"1040019"[..]));
        assert_eq!(
            header(&r, HEADER_SHA256),
            Some(hex::encode(Sha256::digest(&payload)).as_bytes())
        );
        assert_eq!(header(&r, HEADER_OFFSET), Some(&b"42"[..]));
        // A key larger than the limit leaves no payload and only the key's hash.
        let key = vec![b'k'; 5000];
        let r = record(
            "dlq",
            src(),
            Some(&key),
            Some(&payload),
            "decode",
            "e",
            4096,
        );
        assert!(record_bytes(r.borrowed()) <= 4096);
        assert_eq!(r.key, None);
        assert!(header(&r, "dlq.key.sha256").is_some());
    }

    #[test]
    fn an_unproducible_output_record_becomes_a_fitting_dead_letter() {
        let update = OutRecord {
            topic: "profile-updates".into(),
            partition: None,
            key: Some(b"p-00".to_vec()),
            payload: Some(vec![0; 3_000_000]),
            headers: vec![],
        };
        let r = unproducible("dlq", update.borrowed(), "too large", 1_000_000);
        assert_eq!(r.topic, "dlq");
        assert!(fits(r.borrowed(), 1_000_000));
        assert_eq!(
            header(&r, HEADER_OUTPUT_TOPIC),
            Some(&b"profile-updates"[..])
        );
        assert_eq!(header(&r, HEADER_SIZE), Some(&b"3000000"[..]));
    }
}
