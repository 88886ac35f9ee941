//! Decoding ahead of the batch: input messages are decoded and normalised on a thread of their own while
//! the poll thread handles the messages before them (docs/DESIGN.md, "Decoding ahead"). Decoding needs no
//! state, so where it runs changes nothing but the time: the poll thread hands over messages in chunks, in
//! the order it polled them, and takes the chunks back in that order.

use rdkafka::message::OwnedMessage;

use crate::engine::Decoder;
use crate::pipeline::PipelineError;
use crate::processor::{Decoded, InMessage, ProcessError};
use crate::worker::{Ended, Worker};

/// Messages handed over at once: enough that a hand-over (two channel operations, perhaps a wake-up) is
/// small against decoding them, few enough that the first of them is not kept waiting.
pub const CHUNK: usize = 64;

/// Chunks handed over and not yet taken back, at most: the decode thread stays this far ahead.
pub const AHEAD: usize = 2;

/// A chunk of messages as polled, each with what [`Decoder::decode`] made of it.
pub type DecodedChunk = Vec<(OwnedMessage, Option<Result<Decoded, ProcessError>>)>;

pub struct DecodeAhead {
    worker: Worker<Vec<OwnedMessage>, DecodedChunk>,
    /// Chunks handed over, not yet taken back.
    in_flight: usize,
}

impl DecodeAhead {
    pub fn start(decoder: Decoder) -> Result<Self, PipelineError> {
        let stack = crate::codec::avro::DECODE_STACK;
        let worker =
            Worker::start_with_stack("stitcher-decode", stack, move |chunk: Vec<OwnedMessage>| {
                chunk
                    .into_iter()
                    .map(|m| {
                        let d = decoder.decode(InMessage::of(&m));
                        (m, d)
                    })
                    .collect()
            })
            .map_err(|e| PipelineError::DecodeThread(e.to_string()))?;
        Ok(Self {
            worker,
            in_flight: 0,
        })
    }

    /// Hands over a chunk of polled messages (nothing if it is empty).
    pub fn send(&mut self, chunk: Vec<OwnedMessage>) -> Result<(), PipelineError> {
        if chunk.is_empty() {
            return Ok(());
        }
        self.worker.send(chunk).map_err(stopped)?;
        self.in_flight += 1;
        Ok(())
    }

    /// Chunks handed over and not yet taken back.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// The oldest chunk handed over, if it is decoded already.
    pub fn ready(&mut self) -> Result<Option<DecodedChunk>, PipelineError> {
        if self.in_flight == 0 {
            return Ok(None);
        }
        let chunk = self.worker.try_recv().map_err(stopped)?;
        if chunk.is_some() {
            self.in_flight -= 1;
        }
        Ok(chunk)
    }

    /// The oldest chunk handed over, once it is decoded; `None` if none is.
    pub fn wait(&mut self) -> Result<Option<DecodedChunk>, PipelineError> {
        if self.in_flight == 0 {
            return Ok(None);
        }
        let chunk = self.worker.recv().map_err(stopped)?;
        self.in_flight -= 1;
        Ok(Some(chunk))
    }

    /// Drops whatever was handed over and not taken back (a batch given up).
    pub fn discard(&mut self) -> Result<(), PipelineError> {
        while self.wait()?.is_some() {}
        Ok(())
    }
}

fn stopped(_: Ended) -> PipelineError {
    PipelineError::DecodeThread("the decode thread stopped".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, Format, InputConfig};
    use crate::metrics::Metrics;
    use rdkafka::message::Timestamp;
    use rdkafka::Message;

    const INPUT: &str = "web-events";

    /// A decode thread for a JSON input, and the name of the internal topic.
    fn started() -> (DecodeAhead, String) {
        let cfg = Config {
            inputs: vec![InputConfig::new(INPUT, "web", Format::Json)],
            ..Config::default()
        };
        let engine = crate::engine::Engine::new(&cfg, Metrics::new().unwrap()).unwrap();
        (
            DecodeAhead::start(engine.decoder()).unwrap(),
            cfg.shard_topic(),
        )
    }

    fn message(topic: &str, offset: i64, payload: &[u8]) -> OwnedMessage {
        OwnedMessage::new(
            Some(payload.to_vec()),
            None,
            topic.into(),
            Timestamp::NotAvailable,
            0,
            offset,
            None,
        )
    }

    fn event(offset: i64) -> Vec<u8> {
        serde_json::json!({"event_id": format!("e{offset}"), "event_type": "page_view",
            "timestamp": crate::model::now_millis(),
            "identifiers": [{"type": "email", "value": format!("p{offset}@example.com")}]})
        .to_string()
        .into_bytes()
    }

    #[test]
    fn chunks_come_back_in_the_order_they_were_handed_over_each_message_decoded_or_left() {
        let (mut ahead, shard_topic) = started();
        for c in 0..5 {
            let chunk = (0..CHUNK as i64)
                .map(|i| {
                    let offset = c * CHUNK as i64 + i;
                    match offset % 3 {
                        0 => message(&shard_topic, offset, b"x"),
                        1 => message(INPUT, offset, b"not json"),
                        _ => message(INPUT, offset, &event(offset)),
                    }
                })
                .collect();
            ahead.send(chunk).unwrap();
        }
        assert_eq!(ahead.in_flight(), 5);
        let mut next = 0;
        while let Some(chunk) = ahead.wait().unwrap() {
            for (m, d) in chunk {
                assert_eq!(m.offset(), next);
                match (next % 3, d) {
                    (0, None) => {}
                    (1, Some(Ok(Decoded::Refused { stage, .. }))) => assert_eq!(stage, "decode"),
                    (2, Some(Ok(Decoded::Event(ev)))) => {
                        assert_eq!(ev.event_id, format!("e{next}"));
                        assert_eq!(ev.origin.map(|o| o.offset), Some(next));
                    }
                    (_, d) => panic!("offset {next}: {d:?}"),
                }
                next += 1;
            }
        }
        assert_eq!(next, 5 * CHUNK as i64);
        assert_eq!(ahead.in_flight(), 0);
        assert!(ahead.ready().unwrap().is_none());
    }

    #[test]
    fn a_discarded_chunk_is_not_taken_back_later() {
        let (mut ahead, _) = started();
        ahead.send(vec![message(INPUT, 1, &event(1))]).unwrap();
        ahead.send(vec![]).unwrap();
        assert_eq!(ahead.in_flight(), 1);
        ahead.discard().unwrap();
        assert_eq!(ahead.in_flight(), 0);
        ahead.send(vec![message(INPUT, 2, &event(2))]).unwrap();
        let chunk = ahead.wait().unwrap().unwrap();
        assert_eq!(chunk.len(), 1);
        assert_eq!(chunk[0].0.offset(), 2);
    }
}
