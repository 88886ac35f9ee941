//! Dead letters: the original key and bytes, with headers saying where they came from and what was wrong.

use crate::store::OutRecord;

pub const HEADER_TOPIC: &str = "dlq.source.topic";
pub const HEADER_PARTITION: &str = "dlq.source.partition";
pub const HEADER_OFFSET: &str = "dlq.source.offset";
pub const HEADER_STAGE: &str = "dlq.stage";
pub const HEADER_ERROR: &str = "dlq.error";

/// Where a bad message came from.
#[derive(Debug, Clone, Copy)]
pub struct Source<'a> {
    pub topic: &'a str,
    pub partition: i32,
    pub offset: i64,
}

/// The dead-letter record for a message that failed at `stage` with `error`.
pub fn record(
    dlq_topic: &str,
    src: Source<'_>,
    key: Option<&[u8]>,
    payload: Option<&[u8]>,
    stage: &str,
    error: &str,
) -> OutRecord {
    OutRecord {
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
            (HEADER_ERROR.into(), error.as_bytes().to_vec()),
        ],
    }
}
