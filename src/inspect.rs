//! Why a profile is what it is: its identifiers, the links between them with their evidence, the events
//! each anchors, the ids merged into it. Printed by `stitcher inspect` and served by
//! `GET /v1/identifiers/{type}/{value}/explain` for the call-centre agent who must see everything at once.

use serde::Serialize;

use crate::codec::update::ProfileRecord;
use crate::model::{Identifier, NodeId, ProfileId};
use crate::profile::{Enrichment, Profile};
use crate::stitch::Evidence;
use crate::store::StoreError;

/// Committed graph state, read for lookups and explanations: one shard of the local copy.
pub trait GraphRead {
    fn profile(&self, node: NodeId) -> Result<Option<Profile>, StoreError>;
    fn links(&self, id: &Identifier) -> Result<Vec<(Identifier, Evidence)>, StoreError>;
    fn part(&self, id: &Identifier) -> Result<Option<Profile>, StoreError>;
    /// Retired ids redirecting to `id`.
    fn redirects_to(&self, id: &ProfileId) -> Result<Vec<ProfileId>, StoreError>;
}

/// Everything known about one profile, and why: what `inspect` prints.
#[derive(Debug, Serialize)]
pub struct Inspection {
    pub profile_id: String,
    /// Internal node; identifiers point at it.
    pub node: u64,
    /// The profile of one shared identifier (it never merges).
    pub shared: bool,
    /// Set while the person refuses cross-channel identification: the channel the profile is sealed to.
    pub sealed_to: Option<String>,
    /// Ids of profiles merged into this one that still redirect here.
    pub merged_ids: Vec<String>,
    pub identifiers: Vec<InspectedIdentifier>,
    pub profile: ProfileRecord,
}

#[derive(Debug, Serialize)]
pub struct InspectedIdentifier {
    #[serde(rename = "type")]
    pub kind: String,
    pub value: String,
    pub first_seen: i64,
    pub last_seen: i64,
    /// Events whose most trusted identifier this is (they split with it).
    pub events_anchored: u64,
    /// The identifiers it was seen with, and the evidence.
    pub links: Vec<InspectedLink>,
}

#[derive(Debug, Serialize)]
pub struct InspectedLink {
    #[serde(rename = "type")]
    pub kind: String,
    pub value: String,
    /// Events that carried both.
    pub events: u64,
    pub first_event_id: String,
    pub first_channel: String,
    pub first_at: i64,
    pub last_at: i64,
}

/// Builds the inspection of the profile under `node`; `None` if there is none.
pub fn inspection(
    store: &dyn GraphRead,
    node: NodeId,
    cfg: &Enrichment,
) -> Result<Option<Inspection>, StoreError> {
    let Some(profile) = store.profile(node)? else {
        return Ok(None);
    };
    let id = profile.id();
    let mut identifiers = Vec::with_capacity(profile.identifiers.len());
    for (ident, seen) in &profile.identifiers {
        let links = store
            .links(ident)?
            .into_iter()
            .map(|(other, e)| InspectedLink {
                kind: other.kind,
                value: other.value,
                events: e.events,
                first_event_id: e.first_event,
                first_channel: e.first_channel,
                first_at: e.first_at,
                last_at: e.last_at,
            })
            .collect();
        identifiers.push(InspectedIdentifier {
            kind: ident.kind.clone(),
            value: ident.value.clone(),
            first_seen: seen.first,
            last_seen: seen.last,
            events_anchored: store.part(ident)?.map_or(0, |p| p.events),
            links,
        });
    }
    Ok(Some(Inspection {
        profile_id: id.to_string(),
        node: node.0,
        shared: profile.shared,
        sealed_to: profile.sealed_to().map(str::to_string),
        merged_ids: store
            .redirects_to(&id)?
            .into_iter()
            .map(|p| p.to_string())
            .collect(),
        identifiers,
        profile: ProfileRecord::new(&profile, cfg),
    }))
}
