//! Metrics, storage kinds and the exact distance functions that back the SQL operators.

use crate::error::{AnnError, Result, MAX_DIMS};
pub use twotower_metric::{
    cosine_distance, inner_product, is_zero, l2_distance, l2_squared, unit, Metric,
};

/// Scalar kind the index stores its vectors as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quantization {
    F32,
    F16,
    I8,
}

impl Quantization {
    pub fn parse(s: &str) -> Result<Quantization> {
        match s.to_ascii_lowercase().as_str() {
            "f32" => Ok(Quantization::F32),
            "f16" => Ok(Quantization::F16),
            "i8" => Ok(Quantization::I8),
            other => Err(AnnError::InvalidOption {
                option: "quantization",
                reason: format!("\"{other}\" is not one of f32, f16, i8"),
            }),
        }
    }
    pub fn code(self) -> u32 {
        match self {
            Quantization::F32 => 1,
            Quantization::F16 => 2,
            Quantization::I8 => 3,
        }
    }
    pub fn from_code(code: u32) -> Option<Quantization> {
        match code {
            1 => Some(Quantization::F32),
            2 => Some(Quantization::F16),
            3 => Some(Quantization::I8),
            _ => None,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Quantization::F32 => "f32",
            Quantization::F16 => "f16",
            Quantization::I8 => "i8",
        }
    }
    pub fn bytes_per_scalar(self) -> usize {
        match self {
            Quantization::F32 => 4,
            Quantization::F16 => 2,
            Quantization::I8 => 1,
        }
    }
    /// Checks that `v` can be stored exactly enough to be ranked: its norm is in the engine's
    /// range ([`check_index_range`]) and, for f16, every element fits in half precision.
    pub fn check_vector(self, v: &[f32]) -> Result<()> {
        check_index_range(v)?;
        if self == Quantization::F16 {
            if let Some((position, &value)) = v.iter().enumerate().find(|(_, x)| x.abs() > 65504.0)
            {
                return Err(AnnError::F16Range { position, value });
            }
        }
        Ok(())
    }
    /// i8 storage only preserves angles (usearch scales each vector into [-127, 127]),
    /// so it is only meaningful for cosine distance.
    pub fn check_metric(self, metric: Metric) -> Result<()> {
        if self == Quantization::I8 && metric != Metric::Cosine {
            return Err(AnnError::InvalidOption {
                option: "quantization",
                reason: format!(
                    "i8 storage supports only cosine distance, not {}",
                    metric.name()
                ),
            });
        }
        Ok(())
    }
}

/// Checks a vector: non-empty, at most [`MAX_DIMS`], finite, and of the expected length when given.
pub fn validate_vector(v: &[f32], expected: Option<usize>) -> Result<()> {
    if v.is_empty() {
        return Err(AnnError::EmptyVector);
    }
    if v.len() > MAX_DIMS {
        return Err(AnnError::TooManyDimensions(v.len()));
    }
    if let Some(e) = expected {
        if e != v.len() {
            return Err(AnnError::DimensionMismatch {
                expected: e,
                got: v.len(),
            });
        }
    }
    if let Some((position, &value)) = v.iter().enumerate().find(|(_, x)| !x.is_finite()) {
        return Err(AnnError::NonFinite { position, value });
    }
    Ok(())
}

/// Largest squared norm of a vector the HNSW engine may hold: the engine computes in f32, and
/// the inner product or squared distance of two such vectors stays below `f32::MAX`.
pub const MAX_INDEX_NORM_SQ: f64 = (f32::MAX as f64) / 8.0;
/// Smallest squared norm of a non-zero vector the engine may hold (its f32 norm stays normal).
pub const MIN_INDEX_NORM_SQ: f64 = 1e-30;

