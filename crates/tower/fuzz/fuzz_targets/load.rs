//! `cargo fuzz run load` (from crates/tower): Model::load on (spec, safetensors) split out of the
//! input, then encode/forward of a fixed set of inputs on whatever loads. Seed the corpus with
//! `synth`/golden models written as `u32 LE spec length ++ spec ++ safetensors`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use twotower_tower::Model;

fuzz_target!(|data: &[u8]| {
    if data.len() < 4 {
        return;
    }
    let n = u32::from_le_bytes([data[0], data[1], data[2], data[3]]) as usize;
    let rest = &data[4..];
    let n = n.min(rest.len());
    let (spec, weights) = rest.split_at(n);
    let spec = String::from_utf8_lossy(spec);
    if let Ok(m) = Model::load(&spec, weights) {
        let inputs = [
            serde_json::json!({}),
            serde_json::json!({"a": 1, "b": [1, 2, 3], "c": {"ids": [1], "weights": [0.5]}}),
        ];
        for x in &inputs {
            if let Ok(e) = m.encode(x, false) {
                assert_eq!(m.forward(&e).len(), m.output_dim());
            }
        }
    }
});
