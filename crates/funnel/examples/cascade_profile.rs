use serde_json::json;
use std::sync::Arc;
use std::time::Instant;
use twotower_funnel::prerank::*;
use twotower_metric::Metric;
use twotower_tower::{Model, Part, Source};

fn main() {
    // DIN=1: the model with target attention over the history (H vectors, default 20).
    // MT=n: the same inputs as a multi-task model (n shared experts, three tasks).
    let mt: usize = std::env::var("MT")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let (spec, w) = if std::env::var("DIN").as_deref() == Ok("1") {
        twotower_testkit::towers::realistic_prerank_attention(3)
    } else if mt > 0 {
        twotower_testkit::towers::realistic_prerank_multitask(3, mt)
    } else {
        twotower_testkit::towers::realistic_prerank(3)
    };
    let m = Model::load(&spec, &w).unwrap();
    let up = m
        .encode_part(&json!({"device": "ios"}), Source::User, true)
        .unwrap();
    let user: Vec<f32> = (0..64)
        .map(|i| ((i * 7 % 13) as f32 - 6.0) / 10.0)
        .collect();
    let nc: i64 = std::env::var("C")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2000);
    let cands: Vec<Candidate> = (0..nc)
        .map(|i| Candidate {
            item: i,
            vector: (0..64)
                .map(|j| (((i * 31 + j * 17) % 23) as f32 - 11.0) / 10.0)
                .collect::<Vec<f32>>()
                .into(),
        })
        .collect();
    let h: usize = std::env::var("H")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    let history: Vec<Vec<f32>> = cands[..h.min(cands.len())]
        .iter()
        .map(|c| c.vector.to_vec())
        .collect();
    let parts: Vec<Arc<Part>> = (0..nc)
        .map(|i| {
            Arc::new(
                m.encode_part(
                    &json!({"category": format!("c{}", i % 30), "price": i as f64}),
                    Source::Item,
                    false,
                )
                .unwrap(),
            )
        })
        .collect();
    let threads: usize = std::env::var("T")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2);
    let n: usize = std::env::var("N")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2000);
    let mut times = vec![];
    for _ in 0..n {
        let mut ip = |_: usize, idx: &[usize]| -> Result<Vec<Arc<Part>>> {
            Ok(idx.iter().map(|&i| parts[i].clone()).collect())
        };
        let req = Request {
            metric: Metric::Cosine,
            user: &user,
            history: &history,
            threads,
        };
        let stages = [Stage {
            scorer: Scorer::Model {
                name: "p",
                model: &m,
                user: &up,
                by: twotower_tower::ScoreBy::Fused,
            },
            keep: 100,
        }];
        let t = Instant::now();
        let r = cascade(&req, &cands, &stages, &mut ip, &mut || Ok(())).unwrap();
        times.push(t.elapsed().as_secs_f64() * 1e3);
        std::hint::black_box(r);
    }
    times.sort_by(|a, b| a.total_cmp(b));
    println!(
        "p50 {:.3} p90 {:.3} p99 {:.3} ms",
        times[n / 2],
        times[n * 9 / 10],
        times[n * 99 / 100]
    );
}
