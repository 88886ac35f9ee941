use std::collections::{BTreeMap, HashMap};

use super::*;
use crate::config::GuardrailConfig;
use crate::stitch::{BatchChanges, MemStore};
use proptest::prelude::*;

fn ev(n: u32, ts: i64, ids: &[(&str, String)]) -> Event {
    let channel = ["web", "app", "pos", "email"][n as usize % 4];
    let ids = ids
        .iter()
        .map(|(k, v)| Identifier::new(*k, v.clone()))
        .collect();
    Event::new(format!("e{n}"), channel, "page_view", ts, ids)
}

fn run(stitcher: &Stitcher, events: &[Event]) -> MemStore {
    let mut store = MemStore::default();
    for e in events {
        let _ = stitcher.apply(&mut store, e);
    }
    store
}

/// The graph as a canonical value: each profile's identifier set, with the profile itself, without its
/// version (which counts identity changes, so depends on the order).
fn canonical(store: &MemStore) -> BTreeMap<ProfileId, Profile> {
    store
        .by_public_id()
        .into_iter()
        .map(|(k, v)| {
            let mut v = v.clone();
            v.version = 0;
            (k, v)
        })
        .collect()
}

#[test]
fn transitive_merge_keeps_oldest_id_and_redirects() {
    let s = Stitcher::new(Rules::unlimited());
    let mut store = MemStore::default();
    let a = ev(1, 100, &[("anonymous_id", "c1".into())]);
    let b = ev(2, 50, &[("email", "x@y.io".into())]);
    let c = ev(
        3,
        200,
        &[("anonymous_id", "c1".into()), ("email", "x@y.io".into())],
    );
    s.apply(&mut store, &a).unwrap();
    s.apply(&mut store, &b).unwrap();
    let applied = s.apply(&mut store, &c).unwrap().unwrap();
    assert_eq!(store.profiles.len(), 1);
    let p = store.profiles.values().next().unwrap();
    assert_eq!(p.id(), ProfileId::from_anchor("e2"));
    assert_eq!(applied.retired, vec![ProfileId::from_anchor("e1")]);
    assert_eq!(
        store.redirects[&ProfileId::from_anchor("e1")],
        ProfileId::from_anchor("e2")
    );
    assert_eq!(p.events, 3);
    assert!(
        s.apply(&mut store, &c).unwrap().is_none(),
        "a repeated event changes nothing"
    );
}

#[test]
fn type_limit_refuses_merge_and_keeps_event_in_best_profile() {
    let s = Stitcher::new(Rules::new(&GuardrailConfig::default()));
    let mut store = MemStore::default();
    s.apply(
        &mut store,
        &ev(
            1,
            1,
            &[("customer_id", "A".into()), ("device_id", "tablet".into())],
        ),
    )
    .unwrap();
    s.apply(&mut store, &ev(2, 2, &[("customer_id", "B".into())]))
        .unwrap();
    let applied = s
        .apply(
            &mut store,
            &ev(
                3,
                3,
                &[("customer_id", "B".into()), ("device_id", "tablet".into())],
            ),
        )
        .unwrap();
    let applied = applied.unwrap();
    assert_eq!(store.profiles.len(), 2);
    assert_eq!(applied.refused.len(), 1);
    assert_eq!(
        applied.refused[0].rule,
        Rule::TypeLimit {
            kind: "customer_id".into(),
            limit: 1
        }
    );
    // The event landed in B's profile (customer_id is the most trusted type).
    let b = &store.profiles[&applied.node];
    assert!(b
        .identifiers
        .contains_key(&Identifier::new("customer_id", "B")));
    assert_eq!(b.events, 2);
}

