//! Undoing merges: an identifier found shared is set apart, an erasure or an unlink removes links, and
//! a profile whose links no longer connect it is split into one profile per connected component, each
//! rebuilt from the parts of its identifiers.

use std::collections::{BTreeSet, HashMap, HashSet};

use super::*;

impl Stitcher {
    /// Finds the event's identifiers that have now been seen with more owners than their type allows
    /// (owners in this event, or linked to it before), and sets each apart in a profile of its own,
    /// splitting the profile it was in. True if any was.
    pub(super) fn detect_shared<S: GraphStore>(
        &self,
        store: &mut S,
        ids: &[Identifier],
        ev: &Event,
        reshape: &mut Reshape,
    ) -> Result<bool, S::Error> {
        let owners: Vec<&Identifier> = ids.iter().filter(|i| self.rules.is_owner(i)).collect();
        if owners.is_empty() {
            return Ok(false);
        }
        let mut found = false;
        for x in ids {
            let Some(limit) = self.rules.shared_limit(x) else {
                continue;
            };
            // Looked up afresh: setting another identifier of this event apart may have moved this one.
            let node = store.node_of(x)?;
            let mut seen: BTreeSet<Identifier> = owners.iter().map(|o| (*o).clone()).collect();
            if let Some(n) = node {
                if store.seal(n)?.is_some_and(|s| s.shared) {
                    continue;
                }
                seen.extend(
                    store
                        .links(x)?
                        .into_iter()
                        .map(|(y, _)| y)
                        .filter(|y| self.rules.is_owner(y)),
                );
            }
            if seen.len() > limit {
                self.quarantine(store, x, node, ev, reshape)?;
                found = true;
            }
        }
        Ok(found)
    }

    /// Moves a shared identifier out of its profile (which is split along its remaining links) into a
    /// profile of its own that never merges.
    fn quarantine<S: GraphStore>(
        &self,
        store: &mut S,
        x: &Identifier,
        node: Option<NodeId>,
        ev: &Event,
        reshape: &mut Reshape,
    ) -> Result<(), S::Error> {
        let mut seen = Seen::at(ev.timestamp);
        let mut version = 1;
        if let Some(n) = node {
            if let Some(profile) = store.take_profile(n)? {
                if let Some(s) = profile.identifiers.get(x) {
                    seen = *s;
                }
                version = profile.version + 1;
                for (y, _) in store.links(x)? {
                    store.remove_link(x, &y);
                }
                self.split(store, n, profile, std::slice::from_ref(x), false, reshape)?;
            }
        }
        let q = store.allocate_node()?;
        let mut own = Profile::empty();
        if let Some(part) = store.take_part(x)? {
            own.absorb(Profile::clone(&part));
            store.put_part(x, part);
        }
        own.identifiers.insert(x.clone(), seen);
        fill_anchor(&mut own);
        own.shared = true;
        own.version = version;
        store.set_node(x, q);
        let id = own.id();
        store.remove_redirect(&id);
        store.index(&id, q);
        store.put_profile(q, Box::new(own));
        reshape.quarantined.push(q);
        Ok(())
    }

