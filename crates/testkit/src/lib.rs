//! Data for tests and benchmarks, kept out of the runtime crates (and `rand` out of their
//! dependencies): clustered unit vectors for the index, realistic towers with inputs for the
//! tower code.

#![forbid(unsafe_code)]

pub mod towers;
pub mod vectors;