#[test]
fn batch_changes_coalesce_chains() {
    let s = Stitcher::new(Rules::unlimited());
    let mut store = MemStore::default();
    let mut batch = BatchChanges::default();
    let events = [
        ev(1, 30, &[("anonymous_id", "a".into())]),
        ev(2, 20, &[("anonymous_id", "b".into())]),
        ev(3, 10, &[("anonymous_id", "c".into())]),
        ev(
            4,
            40,
            &[("anonymous_id", "a".into()), ("anonymous_id", "b".into())],
        ),
        ev(
            5,
            50,
            &[("anonymous_id", "b".into()), ("anonymous_id", "c".into())],
        ),
    ];
    for e in &events {
        let applied = s.apply(&mut store, e).unwrap().unwrap();
        batch.record(e, applied);
    }
    let updates = batch.updates();
    assert_eq!(updates.len(), 1);
    let mut from = updates[0].merged_from.clone();
    from.sort();
    let mut want = vec![ProfileId::from_anchor("e1"), ProfileId::from_anchor("e2")];
    want.sort();
    assert_eq!(from, want);
    assert_eq!(updates[0].trigger.id, "e5");
    assert_eq!(updates[0].identity, ["create", "merge"]);
}

/// Cases per property: 300 in CI; `PROPTEST_CASES=20000` for a soak run.
fn cases() -> u32 {
    crate::env_or("PROPTEST_CASES", 300)
}

/// Events over a small universe of identifiers so that merges are frequent.
fn arb_events() -> impl Strategy<Value = Vec<Event>> {
    let id = (0usize..4, 0u8..12).prop_map(|(k, v)| {
        let kind = ["anonymous_id", "email", "device_id", "customer_id"][k];
        (kind, format!("{kind}-{v}"))
    });
    prop::collection::vec((prop::collection::vec(id, 1..4), 0i64..1000), 1..40).prop_map(|evs| {
        evs.into_iter()
            .enumerate()
            .map(|(i, (ids, ts))| ev(i as u32, ts, &ids))
            .collect()
    })
}