/// Checks that the engine's f32 arithmetic is exact enough for `v`: its squared norm (in f64)
/// lies in [`MIN_INDEX_NORM_SQ`, `MAX_INDEX_NORM_SQ`] (or is zero).
pub fn check_index_range(v: &[f32]) -> Result<()> {
    let n2 = inner_product(v, v);
    if n2 > MAX_INDEX_NORM_SQ || (n2 > 0.0 && n2 < MIN_INDEX_NORM_SQ) {
        return Err(AnnError::OutOfRange { norm: n2.sqrt() });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distances() {
        let a = [1.0, 0.0, 0.0];
        let b = [0.0, 1.0, 0.0];
        assert!((cosine_distance(&a, &b) - 1.0).abs() < 1e-9);
        assert!((cosine_distance(&a, &a)).abs() < 1e-9);
        assert!((l2_distance(&a, &b) - 2f64.sqrt()).abs() < 1e-9);
        assert_eq!(inner_product(&a, &b), 0.0);
        assert!(cosine_distance(&a, &[0.0, 0.0, 0.0]).is_nan());
        let long: Vec<f32> = (0..37).map(|i| i as f32 * 0.1).collect();
        let naive: f64 = long.iter().map(|x| (*x as f64) * (*x as f64)).sum();
        assert!((inner_product(&long, &long) - naive).abs() < 1e-3);
    }

    #[test]
    fn extreme_finite_values() {
        let big = [2e19f32, 2e19];
        let one = [1f32, 1.0];
        assert!(cosine_distance(&big, &one).abs() < 1e-12);
        let tiny = [1e-23f32, 1e-23];
        assert!(cosine_distance(&tiny, &one).abs() < 1e-12);
        assert!((inner_product(&big, &big) - 8e38).abs() / 8e38 < 1e-6);
        assert!((l2_distance(&big, &[0.0, 0.0]) - 2e19 * 2f64.sqrt()).abs() / 3e19 < 1e-6);
        let u = unit(&big).unwrap();
        assert!((u[0] - std::f32::consts::FRAC_1_SQRT_2).abs() < 1e-6);
        assert!(unit(&[0.0, 0.0]).is_none());
        assert!(check_index_range(&big).is_err());
        assert!(check_index_range(&tiny).is_err());
        assert!(check_index_range(&[0.0, 0.0]).is_ok());
        assert!(check_index_range(&one).is_ok());
        assert!(check_index_range(&[1e18f32; 16]).is_ok());
    }

    #[test]
    fn validation() {
        assert_eq!(validate_vector(&[], None), Err(AnnError::EmptyVector));
        assert!(matches!(
            validate_vector(&[1.0, f32::NAN], None),
            Err(AnnError::NonFinite { position: 1, .. })
        ));
        assert!(matches!(
            validate_vector(&[1.0, f32::INFINITY], None),
            Err(AnnError::NonFinite { .. })
        ));
        assert_eq!(
            validate_vector(&[1.0, 2.0], Some(3)),
            Err(AnnError::DimensionMismatch {
                expected: 3,
                got: 2
            })
        );
        assert!(matches!(
            validate_vector(&vec![0.0; MAX_DIMS + 1], None),
            Err(AnnError::TooManyDimensions(_))
        ));
        assert!(validate_vector(&[1.0, 2.0], Some(2)).is_ok());
    }

    #[test]
    fn options() {
        assert_eq!(Quantization::parse("F16").unwrap(), Quantization::F16);
        assert!(Quantization::parse("f8").is_err());
        assert!(Quantization::I8.check_metric(Metric::L2).is_err());
        assert!(Quantization::I8.check_metric(Metric::Cosine).is_ok());
        for m in [Metric::Cosine, Metric::InnerProduct, Metric::L2] {
            assert_eq!(Metric::from_code(m.code()), Some(m));
        }
    }

    #[test]
    fn engine_to_sql_matches_operators() {
        let a = [0.3f32, -0.2, 0.9];
        let b = [0.1f32, 0.5, -0.4];
        let ip = Metric::InnerProduct.engine_to_sql(Metric::InnerProduct.engine_distance(&a, &b));
        assert!((ip + inner_product(&a, &b)).abs() < 1e-6);
        let l2 = Metric::L2.engine_to_sql(Metric::L2.engine_distance(&a, &b));
        assert!((l2 - l2_distance(&a, &b)).abs() < 1e-6);
    }
}