    /// Recomputes a profile whose identifiers `removed` are gone (or one of whose links is): one profile per
    /// connected component of the remaining links, each the join of its identifiers' parts. The component
    /// that keeps the old public id (or else the largest) keeps the node. Retired ids go to the piece where
    /// they can come back; with `purge` (erasure) those leading to no piece left are ended.
    fn split<S: GraphStore>(
        &self,
        store: &mut S,
        node: NodeId,
        profile: Box<Profile>,
        removed: &[Identifier],
        purge: bool,
        reshape: &mut Reshape,
    ) -> Result<(), S::Error> {
        let old_id = profile.id();
        let version = profile.version + 1;
        let remaining: BTreeSet<&Identifier> = profile
            .identifiers
            .keys()
            .filter(|id| !removed.contains(id))
            .collect();
        let components = components(store, &remaining)?;
        if components.len() == 1 && removed.is_empty() {
            // Still one piece: nothing changes.
            store.put_profile(node, profile);
            return Ok(());
        }
        store.unindex(&old_id);
        let tree = redirect_tree(store, &old_id)?;
        // The ids that could come back, each with the piece holding its return identifier; wanted only
        // when retired ids lead here.
        let mut returns: HashMap<ProfileId, usize> = HashMap::new();
        let mut pieces: Vec<Profile> = Vec::with_capacity(components.len());
        for component in &components {
            let mut piece = Profile::empty();
            for id in component {
                let part = store.take_part(id)?;
                if !tree.is_empty() {
                    returns.insert(return_id(id, part.as_deref()), pieces.len());
                }
                if let Some(part) = part {
                    piece.absorb(Profile::clone(&part));
                    store.put_part(id, part);
                }
                if let Some(seen) = profile.identifiers.get(id) {
                    piece.identifiers.insert(id.clone(), *seen);
                }
            }
            piece.shared = profile.shared;
            piece.version = version;
            fill_anchor(&mut piece);
            pieces.push(piece);
        }
        // The removed identifiers count as one more piece: one set apart gets a profile of its own, where
        // its return id comes back; an erased one takes the ids that would come back with it (its
        // part is gone: they are the ids of its sighting) and those leading to them.
        let gone = pieces.len();
        if !tree.is_empty() {
            for id in removed {
                let part = store.take_part(id)?;
                returns.insert(return_id(id, part.as_deref()), gone);
                if let Some(part) = part {
                    store.put_part(id, part);
                }
            }
        }
        // The piece that keeps the node: the one that kept the public id, else the largest.
        let piece_ids: Vec<ProfileId> = pieces.iter().map(Profile::id).collect();
        let kept_id = piece_ids.contains(&old_id);
        let keeper = piece_ids.iter().position(|p| *p == old_id).or_else(|| {
            (0..pieces.len()).max_by_key(|i| (pieces[*i].identifiers.len(), usize::MAX - i))
        });
        let keeper_id = keeper.map(|k| piece_ids[k].clone());
        let mut into = Vec::with_capacity(pieces.len());
        for (i, piece) in pieces.into_iter().enumerate() {
            let n = if Some(i) == keeper {
                node
            } else {
                store.allocate_node()?
            };
            if n != node {
                for id in piece.identifiers.keys() {
                    store.set_node(id, n);
                }
            }
            let id = &piece_ids[i];
            // An id that comes back (it was retired by a merge) no longer redirects anywhere.
            store.remove_redirect(id);
            store.index(id, n);
            store.put_profile(n, Box::new(piece));
            into.push(n);
        }
        // Where the old id leads after the split: where it comes back, else the largest piece unless
        // it is erased.
        let leads = match returns.get(&old_id) {
            Some(piece) => Some(*piece),
            None if purge => None,
            None => keeper,
        };
        for (from, lead, moved) in send_home(&tree, &returns, &old_id, leads) {
            match lead {
                // An erasure ends the ids that lead to no piece left: to the erased old id, or to an
                // erased identifier.
                _ if purge && lead.is_none_or(|p| p == gone) => {
                    end_id(store, from, version, reshape)
                }
                // One that comes back set apart is made live by the caller.
                Some(p) if p != gone && moved && from != piece_ids[p] => {
                    store.redirect(&from, &piece_ids[p]);
                    reshape.retired.push((from, into[p]));
                }
                _ => {}
            }
        }
        match keeper {
            None => {
                store.delete_profile(node);
                retire_erased(store, &old_id, version, reshape);
            }
            Some(_) if kept_id => {}
            Some(_) if purge => retire_erased(store, &old_id, version, reshape),
            Some(_) => {
                // Not an erasure: the old id continues as the largest piece.
                if let Some(to) = &keeper_id {
                    store.redirect(&old_id, to);
                    reshape.retired.push((old_id.clone(), node));
                }
            }
        }
        reshape.splits.push(Split { from: old_id, into });
        Ok(())
    }

    /// Erases an identifier: its node entry, links and part are removed and its profile is recomputed
    /// without it (and split if it held the profile together).
    pub fn erase_identifier<S: GraphStore>(
        &self,
        store: &mut S,
        x: &Identifier,
    ) -> Result<Reshape, S::Error> {
        let mut reshape = Reshape::default();
        let Some(node) = store.node_of(x)? else {
            return Ok(reshape);
        };
        for (y, _) in store.links(x)? {
            store.remove_link(x, &y);
        }
        store.delete_part(x);
        store.remove_identifier(x);
        reshape.identifiers_erased += 1;
        if let Some(profile) = store.take_profile(node)? {
            self.split(
                store,
                node,
                profile,
                std::slice::from_ref(x),
                true,
                &mut reshape,
            )?;
        }
        Ok(reshape)
    }

    /// Erases a whole profile, found by its public id (redirects followed): every identifier, link and
    /// part, the profile, and the ids leading to it (through chains too).
    pub fn erase_profile<S: GraphStore>(
        &self,
        store: &mut S,
        id: &ProfileId,
    ) -> Result<Reshape, S::Error> {
        let mut reshape = Reshape::default();
        let Some((live, node)) = resolve_profile_id(store, id)? else {
            return Ok(reshape);
        };
        let mut version = 1;
        if let Some(profile) = store.take_profile(node)? {
            version = profile.version + 1;
            for x in profile.identifiers.keys() {
                for (y, _) in store.links(x)? {
                    store.remove_link(x, &y);
                }
                store.delete_part(x);
                store.remove_identifier(x);
                reshape.identifiers_erased += 1;
            }
        }
        store.delete_profile(node);
        for (from, _) in redirect_tree(store, &live)? {
            end_id(store, from, version, &mut reshape);
        }
        retire_erased(store, &live, version, &mut reshape);
        Ok(reshape)
    }

