//! The metrics pg_twotower's towers and index share: one `Metric` (a model's output metric and an
//! index's operator class are the same concept), the distances computed in f64, and the largest
//! vector any of them takes. No dependencies.

#![forbid(unsafe_code)]

/// The largest vector length: tower widths and outputs, operator arguments, index vectors
/// (an index's on-page limit is lower, see the extension's `pages::MAX_INDEX_DIMS`).
pub const MAX_DIMS: usize = 16_000;

/// The metric of a tower's output and of an index (chosen by its operator class): one concept
/// for both, so a model fits an index when their metrics are equal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Metric {
    /// `<=>`: 1 - cosine similarity.
    Cosine,
    /// `<#>`: negative inner product.
    InnerProduct,
    /// `<->`: Euclidean distance.
    L2,
}

impl Metric {
    pub fn code(self) -> u32 {
        match self {
            Metric::Cosine => 1,
            Metric::InnerProduct => 2,
            Metric::L2 => 3,
        }
    }
    pub fn from_code(code: u32) -> Option<Metric> {
        match code {
            1 => Some(Metric::Cosine),
            2 => Some(Metric::InnerProduct),
            3 => Some(Metric::L2),
            _ => None,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Metric::Cosine => "cosine",
            Metric::InnerProduct => "inner_product",
            Metric::L2 => "l2",
        }
    }
    /// The name a model spec uses for it (`output.metric`): "cosine", "ip", "l2".
    pub fn spec_name(self) -> &'static str {
        match self {
            Metric::Cosine => "cosine",
            Metric::InnerProduct => "ip",
            Metric::L2 => "l2",
        }
    }
    pub fn from_spec_name(s: &str) -> Option<Metric> {
        match s {
            "cosine" => Some(Metric::Cosine),
            "ip" => Some(Metric::InnerProduct),
            "l2" => Some(Metric::L2),
            _ => None,
        }
    }
    /// The similarity reported for a distance of the SQL operator (larger is better): the
    /// cosine similarity, the inner product, or the negated Euclidean distance.
    pub fn similarity(self, sql_distance: f64) -> f64 {
        match self {
            Metric::Cosine => 1.0 - sql_distance,
            Metric::InnerProduct | Metric::L2 => -sql_distance,
        }
    }
    /// The distance the HNSW engine uses for this metric, computed exactly in f32.
    /// Ordering by it is the same as ordering by the SQL operator of the metric.
    pub fn engine_distance(self, a: &[f32], b: &[f32]) -> f32 {
        match self {
            Metric::Cosine => cosine_distance(a, b) as f32,
            Metric::InnerProduct => 1.0 - inner_product(a, b) as f32,
            Metric::L2 => l2_squared(a, b) as f32,
        }
    }
    /// The value of the SQL operator of the metric (`<=>`, `<#>`, `<->`), computed in f64.
    pub fn sql_distance(self, a: &[f32], b: &[f32]) -> f64 {
        match self {
            Metric::Cosine => cosine_distance(a, b),
            Metric::InnerProduct => -inner_product(a, b),
            Metric::L2 => l2_distance(a, b),
        }
    }
    /// Converts an engine distance into the value the SQL operator returns.
    pub fn engine_to_sql(self, d: f32) -> f64 {
        match self {
            Metric::Cosine => d as f64,
            Metric::InnerProduct => d as f64 - 1.0,
            Metric::L2 => (d.max(0.0) as f64).sqrt(),
        }
    }
}

/// Inner product accumulated in f64: every product is formed in f64, so neither huge
/// (2e19) nor tiny (1e-23) finite elements overflow or underflow on the way.
pub fn inner_product(a: &[f32], b: &[f32]) -> f64 {
    debug_assert_eq!(a.len(), b.len());
    // Independent accumulators let the compiler vectorise the loop.
    let mut acc = [0.0f64; 8];
    let chunks = a.len() / 8;
    for c in 0..chunks {
        for j in 0..8 {
            acc[j] += a[c * 8 + j] as f64 * b[c * 8 + j] as f64;
        }
    }
    let mut sum: f64 = acc.iter().sum();
    for i in chunks * 8..a.len() {
        sum += a[i] as f64 * b[i] as f64;
    }
    sum
}

/// 1 - cos(a, b); NaN when either vector has zero norm.
pub fn cosine_distance(a: &[f32], b: &[f32]) -> f64 {
    let dot = inner_product(a, b);
    let na = inner_product(a, a);
    let nb = inner_product(b, b);
    let denom = (na * nb).sqrt();
    if denom == 0.0 {
        return f64::NAN;
    }
    // Clamp so rounding never yields a distance outside [0, 2].
    (1.0 - dot / denom).clamp(0.0, 2.0)
}

