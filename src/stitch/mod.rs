//! Stitching: identifiers seen together belong to one person; merges are transitive, bounded by guardrails.
//!
//! [`graph`] is the merge logic over an abstract [`GraphStore`], free of IO so that it can be
//! property-tested (its `split` module undoes merges); [`rules`] holds the guardrails, [`evidence`] what a
//! link keeps, [`changes`] what a batch changed for the output, and [`memory`] the graph in memory that
//! the tests, the benches and the oracle run on.

pub mod changes;
pub mod evidence;
pub mod graph;
pub mod memory;
pub mod rules;

pub use changes::{BatchChanges, Trigger};
pub use evidence::Evidence;
pub use graph::{Applied, GraphStore, Refusal, Reshape, Split, Stitcher};
pub use memory::MemStore;
pub use rules::{Rule, Rules};
