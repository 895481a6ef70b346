//! The cost of each tower architecture: `embed_user` of the realistic user tower's features
//! under the plain stack, SENet, a parallel two-tower (two sub-towers, weighted concatenation)
//! and attention fusion (three branches), server side over the same inputs, in one run.

use super::harness::median_secs;
use super::{Towers, INPUT_SEED, USER_SEED};
use serde_json::Value;
use twotower_testkit::towers as synth;
use twotower_tower::Model;

const INPUTS: usize = 2000;

impl Towers<'_> {
    pub(super) fn architectures(&mut self) {
        let inputs: Vec<Value> = (0..INPUTS)
            .map(|i| synth::realistic_user_input(INPUT_SEED, 3_000_000 + i))
            .collect();
        self.c
            .batch_execute("DROP TABLE IF EXISTS tt_arch_inputs; CREATE TEMP TABLE tt_arch_inputs (i int PRIMARY KEY, f jsonb)")
            .unwrap();
        self.c
            .execute(
                "INSERT INTO tt_arch_inputs SELECT o, f FROM jsonb_array_elements($1::jsonb) WITH ORDINALITY AS t(f, o)",
                &[&Value::Array(inputs)],
            )
            .unwrap();
        println!("\n### embed_user by architecture: the realistic user tower's 10 features, {INPUTS} inputs, server side (one statement), median of 5");
        println!("| architecture | parameters | µs per call | ratio to plain |");
        println!("|---|---|---|---|");
        let mut plain_us = None;
        for arch in ["plain", "senet", "parallel", "attention"] {
            let (spec, weights) = if arch == "plain" {
                synth::realistic_user_tower(USER_SEED)
            } else {
                synth::realistic_user_tower_arch(USER_SEED, arch)
            };
            let params = Model::load(&spec, &weights)
                .unwrap_or_else(|e| panic!("{arch}: {e}"))
                .parameter_count();
            let name = format!("bench_arch_{arch}");
            let spec_v: Value = serde_json::from_str(&spec).unwrap();
            self.c
                .query_one(
                    "SELECT twotower.import_model($1, $2::jsonb, $3, true)",
                    &[&name, &spec_v, &weights],
                )
                .unwrap_or_else(|e| panic!("import {name}: {e}"));
            let q = format!("SELECT count(twotower.embed_user('{name}', f)) FROM tt_arch_inputs");
            self.c.query_one(&q, &[]).unwrap();
            let secs = median_secs(5, || {
                self.c.query_one(&q, &[]).unwrap();
            });
            let us = secs / INPUTS as f64 * 1e6;
            let base = *plain_us.get_or_insert(us);
            println!("| {arch} | {params} | {us:.1} | {:.2}× |", us / base);
            self.c
                .query_one("SELECT twotower.drop_model($1)", &[&name])
                .unwrap();
        }
    }
}
