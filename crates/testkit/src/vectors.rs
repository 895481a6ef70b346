//! Deterministic synthetic data shaped like item embeddings, shared by the tests and the
//! benchmark program: unit vectors around random cluster centres.

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

/// A standard normal sample (Box-Muller).
pub fn gauss(rng: &mut SmallRng) -> f32 {
    let u1: f32 = rng.gen_range(1e-7f32..1.0);
    let u2: f32 = rng.gen_range(0.0f32..1.0);
    (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
}

/// `n` unit vectors of `dims` around `clusters` centres drawn uniformly from [-1, 1]^dims, with
/// Gaussian noise of σ = 0.35 per dimension before normalisation; row i is `out[i*dims..]`.
pub fn clustered(n: usize, dims: usize, clusters: usize, seed: u64) -> Vec<f32> {
    let mut rng = SmallRng::seed_from_u64(seed);
    let centres: Vec<f32> = (0..clusters * dims)
        .map(|_| rng.gen_range(-1.0f32..1.0))
        .collect();
    let mut out = Vec::with_capacity(n * dims);
    for _ in 0..n {
        let c = rng.gen_range(0..clusters);
        let v: Vec<f32> = (0..dims)
            .map(|j| centres[c * dims + j] + 0.35 * gauss(&mut rng))
            .collect();
        let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        out.extend(v.iter().map(|x| x / norm));
    }
    out
}

/// `nq` queries shaped like user-tower outputs, which lie elsewhere than the items
/// (out-of-distribution): each the normalised mean of `per` random rows of `items` (a
/// "history") plus Gaussian noise of σ = `noise` per dimension.
pub fn mixtures(
    items: &[f32],
    dims: usize,
    nq: usize,
    per: usize,
    noise: f32,
    seed: u64,
) -> Vec<f32> {
    let mut rng = SmallRng::seed_from_u64(seed);
    let n = items.len() / dims;
    let mut out = Vec::with_capacity(nq * dims);
    for _ in 0..nq {
        let mut v = vec![0f32; dims];
        for _ in 0..per.max(1) {
            let r = rng.gen_range(0..n);
            for (j, x) in v.iter_mut().enumerate() {
                *x += items[r * dims + j];
            }
        }
        for x in v.iter_mut() {
            *x = *x / per.max(1) as f32 + noise * gauss(&mut rng);
        }
        let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
        out.extend(v.iter().map(|x| x / norm));
    }
    out
}
