//! Optimisers. Dense layers use Adam. Embedding tables are updated sparsely, only the rows a
//! batch touched: lazy Adam (moments of untouched rows are left as they are), row-wise Adagrad
//! (one accumulator per row) or FTRL-proximal (per coordinate, with L1: rows whose every
//! coordinate stays under the L1 threshold are exactly zero).

use std::collections::BTreeMap;

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Sparse {
    LazyAdam {
        lr: f32,
    },
    Adagrad {
        lr: f32,
        initial: f32,
    },
    /// FTRL-proximal (McMahan et al. 2013): `alpha` the learning rate, `beta` its smoothing,
    /// `l1`, `l2` the regularisation strengths.
    Ftrl {
        alpha: f32,
        beta: f32,
        l1: f32,
        l2: f32,
    },
}

const B1: f64 = 0.9;
const B2: f64 = 0.999;
const EPS: f64 = 1e-8;

/// Adam over one dense parameter.
#[derive(Debug, Clone)]
pub struct Adam {
    m: Vec<f32>,
    v: Vec<f32>,
}

impl Adam {
    pub fn new(n: usize) -> Adam {
        Adam {
            m: vec![0.0; n],
            v: vec![0.0; n],
        }
    }

    /// One step (`t` counts from 1), with decoupled weight decay `wd` (0 for none).
    pub fn step(&mut self, p: &mut [f32], g: &[f32], lr: f32, t: u64, wd: f32) {
        let c1 = 1.0 - B1.powi(t as i32);
        let c2 = 1.0 - B2.powi(t as i32);
        let step = lr as f64 * c2.sqrt() / c1;
        for i in 0..p.len() {
            let gi = g[i] as f64;
            let m = B1 * self.m[i] as f64 + (1.0 - B1) * gi;
            let v = B2 * self.v[i] as f64 + (1.0 - B2) * gi * gi;
            self.m[i] = m as f32;
            self.v[i] = v as f32;
            let mut w = p[i] as f64;
            if wd > 0.0 {
                w -= lr as f64 * wd as f64 * w;
            }
            p[i] = (w - step * m / (v.sqrt() + EPS)) as f32;
        }
    }
}

/// The state of one embedding table's sparse optimiser.
#[derive(Debug, Clone)]
pub struct SparseState {
    kind: Sparse,
    dim: usize,
    /// Lazy Adam: first moments; FTRL: z.
    a: Vec<f32>,
    /// Lazy Adam: second moments; Adagrad: one accumulator per row; FTRL: n.
    b: Vec<f32>,
    /// Rows some step updated.
    touched: Vec<bool>,
}

impl SparseState {
    pub fn new(kind: Sparse, rows: usize, dim: usize) -> SparseState {
        let (a, b) = match kind {
            Sparse::LazyAdam { .. } => (vec![0.0; rows * dim], vec![0.0; rows * dim]),
            Sparse::Adagrad { initial, .. } => (Vec::new(), vec![initial; rows]),
            Sparse::Ftrl { .. } => (vec![0.0; rows * dim], vec![0.0; rows * dim]),
        };
        SparseState {
            kind,
            dim,
            a,
            b,
            touched: vec![false; rows],
        }
    }

    /// Whether a step ever updated row `r`.
    pub fn touched(&self, r: usize) -> bool {
        self.touched.get(r).copied().unwrap_or(false)
    }

    /// FTRL keeps its weights in (z, n): a table trained by FTRL must start from them. Call once
    /// before training with the table's initial weights (z = −w·(β + √n)/α at n = 0).
    pub fn init_from(&mut self, w: &[f32]) {
        if let Sparse::Ftrl { alpha, beta, .. } = self.kind {
            for (z, &wi) in self.a.iter_mut().zip(w) {
                *z = -wi * beta / alpha;
            }
        }
    }

