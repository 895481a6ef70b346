//! Item-CF and Swing against hand-computed cases, invariances (threads, chunking), caps,
//! sampling, decay, incremental rows equal to a full build, and recall from a history.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::json;
use std::collections::HashMap;
use twotower_cf::{i2i, CfError, Kind, Log, Options, Similarity};

const BUDGET: usize = 1 << 30;

/// A: 1 2 3, B: 1 2, C: 2 3, D: 3.
fn tiny() -> Log {
    let mut l = Log::default();
    for (u, items) in [
        ("A", vec![1, 2, 3]),
        ("B", vec![1, 2]),
        ("C", vec![2, 3]),
        ("D", vec![3]),
    ] {
        for (t, i) in items.into_iter().enumerate() {
            l.push(u, i, t as f64, 1.0).unwrap();
        }
    }
    l
}

fn build(log: &Log, kind: Kind, opts: serde_json::Value) -> HashMap<(i64, i64), f64> {
    let o = Options::parse(kind, &opts).unwrap();
    let s = Similarity::new(log, &o, BUDGET).unwrap();
    s.rows(0..s.items())
        .into_iter()
        .map(|(a, b, v)| ((a, b), v as f64))
        .collect()
}

fn close(a: f64, b: f64) {
    assert!((a - b).abs() < 1e-6 * b.abs().max(1.0), "{a} vs {b}");
}

#[test]
fn itemcf_matches_the_formula_by_hand() {
    let m = build(&tiny(), Kind::ItemCf, json!({}));
    let (l3, l4) = (3f64.ln(), 4f64.ln());
    close(m[&(1, 2)], (1.0 / l4 + 1.0 / l3) / 6f64.sqrt());
    close(m[&(2, 1)], (1.0 / l4 + 1.0 / l3) / 6f64.sqrt());
    close(m[&(1, 3)], (1.0 / l4) / 6f64.sqrt());
    close(m[&(2, 3)], (1.0 / l4 + 1.0 / l3) / 3.0);
    close(m[&(3, 2)], (1.0 / l4 + 1.0 / l3) / 3.0);
    assert_eq!(
        m.len(),
        6,
        "every co-occurring ordered pair, no self pairs: {m:?}"
    );
    // Asymmetric normalisation: |N(i)|^α · |N(j)|^(1−α), α = 0.8; without IUF.
    let m = build(&tiny(), Kind::ItemCf, json!({"alpha": 0.8, "iuf": false}));
    close(m[&(1, 2)], 2.0 / (2f64.powf(0.8) * 3f64.powf(0.2)));
    close(m[&(2, 1)], 2.0 / (3f64.powf(0.8) * 2f64.powf(0.2)));
}

#[test]
fn swing_matches_the_formula_by_hand() {
    let m = build(&tiny(), Kind::Swing, json!({}));
    let w = |n: f64| (n + 5.0).powf(-0.3);
    let (wa, wb, wc) = (w(3.0), w(2.0), w(2.0));
    // Ordered pairs (A, B) and (B, A), |I_A ∩ I_B| = 2.
    close(m[&(1, 2)], 2.0 * wa * wb / 3.0);
    close(m[&(2, 1)], 2.0 * wa * wb / 3.0);
    close(m[&(2, 3)], 2.0 * wa * wc / 3.0);
    // 1 and 3 share only user A: no pair of users, no similarity.
    assert!(!m.contains_key(&(1, 3)) && !m.contains_key(&(3, 1)));
    // α, α₁, β are the options'.
    let m = build(
        &tiny(),
        Kind::Swing,
        json!({"alpha": 0.5, "alpha1": 1, "beta": 1}),
    );
    close(m[&(1, 2)], 2.0 * (1.0 / 4.0) * (1.0 / 3.0) / 2.5);
}