/// `(inner_product(a, b), inner_product(b, b))` in one pass, bit for bit the same values (each
/// accumulator lane adds the same products in the same order).
pub fn dot_and_norm2(a: &[f32], b: &[f32]) -> (f64, f64) {
    debug_assert_eq!(a.len(), b.len());
    let (mut dot, mut nb) = ([0.0f64; 8], [0.0f64; 8]);
    let chunks = a.len() / 8;
    for c in 0..chunks {
        for j in 0..8 {
            let y = b[c * 8 + j] as f64;
            dot[j] += a[c * 8 + j] as f64 * y;
            nb[j] += y * y;
        }
    }
    let mut d: f64 = dot.iter().sum();
    let mut n: f64 = nb.iter().sum();
    for i in chunks * 8..a.len() {
        let y = b[i] as f64;
        d += a[i] as f64 * y;
        n += y * y;
    }
    (d, n)
}

/// [`cosine_distance`]`(a, b)` for a fixed `a` whose `inner_product(a, a)` is `a_norm2`: one pass
/// over the vectors instead of three, the same value bit for bit.
pub fn cosine_distance_from(a_norm2: f64, a: &[f32], b: &[f32]) -> f64 {
    let (dot, nb) = dot_and_norm2(a, b);
    let denom = (a_norm2 * nb).sqrt();
    if denom == 0.0 {
        return f64::NAN;
    }
    (1.0 - dot / denom).clamp(0.0, 2.0)
}

/// Squared Euclidean distance, accumulated in f64.
pub fn l2_squared(a: &[f32], b: &[f32]) -> f64 {
    let mut acc = [0.0f64; 8];
    let chunks = a.len() / 8;
    for c in 0..chunks {
        for j in 0..8 {
            let d = a[c * 8 + j] as f64 - b[c * 8 + j] as f64;
            acc[j] += d * d;
        }
    }
    let mut sum: f64 = acc.iter().sum();
    for i in chunks * 8..a.len() {
        let d = a[i] as f64 - b[i] as f64;
        sum += d * d;
    }
    sum
}

pub fn l2_distance(a: &[f32], b: &[f32]) -> f64 {
    l2_squared(a, b).sqrt()
}

/// `v` scaled to unit length in f64 (`None` for a zero vector): the query an engine computing
/// in f32 ranks by cosine or inner product exactly as the original.
pub fn unit(v: &[f32]) -> Option<Vec<f32>> {
    let n = inner_product(v, v).sqrt();
    (n > 0.0).then(|| v.iter().map(|x| (*x as f64 / n) as f32).collect())
}

/// True when the vector cannot be placed in a cosine index (zero norm).
pub fn is_zero(v: &[f32]) -> bool {
    v.iter().all(|&x| x == 0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_codes_round_trip() {
        for m in [Metric::Cosine, Metric::InnerProduct, Metric::L2] {
            assert_eq!(Metric::from_code(m.code()), Some(m));
            assert_eq!(Metric::from_spec_name(m.spec_name()), Some(m));
        }
        assert_eq!(Metric::from_spec_name("inner_product"), None);
        assert_eq!(Metric::Cosine.similarity(0.25), 0.75);
        assert_eq!(Metric::L2.similarity(2.0), -2.0);
    }

    #[test]
    fn one_pass_cosine_is_bit_for_bit_the_three_pass_one() {
        // A small deterministic generator (no dependencies): lengths around the 8-lane chunks.
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            ((x >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0) as f32 * 3.0
        };
        for len in [1usize, 7, 8, 9, 15, 16, 17, 64, 100, 257] {
            for _ in 0..50 {
                let a: Vec<f32> = (0..len).map(|_| next()).collect();
                let b: Vec<f32> = (0..len).map(|_| next()).collect();
                let (d, n) = dot_and_norm2(&a, &b);
                assert_eq!(d.to_bits(), inner_product(&a, &b).to_bits());
                assert_eq!(n.to_bits(), inner_product(&b, &b).to_bits());
                let fast = cosine_distance_from(inner_product(&a, &a), &a, &b);
                assert_eq!(
                    fast.to_bits(),
                    cosine_distance(&a, &b).to_bits(),
                    "len {len}"
                );
            }
        }
        let z = vec![0.0f32; 9];
        assert!(cosine_distance_from(0.0, &z, &z).is_nan());
    }
}
