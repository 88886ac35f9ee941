//! Stitching: identifiers seen together belong to one person; merges are transitive, bounded by guardrails.
//!
//! [`graph`] is the merge logic over an abstract [`GraphStore`], free of IO so that it can be
//! property-tested; [`rules`] holds the guardrails.

pub mod evidence;
pub mod graph;
pub mod rules;

pub use evidence::Evidence;
pub use graph::{
    Applied, BatchChanges, GraphStore, MemStore, Refusal, Reshape, Split, Stitcher, Trigger,
};
pub use rules::{Rule, Rules};