#[test]
fn weights_and_time_decay_scale_each_interaction() {
    let mut l = Log::default();
    // Two users with items 1 and 2; user y's interactions are one half-life older and weigh 2.
    l.push("x", 1, 100.0, 1.0).unwrap();
    l.push("x", 2, 100.0, 1.0).unwrap();
    l.push("y", 1, 90.0, 2.0).unwrap();
    l.push("y", 2, 90.0, 2.0).unwrap();
    let m = build(&l, Kind::ItemCf, json!({"half_life": 10, "iuf": false}));
    // x: 1·1; y: (2·0.5)·(2·0.5) = 1; normalised by √(2·2).
    close(m[&(1, 2)], (1.0 + 1.0) / 2.0);
    // A repeated (user, item) pair counts once, with its most recent interaction.
    l.push("x", 1, 50.0, 7.0).unwrap();
    let m2 = build(&l, Kind::ItemCf, json!({"half_life": 10, "iuf": false}));
    close(m2[&(1, 2)], m[&(1, 2)]);
}

fn random_log(seed: u64, users: usize, items: i64, per_user: usize) -> Log {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut l = Log::default();
    for u in 0..users {
        let group = (u % 7) as i64;
        let n = 1 + rng.gen_range(0..per_user);
        for t in 0..n {
            let item = if rng.gen::<f64>() < 0.8 {
                group + 7 * rng.gen_range(0..items / 7)
            } else {
                rng.gen_range(0..items)
            };
            l.push(&format!("u{u}"), item, (t * 10 + u % 10) as f64, 1.0)
                .unwrap();
        }
    }
    l
}

#[test]
fn threads_and_chunks_do_not_change_the_rows() {
    let log = random_log(1, 400, 140, 30);
    for kind in [Kind::ItemCf, Kind::Swing] {
        let one = Similarity::new(
            &log,
            &Options::parse(kind, &json!({"threads": 1, "top_n": 20})).unwrap(),
            BUDGET,
        )
        .unwrap();
        let two = Similarity::new(
            &log,
            &Options::parse(kind, &json!({"threads": 2, "top_n": 20})).unwrap(),
            BUDGET,
        )
        .unwrap();
        let all = one.rows(0..one.items());
        let chunked: Vec<_> = two
            .chunks(500)
            .into_iter()
            .flat_map(|r| two.rows(r))
            .collect();
        assert_eq!(all, chunked, "{kind:?}");
        // In item-id order (so a B-tree on the table appends).
        assert!(
            all.windows(2).all(|w| w[0].0 <= w[1].0),
            "{kind:?}: sources in id order"
        );
        // Per source: at most top_n, score descending, ties by neighbour id, no self pair.
        let mut by_src: HashMap<i64, Vec<(i64, f32)>> = HashMap::new();
        for (a, b, v) in &all {
            assert_ne!(a, b);
            assert!(*v > 0.0);
            by_src.entry(*a).or_default().push((*b, *v));
        }
        for (src, row) in by_src {
            assert!(row.len() <= 20, "{src}");
            assert!(
                row.windows(2)
                    .all(|w| w[0].1 > w[1].1 || (w[0].1 == w[1].1 && w[0].0 < w[1].0)),
                "{src}: {row:?}"
            );
        }
    }
}

#[test]
fn the_neighbours_of_an_item_are_its_group() {
    let log = random_log(2, 700, 140, 25);
    for kind in [Kind::ItemCf, Kind::Swing] {
        let s = Similarity::new(
            &log,
            &Options::parse(kind, &json!({"top_n": 10})).unwrap(),
            BUDGET,
        )
        .unwrap();
        let rows = s.rows(0..s.items());
        let same = rows.iter().filter(|(a, b, _)| a % 7 == b % 7).count();
        assert!(
            same as f64 > 0.9 * rows.len() as f64,
            "{kind:?}: {same} of {}",
            rows.len()
        );
    }
}