/// A stitcher that also computes the ground truth's traits (`journeys::TRUTH_TRAITS`), so that the
/// property tests' profile comparisons cover the story and computed traits too.
fn enriched(rules: Rules) -> Stitcher {
    let cfg: crate::config::Config = toml::from_str(crate::journeys::TRUTH_TRAITS).expect("traits");
    Stitcher::new(rules).with_enrichment(Arc::new(cfg.enrichment))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases()))]

    /// Without guardrails, any order and any repetition of the same events gives the same graph and
    /// the same profiles.
    #[test]
    fn order_and_repetition_do_not_matter(
        events in arb_events(),
        seed in any::<u64>(),
        repeats in prop::collection::vec(any::<prop::sample::Index>(), 0..20),
    ) {
        use rand::{seq::SliceRandom, SeedableRng};
        let s = enriched(Rules::unlimited());
        let base = canonical(&run(&s, &events));
        let mut shuffled = events.clone();
        for r in &repeats {
            shuffled.push(r.get(&events).clone());
        }
        shuffled.shuffle(&mut rand::rngs::SmallRng::seed_from_u64(seed));
        let other = run(&s, &shuffled);
        prop_assert_eq!(&base, &canonical(&other));
        // Every identifier points at the profile that holds it.
        for (id, node) in &other.nodes {
            prop_assert!(other.profiles[node].identifiers.contains_key(id));
        }
    }

    /// With guardrails on, no profile ever breaks a limit, whatever the order.
    #[test]
    fn guardrails_always_hold(events in arb_events(), seed in any::<u64>()) {
        use rand::{seq::SliceRandom, SeedableRng};
        let mut cfg = GuardrailConfig::default();
        cfg.limits.insert("email".into(), 2);
        cfg.limits.insert("anonymous_id".into(), 3);
        cfg.max_profile_identifiers = 6;
        let s = Stitcher::new(Rules::new(&cfg));
        let mut shuffled = events.clone();
        shuffled.shuffle(&mut rand::rngs::SmallRng::seed_from_u64(seed));
        let store = run(&s, &shuffled);
        for p in store.profiles.values() {
            prop_assert_eq!(s.rules().violation(p), None);
        }
        for (id, node) in &store.nodes {
            prop_assert!(store.profiles[node].identifiers.contains_key(id));
        }
    }

    /// While a profile id lives, its version never decreases and increases whenever its identifiers
    /// change, under guardrails that merge, refuse, set shared identifiers apart and split, and
    /// erasures. (An id that ended and is made again later starts a new life: its version comes from
    /// the profile it is made of; the proptest regression file holds a case where that is lower.)
    #[test]
    fn versions_increase_with_every_identity_change(
        events in arb_events(),
        seed in any::<u64>(),
    ) {
        use rand::{seq::SliceRandom, SeedableRng};
        let mut cfg = GuardrailConfig::default();
        cfg.limits.insert("email".into(), 2);
        cfg.max_profile_identifiers = 6;
        cfg.shared_limits.insert("device_id".into(), 2);
        let s = Stitcher::new(Rules::new(&cfg));
        let mut shuffled = events.clone();
        shuffled.shuffle(&mut rand::rngs::SmallRng::seed_from_u64(seed));
        let mut store = MemStore::default();
        // Per id: its version and identifiers when last live (None once it stopped existing).
        let mut last: BTreeMap<ProfileId, (u64, Option<BTreeSet<Identifier>>)> = BTreeMap::new();
        for (i, e) in shuffled.iter().enumerate() {
            let _ = s.apply(&mut store, e);
            if i % 7 == 3 {
                if let Some(x) = e.identifiers.first() {
                    let _ = s.erase_identifier(&mut store, x);
                }
            }
            let now: BTreeMap<ProfileId, (u64, BTreeSet<Identifier>)> = store
                .by_public_id()
                .into_iter()
                .map(|(id, p)| (id, (p.version, p.identifiers.keys().cloned().collect())))
                .collect();
            for (id, (v, ids)) in &now {
                if let Some((before, Some(before_ids))) = last.get(id) {
                    prop_assert!(v >= before, "{} went from {} to {}", id, before, v);
                    if before_ids != ids {
                        prop_assert!(v > before, "{} changed at version {}", id, v);
                    }
                }
            }
            for (id, (v, ids)) in now {
                last.insert(id, (v, Some(ids)));
            }
            let live: BTreeSet<ProfileId> = store.by_public_id().into_keys().collect();
            for (id, entry) in last.iter_mut() {
                if !live.contains(id) {
                    entry.1 = None;
                }
            }
        }
    }
}

fn ids(pairs: &[(&str, &str)]) -> Vec<(&'static str, String)> {
    pairs
        .iter()
        .map(|(k, v)| {
            let k: &'static str = match *k {
                "email" => "email",
                "device_id" => "device_id",
                "anonymous_id" => "anonymous_id",
                "customer_id" => "customer_id",
                other => panic!("unknown type {other}"),
            };
            (k, v.to_string())
        })
        .collect()
}

fn node_of(store: &MemStore, kind: &str, value: &str) -> NodeId {
    store.nodes[&Identifier::new(kind, value)]
}

/// A profile and the join of its identifiers' parts must agree on everything but the identifiers.
fn assert_parts_add_up(store: &MemStore) {
    for p in store.profiles.values() {
        if !p.has_events() {
            continue;
        }
        let mut joined = Profile::empty();
        for id in p.identifiers.keys() {
            if let Some(part) = store.parts.get(id) {
                joined.absorb(Profile::clone(part));
            }
        }
        joined.identifiers = p.identifiers.clone();
        joined.shared = p.shared;
        joined.version = p.version;
        if p.anchor.1.starts_with("identifier:") {
            // Rebuilt from parts that had no event: anchored on its earliest identifier for good.
            joined.anchor = p.anchor.clone();
        }
        assert_eq!(&joined, &**p, "profile {} differs from its parts", p.id());
    }
}

