//! Commands from the control topic at the owner of what they change: erase an identifier (from its home,
//! which also keeps the suppression list), erase a profile (at every shard), remove a link.

use super::*;

impl<'k, K: Kv + ?Sized> Shard<'_, 'k, K> {
    /// Sends a command for `x` from its home to its owner (`to_owner`). A reserved identifier is being
    /// created: the command waits at the home as it came (`as_came`) and is routed again once the
    /// identifier is placed. An identifier that does not exist has nothing to change.
    fn route_command(
        &mut self,
        x: &Identifier,
        as_came: Msg,
        to_owner: Msg,
        out: &mut Out,
    ) -> Result<(), StoreError> {
        match self.dir(x)? {
            Dir::Owned(s, _) => self.send(out, s, to_owner),
            Dir::Reserved {
                event,
                gen,
                mut waiting,
            } => {
                waiting.push(as_came);
                self.view.set_dir(
                    x,
                    Some(&Dir::Reserved {
                        event,
                        gen,
                        waiting,
                    }),
                )?;
            }
            Dir::Absent(_) => {}
        }
        Ok(())
    }

    /// Whether a command about `x` runs here now. At the home (`at_owner` `None`) it is sent on to the
    /// owner (or waits for a reservation to end); at a shard that no longer holds `x` it follows the
    /// forwarding pointer, or waits for `x` on its way here. `msg` rebuilds the command for where it goes.
    fn command_here(
        &mut self,
        x: &Identifier,
        at_owner: Option<u32>,
        msg: impl Fn(Option<u32>) -> Msg,
        out: &mut Out,
    ) -> Result<bool, StoreError> {
        let Some(after) = at_owner else {
            self.route_command(x, msg(None), msg(Some(0)), out)?;
            return Ok(false);
        };
        if self.here(x)? {
            return Ok(true);
        }
        match self.follow(x, after)? {
            Follow::Forward(u, after) => self.send(out, u, msg(Some(after))),
            Follow::Gone(_) => {}
            Follow::InFlight => self.park(x, msg(Some(after)))?,
        }
        Ok(false)
    }

    pub(super) fn erase(
        &mut self,
        stitcher: &Stitcher,
        x: Identifier,
        at_owner: Option<u32>,
        (trigger, suppress): (String, Option<[u8; 32]>),
        out: &mut Out,
    ) -> Result<(), StoreError> {
        if let (None, Some(hash)) = (at_owner, &suppress) {
            // At the home, where every event carrying x is located: from now on they are stripped of it.
            if !self.view.suppressed(hash)? {
                self.view
                    .set_suppressed(hash, Some(crate::model::now_millis()))?;
            }
        }
        let msg = |at_owner| Msg::Erase {
            x: x.clone(),
            at_owner,
            trigger: trigger.clone(),
            suppress,
        };
        if !self.command_here(&x, at_owner, msg, out)? {
            return Ok(());
        }
        let mut graph = self.graph();
        let reshape = stitcher.erase_identifier(&mut graph, &x)?;
        graph.finish()?;
        out.steps.push(Step::Erase(x.clone(), trigger, reshape));
        self.erased(stitcher, &[x], out)
    }

    pub(super) fn erase_profile(
        &mut self,
        stitcher: &Stitcher,
        id: ProfileId,
        trigger: String,
        out: &mut Out,
    ) -> Result<(), StoreError> {
        let mut graph = self.graph();
        let Some((_, node)) = crate::stitch::graph::resolve_profile_id(&mut graph, &id)? else {
            if let Some(to) = self.view.get::<ShardId>(MOVED_PROFILE, id.0.as_bytes())? {
                out.deferred.push((to, Msg::EraseProfile { id, trigger }));
            }
            return Ok(());
        };
        let ids = graph.view.read().identifiers(node)?;
        let reshape = stitcher.erase_profile(&mut graph, &id)?;
        graph.finish()?;
        out.steps.push(Step::EraseProfile(id, trigger, reshape));
        self.erased(stitcher, &ids, out)
    }

    /// Identifiers erased here: their homes learn it, a fetch that comes for them hears so, and pending
    /// events here that located them start again.
    fn erased(
        &mut self,
        stitcher: &Stitcher,
        ids: &[Identifier],
        out: &mut Out,
    ) -> Result<(), StoreError> {
        // With one shard, what waited on a reservation of one of them is handled once every entry is
        // written: a `Locate` let go by the first would otherwise find the next out of the graph with no
        // entry yet, and take it for never placed.
        let mut released = Vec::new();
        for x in ids {
            let gen = self.view.take_gen(x)?;
            self.view.set_moved(x, Some(&Moved::Erased(gen)))?;
            if self.shards == 1 {
                // Its home is here, and with one shard the entry is written in the step that takes `x`
                // out of the graph (docs/DESIGN.md, "One shard: the graph is the directory").
                released.extend(self.own_entry(x, None, gen + 1)?);
            } else {
                self.tell_home_erased(out, x, gen);
            }
        }
        for msg in released {
            self.handle(stitcher, msg, out)?;
        }
        let events = self.waiting_on_any(ids)?;
        for e in events {
            self.restart(stitcher, &e, None, out)?;
        }
        Ok(())
    }

    pub(super) fn unlink(
        &mut self,
        stitcher: &Stitcher,
        (a, b): (Identifier, Identifier),
        at_owner: Option<u32>,
        trigger: String,
        out: &mut Out,
    ) -> Result<(), StoreError> {
        let msg = |at_owner| Msg::Unlink {
            a: a.clone(),
            b: b.clone(),
            at_owner,
            trigger: trigger.clone(),
        };
        if !self.command_here(&a, at_owner, msg, out)? {
            return Ok(());
        }
        let mut graph = self.graph();
        let reshape = stitcher.unlink(&mut graph, &a, &b)?;
        graph.finish()?;
        out.steps.push(Step::Unlink(a, b, trigger, reshape));
        Ok(())
    }
}