#[test]
fn caps_and_sampling_bound_the_work() {
    let mut l = Log::default();
    // One heavy user with 500 items (in time order) and 50 light users.
    for i in 0..500 {
        l.push("heavy", i, i as f64, 1.0).unwrap();
    }
    for u in 0..50 {
        l.push(&format!("u{u}"), u, 0.0, 1.0).unwrap();
        l.push(&format!("u{u}"), u + 1, 1.0, 1.0).unwrap();
    }
    let o = Options::parse(Kind::ItemCf, &json!({"max_user_items": 100})).unwrap();
    let s = Similarity::new(&l, &o, BUDGET).unwrap();
    assert_eq!(
        s.pairs(),
        100 + 100,
        "the heavy user keeps the 100 most recent items"
    );
    let rows = s.rows(0..s.items());
    // Item 10 (old for the heavy user) now only co-occurs through the light users.
    let n10: Vec<i64> = rows.iter().filter(|r| r.0 == 10).map(|r| r.1).collect();
    assert_eq!(n10.len(), 2, "{n10:?}");
    // Item 450 keeps its heavy-user neighbours.
    assert!(rows.iter().filter(|r| r.0 == 450).count() >= 99);
    let half = Similarity::new(
        &l,
        &Options::parse(Kind::ItemCf, &json!({"user_sample": 0.5, "seed": 3})).unwrap(),
        BUDGET,
    )
    .unwrap();
    assert!(
        (15..=36).contains(&half.users()),
        "about half of 51 users: {}",
        half.users()
    );
    let again = Similarity::new(
        &l,
        &Options::parse(Kind::ItemCf, &json!({"user_sample": 0.5, "seed": 3})).unwrap(),
        BUDGET,
    )
    .unwrap();
    assert_eq!(half.users(), again.users(), "the same sample every build");
    // Swing: only the 20 most recent users of each item are paired.
    let mut l = Log::default();
    for u in 0..100 {
        l.push(&format!("u{u}"), 1, u as f64, 1.0).unwrap();
        l.push(&format!("u{u}"), 2, u as f64, 1.0).unwrap();
    }
    let full = build(&l, Kind::Swing, json!({}));
    let capped = build(&l, Kind::Swing, json!({"max_item_users": 20}));
    let w = (2f64 + 5.0).powf(-0.3);
    close(full[&(1, 2)], 100.0 * 99.0 * w * w / 3.0);
    close(capped[&(1, 2)], 20.0 * 19.0 * w * w / 3.0);
}

#[test]
fn affected_rows_recomputed_equal_a_full_build() {
    for kind in [Kind::ItemCf, Kind::Swing] {
        let old = random_log(3, 300, 3000, 20);
        let mut new = random_log(3, 300, 3000, 20);
        // New interactions of 10 users (some new items too), later than everything.
        let mut changed = Vec::new();
        for u in (0..300).step_by(30) {
            let id = format!("u{u}");
            new.push(&id, 500 + u as i64 % 3, 10_000.0, 1.0).unwrap();
            new.push(&id, (u as i64 * 7) % 3000, 10_001.0, 1.0).unwrap();
            changed.push(id);
        }
        let opts = match kind {
            Kind::Swing => json!({"top_n": 15, "max_item_users": 40, "max_user_items": 15}),
            Kind::ItemCf => json!({"top_n": 15, "max_user_items": 15, "half_life": 500}),
        };
        let o = Options::parse(kind, &opts).unwrap();
        let before = Similarity::new(&old, &o, BUDGET).unwrap();
        // A refresh measures ages from its build's reference (the old log's newest time).
        let mut o2 = o.clone();
        if kind == Kind::ItemCf {
            o2.decay_reference = Some(before.reference());
        }
        let after = Similarity::new(&new, &o2, BUDGET).unwrap();
        let changed: Vec<&str> = changed.iter().map(String::as_str).collect();
        let affected = after.affected(&new, &changed);
        assert!(
            affected.len() < after.items(),
            "{kind:?}: not every row ({} of {})",
            affected.len(),
            after.items()
        );
        // Old rows of unaffected items + recomputed rows of affected ones == a full build.
        let ids: Vec<i64> = affected.iter().map(|&i| after.item_id(i)).collect();
        let mut merged: Vec<_> = before
            .rows(0..before.items())
            .into_iter()
            .filter(|r| !ids.contains(&r.0))
            .collect();
        merged.extend(after.rows_of(&affected));
        let mut full = after.rows(0..after.items());
        let key = |r: &(i64, i64, f32)| (r.0, r.1);
        merged.sort_by_key(key);
        full.sort_by_key(key);
        assert_eq!(merged, full, "{kind:?}");
    }
}