#[test]
fn shared_device_is_set_apart_and_the_people_it_glued_split() {
    let cfg = GuardrailConfig {
        shared_limits: BTreeMap::from([("device_id".to_string(), 2)]),
        ..Default::default()
    };
    let s = Stitcher::new(Rules::new(&cfg));
    let mut store = MemStore::default();
    // Three people log in on the same till device; each also has a cookie of their own.
    for (n, who) in ["a", "b"].iter().enumerate() {
        let n = n as u32 * 10;
        let email = format!("{who}@x.io");
        let cookie = format!("c-{who}");
        s.apply(
            &mut store,
            &ev(
                n + 1,
                i64::from(n) + 1,
                &ids(&[("email", &email), ("anonymous_id", &cookie)]),
            ),
        )
        .unwrap();
        s.apply(
            &mut store,
            &ev(
                n + 2,
                i64::from(n) + 2,
                &ids(&[("email", &email), ("device_id", "till")]),
            ),
        )
        .unwrap();
    }
    assert_eq!(
        node_of(&store, "email", "a@x.io"),
        node_of(&store, "email", "b@x.io"),
        "two owners: glued"
    );
    let applied = s
        .apply(
            &mut store,
            &ev(31, 31, &ids(&[("email", "c@x.io"), ("device_id", "till")])),
        )
        .unwrap()
        .unwrap();
    assert_eq!(applied.reshape.quarantined.len(), 1);
    assert_eq!(applied.reshape.splits.len(), 1);
    assert_eq!(applied.refused[0].rule, Rule::Shared);
    let (a, b, c, till) = (
        node_of(&store, "email", "a@x.io"),
        node_of(&store, "email", "b@x.io"),
        node_of(&store, "email", "c@x.io"),
        node_of(&store, "device_id", "till"),
    );
    assert!(a != b && b != c && a != c && till != a);
    assert_eq!(
        store.profiles[&a].identifiers.len(),
        2,
        "a keeps its cookie"
    );
    assert!(store.profiles[&till].shared);
    // The split profiles carry their own events only.
    assert_eq!(store.profiles[&a].events, 2);
    assert_eq!(store.profiles[&b].events, 2);
    assert_parts_add_up(&store);
    // Later events with the till land in the person's profile, not the till's.
    let later = s
        .apply(
            &mut store,
            &ev(
                41,
                41,
                &ids(&[("anonymous_id", "c-a"), ("device_id", "till")]),
            ),
        )
        .unwrap()
        .unwrap();
    assert_eq!(later.node, a);
    // An event with only the till lands in the till's own profile.
    let alone = s
        .apply(&mut store, &ev(42, 42, &ids(&[("device_id", "till")])))
        .unwrap()
        .unwrap();
    assert_eq!(alone.node, till);
    assert_parts_add_up(&store);
    // An event older than the till's profile renames it: the new id finds it, the old one redirects.
    let old_id = store.profiles[&till].id();
    let older = s
        .apply(&mut store, &ev(43, 0, &ids(&[("device_id", "till")])))
        .unwrap()
        .unwrap();
    let new_id = store.profiles[&till].id();
    assert_ne!(new_id, old_id);
    assert_eq!(older.retired, vec![old_id.clone()]);
    assert_eq!(older.identity_changes(), vec!["rename"]);
    for id in [&new_id, &old_id] {
        assert_eq!(
            resolve_profile_id(&mut store, id).unwrap(),
            Some((new_id.clone(), till))
        );
    }
}

