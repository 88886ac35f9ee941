//! Guardrails: limits that stop a shared device or a typo'd identifier from gluing strangers together.

use std::collections::BTreeMap;

use crate::config::GuardrailConfig;
use crate::model::{base_kind, Identifier};
use crate::profile::Profile;

/// Why a link was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rule {
    /// A profile would hold more than `limit` values of this type.
    TypeLimit { kind: String, limit: usize },
    /// A profile would hold more identifiers than the maximum profile size.
    ProfileSize { limit: usize },
    /// The person refused cross-channel identification.
    Consent,
    /// The identifier is shared by more people than its type allows (a family tablet, a shop's till).
    Shared,
}

impl Rule {
    pub fn name(&self) -> &'static str {
        match self {
            Rule::TypeLimit { .. } => "type_limit",
            Rule::ProfileSize { .. } => "profile_size",
            Rule::Consent => "consent",
            Rule::Shared => "shared_identifier",
        }
    }
}

/// The compiled guardrail configuration.
#[derive(Debug, Clone)]
pub struct Rules {
    limits: BTreeMap<String, usize>,
    max_identifiers: usize,
    priority: Vec<String>,
    shared_limits: BTreeMap<String, usize>,
    owner_types: Vec<String>,
}

impl Rules {
    /// The configuration's rules; a limit of 0 is none.
    pub fn new(cfg: &GuardrailConfig) -> Self {
        let set = |limits: &BTreeMap<String, usize>| {
            limits
                .iter()
                .filter(|(_, limit)| **limit > 0)
                .map(|(kind, limit)| (kind.clone(), *limit))
                .collect()
        };
        Self {
            limits: set(&cfg.limits),
            max_identifiers: cfg.max_profile_identifiers,
            priority: cfg.priority.clone(),
            shared_limits: set(&cfg.shared_limits),
            owner_types: cfg.owner_types.clone(),
        }
    }

    /// No limits at all: pure connected components (the oracle's view).
    pub fn unlimited() -> Self {
        Self {
            limits: BTreeMap::new(),
            max_identifiers: usize::MAX,
            priority: Vec::new(),
            shared_limits: BTreeMap::new(),
            owner_types: Vec::new(),
        }
    }

    /// Only shared-identifier detection, no limits: what the property tests of splitting use.
    pub fn shared_only(shared_limits: BTreeMap<String, usize>, owner_types: Vec<String>) -> Self {
        Self {
            shared_limits,
            owner_types,
            ..Self::unlimited()
        }
    }

    /// How many distinct owners an identifier of this type may be seen with before it counts as shared.
    pub fn shared_limit(&self, id: &Identifier) -> Option<usize> {
        self.shared_limits.get(id.base_kind()).copied()
    }

    /// Whether the identifier names one person (what shared limits count).
    pub fn is_owner(&self, id: &Identifier) -> bool {
        self.owner_types.iter().any(|t| t == id.base_kind())
    }

    /// Rank of a type: lower is more trusted; unlisted types come last, ordered by name.
    pub fn rank(&self, kind: &str) -> usize {
        let kind = base_kind(kind);
        self.priority
            .iter()
            .position(|p| p == kind)
            .unwrap_or(self.priority.len())
    }

    /// Sort key of an identifier by trust.
    pub fn trust_key<'a>(&self, id: &'a Identifier) -> (usize, &'a str, &'a str) {
        (self.rank(&id.kind), id.kind.as_str(), id.value.as_str())
    }

    /// Can `a` and `b` become one profile?
    pub fn check_merge(&self, a: &Profile, b: &Profile) -> Result<(), Rule> {
        let shared = a
            .identifiers
            .keys()
            .filter(|id| b.identifiers.contains_key(*id))
            .count();
        let total = a.identifiers.len() + b.identifiers.len() - shared;
        if total > self.max_identifiers {
            return Err(Rule::ProfileSize {
                limit: self.max_identifiers,
            });
        }
        if self.limits.is_empty() {
            return Ok(());
        }
        let mut counts = a.type_counts();
        for id in b.identifiers.keys() {
            if !a.identifiers.contains_key(id) {
                *counts.entry(id.base_kind()).or_insert(0) += 1;
            }
        }
        for (kind, n) in counts {
            if let Some(&limit) = self.limits.get(kind) {
                if n > limit {
                    return Err(Rule::TypeLimit {
                        kind: kind.to_string(),
                        limit,
                    });
                }
            }
        }
        Ok(())
    }

    /// Can `id` be added to a profile whose identifiers of each type are counted in `counts`, `total` in all?
    pub fn check_add(
        &self,
        counts: &BTreeMap<&str, usize>,
        total: usize,
        id: &Identifier,
    ) -> Result<(), Rule> {
        if total + 1 > self.max_identifiers {
            return Err(Rule::ProfileSize {
                limit: self.max_identifiers,
            });
        }
        if let Some(&limit) = self.limits.get(id.base_kind()) {
            if counts.get(id.base_kind()).copied().unwrap_or(0) + 1 > limit {
                return Err(Rule::TypeLimit {
                    kind: id.base_kind().to_string(),
                    limit,
                });
            }
        }
        Ok(())
    }

    /// Does the profile break any limit? (Used by property tests and the quality report.)
    pub fn violation(&self, p: &Profile) -> Option<Rule> {
        if p.identifiers.len() > self.max_identifiers {
            return Some(Rule::ProfileSize {
                limit: self.max_identifiers,
            });
        }
        p.type_counts()
            .into_iter()
            .find_map(|(kind, n)| match self.limits.get(kind) {
                Some(&limit) if n > limit => Some(Rule::TypeLimit {
                    kind: kind.to_string(),
                    limit,
                }),
                _ => None,
            })
    }
}