#[test]
fn options_and_input_are_checked() {
    for (kind, bad, what) in [
        (Kind::ItemCf, json!({"beta": 1}), "beta"),
        (Kind::Swing, json!({"half_life": 10}), "half_life"),
        (Kind::ItemCf, json!({"alpha": 2}), "alpha"),
        (Kind::ItemCf, json!({"top_n": 0}), "top_n"),
        (Kind::Swing, json!({"user_sample": 0}), "user_sample"),
        (Kind::Swing, json!({"nope": 1}), "nope"),
        (Kind::ItemCf, json!([1]), "options"),
        (
            Kind::ItemCf,
            json!({"decay_reference": 5}),
            "decay_reference",
        ),
    ] {
        match Options::parse(kind, &bad) {
            Err(CfError::Option { path, .. }) => assert_eq!(path, what, "{bad}"),
            other => panic!("{bad}: {other:?}"),
        }
    }
    assert!(Kind::parse("cosine").is_err());
    let mut l = Log::default();
    assert!(l.push("u", 1, f64::NAN, 1.0).is_err());
    assert!(l.push("u", 1, 0.0, -1.0).is_err());
    assert!(l.push("u", 1, 0.0, f32::INFINITY).is_err());
    let log = random_log(4, 100, 50, 10);
    match Similarity::new(
        &log,
        &Options::parse(Kind::ItemCf, &json!({})).unwrap(),
        1000,
    ) {
        Err(CfError::MemoryBudget { needed, budget }) => assert!(needed > budget),
        other => panic!("{:?}", other.map(|_| ())),
    }
    // An empty log builds nothing.
    let s = Similarity::new(
        &Log::default(),
        &Options::parse(Kind::Swing, &json!({})).unwrap(),
        BUDGET,
    )
    .unwrap();
    assert!(s.rows(0..0).is_empty() && s.chunks(100).is_empty());
}

#[test]
fn i2i_sums_weighted_similarities_over_the_history() {
    let nb = vec![
        (1, 10, 0.5),
        (1, 11, 0.4),
        (1, 2, 0.9),
        (2, 10, 0.1),
        (2, 12, 0.8),
        (3, 13, 0.9),
    ];
    let hits = i2i(&[(1, 1.0), (2, 2.0)], &nb, 10, &[12]).unwrap();
    let got: Vec<(i64, f32, usize, i64)> = hits
        .iter()
        .map(|h| (h.item, h.score, h.rank, h.via))
        .collect();
    // 10: 1·0.5 + 2·0.1 = 0.7 (via 1); 11: 0.4; 2 is in the history, 12 excluded, 13 not reached.
    assert_eq!(got.len(), 2);
    assert_eq!((got[0].0, got[0].2, got[0].3), (10, 1, 1));
    assert!((got[0].1 - 0.7).abs() < 1e-6);
    assert_eq!((got[1].0, got[1].2, got[1].3), (11, 2, 1));
    // k bounds the result; ties rank by item id; a repeated history item adds its weights.
    let nb = vec![(1, 21, 0.5), (1, 20, 0.5), (1, 22, 0.5)];
    let hits = i2i(&[(1, 0.5), (1, 0.5)], &nb, 2, &[]).unwrap();
    assert_eq!(
        hits.iter().map(|h| (h.item, h.score)).collect::<Vec<_>>(),
        vec![(20, 0.5), (21, 0.5)]
    );
    assert!(i2i(&[], &nb, 5, &[]).unwrap().is_empty());
    assert!(i2i(&[(1, 1.0)], &nb, 0, &[]).unwrap().is_empty());
    assert!(matches!(
        i2i(&[(1, f32::NAN)], &nb, 5, &[]),
        Err(CfError::BadInput(_))
    ));
    assert!(matches!(
        i2i(&[(1, -1.0)], &nb, 5, &[]),
        Err(CfError::BadInput(_))
    ));
}

/// What a build stores as its decay reference parses back for the refresh, whatever the time
/// unit: epoch nanoseconds in a bigint column are about 1.7e18 (a refresh of such a channel
/// failed with "must be between -1e18 and 1e18").
#[test]
fn a_stored_decay_reference_in_nanoseconds_parses_back() {
    let ns = 1.733e18_f64;
    let o = Options::parse(
        Kind::ItemCf,
        &json!({"half_life": 86_400e9, "decay_reference": ns}),
    )
    .unwrap();
    assert_eq!(o.decay_reference, Some(ns));
}
