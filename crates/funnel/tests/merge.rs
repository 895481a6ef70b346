//! Merge strategies against hand-computed cases, and properties over random lists: never an
//! excluded or repeated item, quotas and back-fill add up to k, provenance is complete.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::HashSet;
use twotower_funnel::{merge, Candidate, MergeError, Norm, Strategy};

fn c(channel: usize, item: i64, score: f32) -> Candidate {
    Candidate {
        channel,
        item,
        score,
    }
}

/// Channel 0: 1 > 2 > 3 > 4; channel 1: 3 > 5 > 6.
fn two() -> Vec<Candidate> {
    vec![
        c(0, 2, 0.8),
        c(0, 1, 0.9),
        c(0, 3, 0.5),
        c(0, 4, 0.1),
        c(1, 5, 5.0),
        c(1, 3, 9.0),
        c(1, 6, 1.0),
    ]
}

fn items(m: &[twotower_funnel::Merged]) -> Vec<i64> {
    m.iter().map(|x| x.item).collect()
}

#[test]
fn quota_takes_turns_then_back_fills() {
    // Quotas 3 + 1: turns 1 (c0), 3 (c1), 2 (c0), 4 (c0); then back-fill 5, 6.
    let m = merge(&two(), 2, &Strategy::Quota(vec![3, 1]), 6, &[]).unwrap();
    assert_eq!(items(&m), vec![1, 3, 2, 4, 5, 6]);
    // Channel 1 is short of its quota of 5: its unused slots go to channel 0.
    let m = merge(&two(), 2, &Strategy::Quota(vec![1, 5]), 5, &[]).unwrap();
    assert_eq!(items(&m), vec![1, 3, 5, 6, 2]);
    // Provenance: item 3 came from both channels, rank 3 in channel 0 and rank 1 in channel 1.
    let m3 = m.iter().find(|x| x.item == 3).unwrap();
    assert_eq!(m3.provenance, vec![(0, 3, 0.5), (1, 1, 9.0)]);
    assert_eq!(
        m.iter().map(|x| x.rank).collect::<Vec<_>>(),
        vec![1, 2, 3, 4, 5]
    );
}

#[test]
fn round_robin_and_snake() {
    let m = merge(
        &two(),
        2,
        &Strategy::RoundRobin {
            weights: vec![1, 1],
            snake: false,
        },
        10,
        &[],
    )
    .unwrap();
    assert_eq!(items(&m), vec![1, 3, 2, 5, 4, 6]);
    // Snake: c0 c1 | c1 c0 | c0 c1 ...
    let m = merge(
        &two(),
        2,
        &Strategy::RoundRobin {
            weights: vec![1, 1],
            snake: true,
        },
        10,
        &[],
    )
    .unwrap();
    assert_eq!(items(&m), vec![1, 3, 5, 2, 4, 6]);
    // Weighted: two from channel 0 per round.
    let m = merge(
        &two(),
        2,
        &Strategy::RoundRobin {
            weights: vec![2, 1],
            snake: false,
        },
        4,
        &[],
    )
    .unwrap();
    assert_eq!(items(&m), vec![1, 2, 3, 4]);
}

#[test]
fn weighted_sum_of_normalised_scores() {
    // Min-max: c0: 1 → 1, 2 → 0.875, 3 → 0.5, 4 → 0; c1: 3 → 1, 5 → 0.5, 6 → 0.
    let m = merge(
        &two(),
        2,
        &Strategy::WeightedSum {
            weights: vec![1.0, 1.0],
            norm: Norm::MinMax,
        },
        10,
        &[],
    )
    .unwrap();
    assert_eq!(items(&m), vec![3, 1, 2, 5, 4, 6]);
    assert!((m[0].score - 1.5).abs() < 1e-6);
    // By rank: c0: 1, .75, .5, .25; c1: 1, 2/3, 1/3. Weights 1 and 2.
    let m = merge(
        &two(),
        2,
        &Strategy::WeightedSum {
            weights: vec![1.0, 2.0],
            norm: Norm::Rank,
        },
        3,
        &[],
    )
    .unwrap();
    assert_eq!(items(&m), vec![3, 5, 1]);
    assert!((m[0].score - 2.5).abs() < 1e-6 && (m[1].score - 4.0 / 3.0).abs() < 1e-6);
    // z-score over each list.
    let m = merge(
        &two(),
        2,
        &Strategy::WeightedSum {
            weights: vec![1.0, 0.0],
            norm: Norm::ZScore,
        },
        1,
        &[],
    )
    .unwrap();
    assert_eq!(items(&m), vec![1]);
}