    /// Updates the rows in `grads` of table `w` (row-major, `dim` wide); `t` counts from 1.
    pub fn step(&mut self, w: &mut [f32], grads: &BTreeMap<u32, Vec<f32>>, t: u64) {
        let d = self.dim;
        for &r in grads.keys() {
            if let Some(x) = self.touched.get_mut(r as usize) {
                *x = true;
            }
        }
        match self.kind {
            Sparse::LazyAdam { lr } => {
                let c1 = 1.0 - B1.powi(t as i32);
                let c2 = 1.0 - B2.powi(t as i32);
                let step = lr as f64 * c2.sqrt() / c1;
                for (&r, g) in grads {
                    let o = r as usize * d;
                    for k in 0..d {
                        let gi = g[k] as f64;
                        let m = B1 * self.a[o + k] as f64 + (1.0 - B1) * gi;
                        let v = B2 * self.b[o + k] as f64 + (1.0 - B2) * gi * gi;
                        self.a[o + k] = m as f32;
                        self.b[o + k] = v as f32;
                        w[o + k] = (w[o + k] as f64 - step * m / (v.sqrt() + EPS)) as f32;
                    }
                }
            }
            Sparse::Adagrad { lr, .. } => {
                for (&r, g) in grads {
                    let o = r as usize * d;
                    let g2 = g.iter().map(|&x| (x as f64).powi(2)).sum::<f64>() / d as f64;
                    let acc = self.b[r as usize] as f64 + g2;
                    self.b[r as usize] = acc as f32;
                    let scale = lr as f64 / (acc.sqrt() + 1e-10);
                    for k in 0..d {
                        w[o + k] = (w[o + k] as f64 - scale * g[k] as f64) as f32;
                    }
                }
            }
            Sparse::Ftrl {
                alpha,
                beta,
                l1,
                l2,
            } => {
                let (alpha, beta, l1, l2) = (alpha as f64, beta as f64, l1 as f64, l2 as f64);
                for (&r, g) in grads {
                    let o = r as usize * d;
                    for k in 0..d {
                        let gi = g[k] as f64;
                        let n = self.b[o + k] as f64;
                        let n2 = n + gi * gi;
                        let sigma = (n2.sqrt() - n.sqrt()) / alpha;
                        let z = self.a[o + k] as f64 + gi - sigma * w[o + k] as f64;
                        self.a[o + k] = z as f32;
                        self.b[o + k] = n2 as f32;
                        w[o + k] = if z.abs() <= l1 {
                            0.0
                        } else {
                            (-(z - z.signum() * l1) / ((beta + n2.sqrt()) / alpha + l2)) as f32
                        };
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ftrl_with_l1_zeroes_rows_with_small_gradients_and_keeps_untouched_rows() {
        let mut w = vec![0.01f32; 3 * 2];
        let mut st = SparseState::new(
            Sparse::Ftrl {
                alpha: 0.1,
                beta: 1.0,
                l1: 1.0,
                l2: 0.0,
            },
            3,
            2,
        );
        st.init_from(&w);
        let mut g = BTreeMap::new();
        g.insert(1u32, vec![0.01f32, -0.01]);
        for t in 1..=5 {
            st.step(&mut w, &g, t);
        }
        assert_eq!(
            &w[2..4],
            &[0.0, 0.0],
            "a row with tiny gradients under L1 is exactly zero"
        );
        assert_eq!(&w[0..2], &[0.01, 0.01], "untouched rows are not updated");
        // Without L1 the same gradients move the row but do not zero it.
        let mut w2 = vec![0.01f32; 3 * 2];
        let mut st2 = SparseState::new(
            Sparse::Ftrl {
                alpha: 0.1,
                beta: 1.0,
                l1: 0.0,
                l2: 0.0,
            },
            3,
            2,
        );
        st2.init_from(&w2);
        for t in 1..=5 {
            st2.step(&mut w2, &g, t);
        }
        assert!(w2[2] != 0.0 && w2[3] != 0.0);
    }

    #[test]
    fn lazy_adam_moves_against_the_gradient_only_on_touched_rows() {
        let mut w = vec![0.0f32; 4];
        let mut st = SparseState::new(Sparse::LazyAdam { lr: 0.01 }, 2, 2);
        let mut g = BTreeMap::new();
        g.insert(0u32, vec![1.0f32, -1.0]);
        st.step(&mut w, &g, 1);
        assert!(
            (w[0] + 0.01).abs() < 1e-6 && (w[1] - 0.01).abs() < 1e-6,
            "{w:?}"
        );
        assert_eq!(&w[2..], &[0.0, 0.0]);
    }
}