#[test]
fn erasing_the_bridge_splits_and_retires_the_id_it_anchored() {
    let s = Stitcher::new(Rules::new(&GuardrailConfig::default()));
    let mut store = MemStore::default();
    s.apply(&mut store, &ev(1, 1, &ids(&[("anonymous_id", "bridge")])))
        .unwrap();
    s.apply(
        &mut store,
        &ev(
            2,
            2,
            &ids(&[("anonymous_id", "bridge"), ("email", "a@x.io")]),
        ),
    )
    .unwrap();
    s.apply(
        &mut store,
        &ev(
            3,
            3,
            &ids(&[("anonymous_id", "bridge"), ("email", "b@x.io")]),
        ),
    )
    .unwrap();
    assert_eq!(store.profiles.len(), 1);
    let before = store.profiles.values().next().unwrap().id();
    assert_eq!(before, ProfileId::from_anchor("e1"));
    let r = s
        .erase_identifier(&mut store, &Identifier::new("anonymous_id", "bridge"))
        .unwrap();
    assert_eq!(r.identifiers_erased, 1);
    assert_eq!(r.splits.len(), 1);
    assert_eq!(r.splits[0].from, before);
    assert_eq!(r.splits[0].into.len(), 2);
    assert_eq!(
        r.erased
            .iter()
            .map(|(id, _)| id.clone())
            .collect::<Vec<_>>(),
        vec![before.clone()],
        "the anchor event was the bridge's: its id goes"
    );
    let mut now: Vec<ProfileId> = store.by_public_id().into_keys().collect();
    now.sort();
    let mut want = vec![ProfileId::from_anchor("e2"), ProfileId::from_anchor("e3")];
    want.sort();
    assert_eq!(now, want);
    assert!(!store
        .nodes
        .contains_key(&Identifier::new("anonymous_id", "bridge")));
    assert!(store.links.values().all(|m| m
        .iter()
        .all(|(y, _)| *y != Identifier::new("anonymous_id", "bridge"))));
    assert!(!store.index.contains_key(&before));
    assert_parts_add_up(&store);
}

#[test]
fn erase_profile_removes_everything_and_names_every_id() {
    let s = Stitcher::new(Rules::unlimited());
    let mut store = MemStore::default();
    s.apply(&mut store, &ev(1, 10, &ids(&[("anonymous_id", "c1")])))
        .unwrap();
    s.apply(&mut store, &ev(2, 5, &ids(&[("email", "a@x.io")])))
        .unwrap();
    s.apply(
        &mut store,
        &ev(3, 20, &ids(&[("anonymous_id", "c1"), ("email", "a@x.io")])),
    )
    .unwrap();
    s.apply(&mut store, &ev(4, 30, &ids(&[("email", "other@x.io")])))
        .unwrap();
    // Erase by the retired id: redirects are followed.
    let r = s
        .erase_profile(&mut store, &ProfileId::from_anchor("e1"))
        .unwrap();
    assert_eq!(r.identifiers_erased, 2);
    let mut erased: Vec<ProfileId> = r.erased.iter().map(|(id, _)| id.clone()).collect();
    erased.sort();
    let mut want = vec![ProfileId::from_anchor("e1"), ProfileId::from_anchor("e2")];
    want.sort();
    assert_eq!(erased, want);
    assert_eq!(store.profiles.len(), 1, "the other person stays");
    assert!(store.redirects.is_empty());
    assert_eq!(store.nodes.len(), 1);
    assert!(store.parts.keys().all(|id| id.value == "other@x.io"));
    assert!(s
        .erase_profile(&mut store, &ProfileId::from_anchor("e1"))
        .unwrap()
        .is_empty());
}

const A: (&str, &str) = ("email", "a@x.io");
const B: (&str, &str) = ("anonymous_id", "b");

/// An event as (number, time, identifiers).
type Given<'a> = (u32, i64, &'a [(&'a str, &'a str)]);

/// Events applied in turn after e1 {a} at 10, e2 {b} at 20 and e3 {a, b} at 30, which retires e2 into e1.
fn apply_all(s: &Stitcher, store: &mut MemStore, events: &[Given]) {
    let ab: [Given; 3] = [(1, 10, &[A]), (2, 20, &[B]), (3, 30, &[A, B])];
    for (n, ts, pairs) in ab.iter().chain(events) {
        s.apply(store, &ev(*n, *ts, &ids(pairs))).unwrap();
    }
}

