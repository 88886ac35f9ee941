//! Components moving between shards: a `Fetch` takes a whole component out of its owner's graph (or
//! follows the forwarding pointer it left, or parks until it arrives), a `Component` puts it into the
//! target's graph and tells the homes of its identifiers where it is now.

use super::*;

impl<'k, K: Kv + ?Sized> Shard<'_, 'k, K> {
    /// The highest-priority pending event here that needs the component of node `node`.
    fn holder(&self, node: NodeId) -> Result<Option<String>, StoreError> {
        let ids = self.view.read().identifiers(node)?;
        Ok(self.waiting_on_any(&ids)?.into_iter().next())
    }

    pub(super) fn fetch(
        &mut self,
        stitcher: &Stitcher,
        x: Identifier,
        to: ShardId,
        event: String,
        after: u32,
        out: &mut Out,
    ) -> Result<(), StoreError> {
        if let Some(node) = self.node_of(&x)? {
            if to == self.id() {
                // Fetched by this shard for itself and here now (created here by another event since it
                // was located elsewhere): the events waiting for it go on.
                return self.present(stitcher, &[x], out);
            }
            if let Some(h) = self.holder(node)?.filter(|h| h.as_str() < event.as_str()) {
                let msg = Msg::Fetch {
                    x,
                    to,
                    event,
                    after,
                };
                return self.park_behind(&h, msg);
            }
            let Some(piece) = self.take_component(node)? else {
                return Ok(());
            };
            let moved: Vec<Identifier> = piece.members.iter().map(|m| m.id.clone()).collect();
            for m in &piece.members {
                self.view.set_moved(&m.id, Some(&Moved::To(to, m.gen)))?;
            }
            let live = piece.profile.id();
            for pid in std::iter::once(&live).chain(piece.redirects.iter().map(|(from, _)| from)) {
                self.view.put(MOVED_PROFILE, pid.0.as_bytes(), Some(&to))?;
            }
            out.departed.push((node, Profile::clone(&piece.profile)));
            self.send(
                out,
                to,
                Msg::Component {
                    from: (self.id(), node),
                    piece: Box::new(piece),
                },
            );
            // Pending events here that needed the component lose it: they fetch it again from `to`, and
            // the fetches parked behind them follow it.
            let losers = self.waiting_on_any(&moved)?;
            for e in &losers {
                let Some(mut p) = self.pending(e)? else {
                    continue;
                };
                let lost: Vec<Identifier> =
                    moved.iter().filter(|y| p.waits_on(y)).cloned().collect();
                p.missing.extend(lost.iter().cloned());
                self.put_pending(e, &p)?;
                for y in lost {
                    let msg = Msg::Fetch {
                        x: y,
                        to: self.id(),
                        event: e.clone(),
                        after: 0,
                    };
                    self.send(out, to, msg);
                }
            }
            for e in &losers {
                self.retry_behind(stitcher, e, out)?;
            }
            return Ok(());
        }
        match self.follow(&x, after)? {
            Follow::Forward(u, after) => {
                let msg = Msg::Fetch {
                    x,
                    to,
                    event,
                    after,
                };
                self.send(out, u, msg);
                Ok(())
            }
            // The home is told again first, as in `gather`: the requester's next `Locate` finds it told.
            Follow::Gone(gen) => {
                self.tell_home_erased(out, &x, gen);
                self.send(out, to, Msg::Gone { x, event });
                Ok(())
            }
            // On its way here: parked until it arrives (the arrival releases its requester if that is
            // this shard).
            Follow::InFlight if to != self.id() => {
                let msg = Msg::Fetch {
                    x: x.clone(),
                    to,
                    event,
                    after,
                };
                self.park(&x, msg)
            }
            Follow::InFlight => Ok(()),
        }
    }

    /// Where to look for `x`, which is not here, having come here by a pointer saying it was placed here
    /// at gen `after` or later: a forwarding pointer at least as recent leads on; an older one (or none)
    /// means it is on its way here; an erasure at least as recent means it is gone.
    pub(super) fn follow(&self, x: &Identifier, after: u32) -> Result<Follow, StoreError> {
        Ok(match self.moved(x)? {
            Some(Moved::To(u, gen)) if gen >= after && u != self.id() => {
                Follow::Forward(u, gen + 1)
            }
            Some(Moved::Erased(gen)) if gen >= after => Follow::Gone(gen),
            _ => Follow::InFlight,
        })
    }

    /// Removes the whole component of `node` from the graph.
    fn take_component(&mut self, node: NodeId) -> Result<Option<Piece>, StoreError> {
        let mut graph = self.graph();
        let Some(profile) = graph.take_profile(node)? else {
            return Ok(None);
        };
        let mut members = Vec::with_capacity(profile.identifiers.len());
        for id in profile.identifiers.keys() {
            graph.remove_identifier(id);
            let part = graph.take_part(id)?;
            let links = graph.view.take_links(id)?;
            let gen = graph.view.take_gen(id)?;
            members.push(Member {
                id: id.clone(),
                links,
                part,
                gen,
            });
        }
        let live = profile.id();
        graph.unindex(&live);
        let redirects = crate::stitch::graph::redirect_tree(&mut graph, &live)?;
        for (from, _) in &redirects {
            graph.remove_redirect(from);
        }
        graph.finish()?;
        Ok(Some(Piece {
            profile,
            members,
            redirects,
        }))
    }

    /// Puts a component into the graph under a new node; its identifiers' homes learn where it is.
    fn put_component(&mut self, piece: Piece, out: &mut Out) -> Result<NodeId, StoreError> {
        let (id, shards) = (self.id(), self.shards);
        let mut graph = self.graph();
        let node = graph.allocate_node()?;
        let live = piece.profile.id();
        for m in piece.members {
            graph.set_node(&m.id, node);
            graph.view.put_links(&m.id, &m.links)?;
            if let Some(part) = m.part {
                graph.put_part(&m.id, part);
            }
            let gen = m.gen + 1;
            graph.view.set_gen(&m.id, gen)?;
            graph.view.clear_moved::<Moved>(&m.id)?;
            let to = home(&m.id, shards);
            out.msgs.push((
                to,
                Msg::Own {
                    x: m.id,
                    owner: Some(id),
                    gen,
                },
            ));
        }
        for (from, to) in piece.redirects {
            graph
                .view
                .put::<ShardId>(MOVED_PROFILE, from.0.as_bytes(), None)?;
            graph.view.put_redirect(&from, &to)?;
        }
        graph
            .view
            .put::<ShardId>(MOVED_PROFILE, live.0.as_bytes(), None)?;
        graph.index(&live, node);
        graph.put_profile(node, piece.profile);
        graph.finish()?;
        Ok(node)
    }

    pub(super) fn component(
        &mut self,
        stitcher: &Stitcher,
        from: (ShardId, NodeId),
        piece: Piece,
        out: &mut Out,
    ) -> Result<(), StoreError> {
        let members: Vec<Identifier> = piece.members.iter().map(|m| m.id.clone()).collect();
        let node = self.put_component(piece, out)?;
        out.arrived.push((from, node));
        self.present(stitcher, &members, out)?;
        // Fetches and commands parked until the component arrived.
        self.retry_parked(stitcher, &members, out)
    }
}