#[test]
fn reciprocal_rank_fusion() {
    let m = merge(
        &two(),
        2,
        &Strategy::Rrf {
            weights: vec![1.0, 1.0],
            k0: 60.0,
        },
        10,
        &[],
    )
    .unwrap();
    // 3: 1/63 + 1/61; 1: 1/61; 5: 1/62 = 2: 1/62 (tie: smaller id first); 4: 1/64; 6: 1/63.
    assert_eq!(items(&m), vec![3, 1, 2, 5, 6, 4]);
    assert!((m[0].score - (1.0 / 63.0 + 1.0 / 61.0)).abs() < 1e-12);
}

#[test]
fn exclusions_duplicates_and_bad_input() {
    let mut cands = two();
    cands.push(c(0, 1, 0.2)); // a repeat within a channel: its best entry counts
    let m = merge(
        &cands,
        2,
        &Strategy::Rrf {
            weights: vec![1.0, 1.0],
            k0: 60.0,
        },
        10,
        &[3, 6],
    )
    .unwrap();
    assert_eq!(items(&m), vec![1, 5, 2, 4]);
    assert_eq!(m[0].provenance, vec![(0, 1, 0.9)]);
    // Ranks in a channel are after exclusions: 4 is channel 0's third item now.
    assert_eq!(
        m.iter().find(|x| x.item == 4).unwrap().provenance,
        vec![(0, 3, 0.1)]
    );
    assert!(merge(&two(), 2, &Strategy::Quota(vec![1]), 5, &[]).is_err());
    assert!(merge(&two(), 1, &Strategy::Quota(vec![1]), 5, &[]).is_err());
    assert!(matches!(
        merge(&[c(0, 1, f32::NAN)], 1, &Strategy::Quota(vec![1]), 5, &[]),
        Err(MergeError::NonFinite { item: 1, .. })
    ));
    assert!(merge(
        &two(),
        2,
        &Strategy::Rrf {
            weights: vec![1.0, f64::NAN],
            k0: 60.0
        },
        5,
        &[]
    )
    .is_err());
    assert!(merge(&[], 2, &Strategy::Quota(vec![1, 1]), 5, &[])
        .unwrap()
        .is_empty());
    assert!(merge(&two(), 2, &Strategy::Quota(vec![1, 1]), 0, &[])
        .unwrap()
        .is_empty());
}

#[test]
fn properties_over_random_lists() {
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    for case in 0..300 {
        let n = rng.gen_range(1..5);
        let mut cands = Vec::new();
        for ch in 0..n {
            for _ in 0..rng.gen_range(0..30) {
                cands.push(c(ch, rng.gen_range(0..60), rng.gen_range(-5.0..5.0)));
            }
        }
        let exclude: Vec<i64> = (0..rng.gen_range(0..10))
            .map(|_| rng.gen_range(0..60))
            .collect();
        let k = rng.gen_range(0..80);
        let available: HashSet<i64> = cands
            .iter()
            .map(|x| x.item)
            .filter(|i| !exclude.contains(i))
            .collect();
        let strategies = [
            Strategy::Quota((0..n).map(|_| rng.gen_range(0..20)).collect()),
            Strategy::RoundRobin {
                weights: (0..n).map(|_| rng.gen_range(1..4)).collect(),
                snake: rng.gen(),
            },
            Strategy::WeightedSum {
                weights: (0..n).map(|_| rng.gen_range(0.1..2.0)).collect(),
                norm: Norm::MinMax,
            },
            Strategy::Rrf {
                weights: vec![1.0; n],
                k0: 60.0,
            },
        ];
        for s in &strategies {
            let m = merge(&cands, n, s, k, &exclude).unwrap();
            let got: Vec<i64> = items(&m);
            let set: HashSet<i64> = got.iter().copied().collect();
            assert_eq!(set.len(), got.len(), "case {case} {s:?}: a duplicate");
            assert!(
                got.iter().all(|i| !exclude.contains(i)),
                "case {case} {s:?}: an excluded item"
            );
            // Quotas and back-fill (and every strategy) fill k when there are enough items.
            assert_eq!(got.len(), k.min(available.len()), "case {case} {s:?}");
            for x in &m {
                assert!(!x.provenance.is_empty());
                for &(ch, r, sc) in &x.provenance {
                    assert!(
                        cands
                            .iter()
                            .any(|y| y.channel == ch && y.item == x.item && y.score == sc)
                            && r >= 1
                    );
                }
            }
            assert!(
                m.windows(2).all(|w| w[0].score >= w[1].score),
                "case {case} {s:?}: scores in rank order"
            );
        }
    }
}