#[test]
fn erasing_a_profile_ends_every_id_that_led_to_it() {
    let s = Stitcher::new(Rules::unlimited());
    let mut store = MemStore::default();
    let c = ("anonymous_id", "c");
    apply_all(&s, &mut store, &[(0, 5, &[c]), (4, 40, &[A, c])]);
    // The chain e2 -> e1 -> e0: erasing e0's profile ends all three, the grandchild included.
    let r = s
        .erase_profile(&mut store, &ProfileId::from_anchor("e0"))
        .unwrap();
    let erased: BTreeSet<ProfileId> = r.erased.iter().map(|(id, _)| id.clone()).collect();
    let want: BTreeSet<ProfileId> = ["e0", "e1", "e2"].map(ProfileId::from_anchor).into();
    assert_eq!(erased, want);
    assert!(store.redirects.is_empty(), "{:?}", store.redirects);
}

/// An erased identifier takes with it the id of its own sighting (a profile of it alone, without events,
/// was named after it): that id could otherwise come back wherever the identifier is seen again.
#[test]
fn erasing_an_identifier_ends_the_id_named_after_it() {
    let s = Stitcher::new(Rules::unlimited());
    let mut store = MemStore::default();
    let (c, d, x) = (
        ("customer_id", "c"),
        ("customer_id", "d"),
        ("device_id", "x"),
    );
    s.apply(&mut store, &ev(3, 362, &ids(&[c, x]))).unwrap();
    let [c, d_id, x_id] = [c, d, x].map(|(k, v)| Identifier::new(k, v));
    // The event was kept in c's part: erasing c leaves x alone, named after its sighting.
    s.erase_identifier(&mut store, &c).unwrap();
    let sighting = ProfileId::from_anchor(&format!("identifier:{x_id}"));
    assert_eq!(store.index.get(&sighting), Some(&store.nodes[&x_id]));
    s.apply(&mut store, &ev(9, 0, &ids(&[d, x]))).unwrap();
    assert_eq!(
        store.redirects.get(&sighting),
        Some(&ProfileId::from_anchor("e9"))
    );
    let r = s.erase_identifier(&mut store, &x_id).unwrap();
    assert!(r.erased.iter().any(|(id, _)| *id == sighting), "{r:?}");
    assert!(store.redirects.is_empty(), "{:?}", store.redirects);
    assert_eq!(
        store.index.get(&ProfileId::from_anchor("e9")),
        Some(&store.nodes[&d_id])
    );
}

/// A retired id can be live again only where its anchor event is (in the part of its return
/// identifier); a split sends it there, so the shard that brings it back is the one holding its redirect.
#[test]
fn a_split_sends_a_retired_id_to_the_piece_where_it_can_come_back() {
    let s = Stitcher::new(Rules::unlimited());
    let mut store = MemStore::default();
    let d = ("anonymous_id", "d");
    apply_all(&s, &mut store, &[(5, 1, &[d]), (6, 50, &[B, d])]);
    let [a, b, d] = [A, B, d].map(|(k, v)| Identifier::new(k, v));
    let id = ProfileId::from_anchor;
    // e2 -> e1 -> e5. Unlinking a and b brings e1 back with a; e2's event is in b's part, so e2 now
    // leads to b's profile (e5, kept by d's older event) and gets a redirect record there.
    let r = s.unlink(&mut store, &a, &b).unwrap();
    assert_eq!(store.index[&id("e1")], store.nodes[&a]);
    assert_eq!(store.redirects.get(&id("e2")), Some(&id("e5")));
    assert_eq!(r.retired, vec![(id("e2"), store.nodes[&b])]);
    // Erasing d leaves b alone with its own oldest event: e2 is live again, with nothing redirecting it.
    s.erase_identifier(&mut store, &d).unwrap();
    assert_eq!(store.index[&id("e2")], store.nodes[&b]);
    assert!(!store.redirects.contains_key(&id("e2")));
    assert_parts_add_up(&store);
}