    /// Removes the link between two identifiers of one profile and splits the profile if nothing else
    /// holds it together. Later events that carry both identifiers link them again.
    pub fn unlink<S: GraphStore>(
        &self,
        store: &mut S,
        a: &Identifier,
        b: &Identifier,
    ) -> Result<Reshape, S::Error> {
        let mut reshape = Reshape::default();
        let (Some(na), Some(nb)) = (store.node_of(a)?, store.node_of(b)?) else {
            return Ok(reshape);
        };
        if na != nb {
            return Ok(reshape);
        }
        reshape.links_removed += 1;
        store.remove_link(a, b);
        if let Some(profile) = store.take_profile(na)? {
            self.split(store, na, profile, &[], false, &mut reshape)?;
        }
        Ok(reshape)
    }
}

/// A live id that stops existing at `version`: a tombstone.
fn retire_erased<S: GraphStore>(
    store: &mut S,
    id: &ProfileId,
    version: u64,
    reshape: &mut Reshape,
) {
    store.unindex(id);
    reshape.erased.push((id.clone(), version));
}

/// A retired id that stops existing at `version` (it led to an erased profile or identifier): a
/// tombstone, and it no longer redirects.
fn end_id<S: GraphStore>(store: &mut S, id: ProfileId, version: u64, reshape: &mut Reshape) {
    store.remove_redirect(&id);
    reshape.erased.push((id, version));
}

/// Where each retired id of a split profile's redirect `tree` (each with where it redirects, parents
/// first) leads after the split, and whether it must move there: an id that can come back (`returns`)
/// goes to the piece holding its return identifier, the others follow the id they redirect to (the old
/// id leads to piece `leads`).
fn send_home(
    tree: &[(ProfileId, ProfileId)],
    returns: &HashMap<ProfileId, usize>,
    old_id: &ProfileId,
    leads: Option<usize>,
) -> Vec<(ProfileId, Option<usize>, bool)> {
    let mut lead: HashMap<&ProfileId, Option<usize>> = HashMap::from([(old_id, leads)]);
    let mut out = Vec::with_capacity(tree.len());
    for (from, to) in tree {
        let parent = lead.get(to).copied().flatten();
        let own = returns.get(from).copied();
        let here = own.or(parent);
        lead.insert(from, here);
        out.push((from.clone(), here, here != parent));
    }
    out
}

/// The retired ids that lead to `live`, directly or through a chain, each with where it redirects;
/// parents before children.
pub fn redirect_tree<S: GraphStore>(
    store: &mut S,
    live: &ProfileId,
) -> Result<Vec<(ProfileId, ProfileId)>, S::Error> {
    let mut out = Vec::new();
    let mut queue = vec![live.clone()];
    let mut done = HashSet::new();
    while let Some(to) = queue.pop() {
        if !done.insert(to.clone()) {
            continue;
        }
        for from in store.redirects_to(&to)? {
            out.push((from.clone(), to.clone()));
            queue.push(from);
        }
    }
    Ok(out)
}

/// Connected components of `ids` over their links (links to identifiers outside `ids` are ignored), in a
/// deterministic order.
fn components<S: GraphStore>(
    store: &mut S,
    ids: &BTreeSet<&Identifier>,
) -> Result<Vec<Vec<Identifier>>, S::Error> {
    let mut done: HashSet<&Identifier> = HashSet::with_capacity(ids.len());
    let mut out = Vec::new();
    for &start in ids {
        if !done.insert(start) {
            continue;
        }
        let mut component = vec![start.clone()];
        let mut queue = vec![start.clone()];
        while let Some(x) = queue.pop() {
            for (y, _) in store.links(&x)? {
                if let Some(&y) = ids.get(&y) {
                    if done.insert(y) {
                        component.push(y.clone());
                        queue.push(y.clone());
                    }
                }
            }
        }
        component.sort();
        out.push(component);
    }
    Ok(out)
}

/// A profile rebuilt from parts that carried no event (all its events were anchored on identifiers now
/// gone) still needs a stable anchor: its earliest identifier sighting. Its `seen` stays empty; the
/// output shows the identifiers' times instead.
fn fill_anchor(p: &mut Profile) {
    if p.has_events() {
        return;
    }
    if let Some((id, seen)) = p.identifiers.iter().min_by_key(|(id, s)| (s.first, *id)) {
        p.anchor = (seen.first, identifier_anchor(id));
    }
}

/// The anchor of a profile without events whose earliest sighting is `id`'s.
fn identifier_anchor(id: &Identifier) -> String {
    format!("identifier:{id}")
}

/// The retired id that could come back in a profile holding `id` (with its `part`): the id of the part's
/// anchor, or of `id`'s sighting for a part without events. A profile's anchor is the smallest of its
/// identifiers' part anchors, so an id can be live only where its return identifier is.
fn return_id(id: &Identifier, part: Option<&Profile>) -> ProfileId {
    match part {
        Some(p) if p.has_events() => p.id(),
        _ => ProfileId::from_anchor(&identifier_anchor(id)),
    }
}