#[test]
fn unlink_splits_only_when_nothing_else_holds() {
    let s = Stitcher::new(Rules::unlimited());
    let mut store = MemStore::default();
    let (a, b, c) = (
        Identifier::new("email", "a@x.io"),
        Identifier::new("anonymous_id", "b"),
        Identifier::new("anonymous_id", "c"),
    );
    s.apply(
        &mut store,
        &ev(1, 1, &ids(&[("email", "a@x.io"), ("anonymous_id", "b")])),
    )
    .unwrap();
    s.apply(
        &mut store,
        &ev(2, 2, &ids(&[("anonymous_id", "b"), ("anonymous_id", "c")])),
    )
    .unwrap();
    s.apply(
        &mut store,
        &ev(3, 3, &ids(&[("email", "a@x.io"), ("anonymous_id", "c")])),
    )
    .unwrap();
    assert!(
        s.unlink(&mut store, &a, &b).unwrap().is_empty(),
        "a-c-b still holds"
    );
    assert_eq!(store.profiles.len(), 1);
    let r = s.unlink(&mut store, &b, &c).unwrap();
    assert_eq!(r.splits.len(), 1);
    assert_eq!(store.profiles.len(), 2);
    assert_ne!(store.nodes[&a], store.nodes[&b]);
    assert_eq!(store.nodes[&a], store.nodes[&c]);
    assert_parts_add_up(&store);
}

#[test]
fn refused_consent_seals_the_profile_to_its_channel() {
    let s = Stitcher::new(Rules::new(&GuardrailConfig::default()));
    let mut store = MemStore::default();
    let mut refuse = ev(1, 1, &ids(&[("email", "a@x.io")]));
    refuse.channel = "web".into();
    refuse.consent = Some(crate::model::ConsentChange {
        cross_channel: Some(false),
        email_marketing: None,
    });
    let home = s.apply(&mut store, &refuse).unwrap().unwrap().node;
    // The same email in the email channel: a separate, channel-scoped profile.
    let mut other = ev(2, 2, &ids(&[("email", "a@x.io")]));
    other.channel = "email".into();
    let scoped = s.apply(&mut store, &other).unwrap().unwrap().node;
    assert_ne!(home, scoped);
    assert!(store
        .nodes
        .contains_key(&Identifier::new("email@email", "a@x.io")));
    // The home channel still lands at home.
    let mut web = ev(3, 3, &ids(&[("email", "a@x.io")]));
    web.channel = "web".into();
    assert_eq!(s.apply(&mut store, &web).unwrap().unwrap().node, home);
    // Consent given again: later events of every channel stitch to the main profile again.
    let mut grant = ev(4, 4, &ids(&[("email", "a@x.io")]));
    grant.channel = "web".into();
    grant.consent = Some(crate::model::ConsentChange {
        cross_channel: Some(true),
        email_marketing: None,
    });
    s.apply(&mut store, &grant).unwrap();
    let mut again = ev(5, 5, &ids(&[("email", "a@x.io")]));
    again.channel = "email".into();
    assert_eq!(s.apply(&mut store, &again).unwrap().unwrap().node, home);
    assert_eq!(
        store.profiles[&scoped].events, 1,
        "what was kept apart stays apart"
    );
}

/// Expected graph under shared-identifier detection alone, computed directly: identifiers seen with
/// more than `limit` distinct owners (in the same events) stand alone; everything else is connected
/// components of co-occurrence without them.
fn expected_partition(events: &[Event], rules: &Rules) -> BTreeSet<BTreeSet<Identifier>> {
    let mut owners: HashMap<&Identifier, BTreeSet<&Identifier>> = HashMap::new();
    for e in events {
        for x in &e.identifiers {
            if rules.shared_limit(x).is_some() {
                let slot = owners.entry(x).or_default();
                slot.extend(e.identifiers.iter().filter(|o| rules.is_owner(o)));
            }
        }
    }
    let shared: BTreeSet<&Identifier> = owners
        .iter()
        .filter(|(x, o)| o.len() > rules.shared_limit(x).unwrap_or(usize::MAX))
        .map(|(x, _)| *x)
        .collect();
    let mut parent: HashMap<&Identifier, &Identifier> = HashMap::new();
    fn find<'a>(
        p: &mut HashMap<&'a Identifier, &'a Identifier>,
        x: &'a Identifier,
    ) -> &'a Identifier {
        let mut r = x;
        while let Some(&n) = p.get(r) {
            if n == r {
                break;
            }
            r = n;
        }
        p.insert(x, r);
        r
    }
    for e in events {
        let kept: Vec<&Identifier> = e
            .identifiers
            .iter()
            .filter(|i| !shared.contains(i))
            .collect();
        for i in &kept {
            parent.entry(i).or_insert(i);
        }
        for w in kept.windows(2) {
            let (a, b) = (find(&mut parent, w[0]), find(&mut parent, w[1]));
            parent.insert(a, b);
        }
    }
    let mut groups: HashMap<&Identifier, BTreeSet<Identifier>> = HashMap::new();
    let keys: Vec<&Identifier> = parent.keys().copied().collect();
    for k in keys {
        let r = find(&mut parent, k);
        groups.entry(r).or_default().insert(k.clone());
    }
    let mut out: BTreeSet<BTreeSet<Identifier>> = groups.into_values().collect();
    for x in shared {
        out.insert(BTreeSet::from([x.clone()]));
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases()))]

    /// Erasing an identifier leaves the graph it would be if the identifier had never been seen.
    #[test]
    fn erasure_equals_never_having_seen_it(
        events in arb_events(),
        pick in any::<prop::sample::Index>(),
    ) {
        let s = enriched(Rules::unlimited());
        let all: Vec<&Identifier> = events.iter().flat_map(|e| &e.identifiers).collect();
        let x: Identifier = (*pick.get(&all)).clone();
        let mut store = run(&s, &events);
        s.erase_identifier(&mut store, &x).unwrap();
        let without: Vec<Event> = events
            .iter()
            .cloned()
            .map(|mut e| {
                e.identifiers.retain(|i| i != &x);
                e
            })
            .filter(|e| !e.identifiers.is_empty())
            .collect();
        prop_assert_eq!(store.partition(), run(&s, &without).partition());
        for (id, node) in &store.nodes {
            prop_assert!(store.profiles[node].identifiers.contains_key(id));
        }
        assert_parts_add_up(&store);
    }

    /// With shared-identifier detection, any order and repetition gives the graph computed directly
    /// from the events, and every profile is the join of its parts.
    #[test]
    fn shared_detection_is_order_independent(
        events in arb_events(),
        seed in any::<u64>(),
        repeats in prop::collection::vec(any::<prop::sample::Index>(), 0..10),
    ) {
        use rand::{seq::SliceRandom, SeedableRng};
        let rules = Rules::shared_only(
            BTreeMap::from([("device_id".to_string(), 2), ("anonymous_id".to_string(), 3)]),
            vec!["email".into(), "customer_id".into()],
        );
        let s = enriched(rules.clone());
        let mut shuffled = events.clone();
        for r in &repeats {
            shuffled.push(r.get(&events).clone());
        }
        shuffled.shuffle(&mut rand::rngs::SmallRng::seed_from_u64(seed));
        let store = run(&s, &shuffled);
        prop_assert_eq!(store.partition(), expected_partition(&events, &rules));
        assert_parts_add_up(&store);
    }
}
