//! Prints per-call timings of the realistic towers (run with `-- --nocapture`). The crate is
//! built at opt-level 3 even in the dev profile, so these numbers are meaningful in plain
//! `cargo test`. Nothing here asserts a speed: a loaded machine can miss any fixed bound, and
//! the benchmark measures the forward pass (`bench/src/towers/embed.rs`: in-process encode and
//! forward of the realistic user tower; the target is well under 100 µs). The test checks that
//! the calls it times compute finite vectors.

use std::time::Instant;
use twotower_tower::{forward_parallel, Encoded, Model};

fn per_call(n: usize, f: impl FnMut()) -> f64 {
    let mut f = f;
    let t = Instant::now();
    for _ in 0..n {
        f();
    }
    t.elapsed().as_secs_f64() * 1e6 / n as f64
}

#[test]
fn realistic_tower_timings() {
    let (spec, st) = twotower_testkit::towers::realistic_user_tower(1);
    let t = Instant::now();
    let m = Model::load(&spec, &st).unwrap();
    let load_ms = t.elapsed().as_secs_f64() * 1e3;
    let inputs: Vec<_> = (0..256)
        .map(|i| twotower_testkit::towers::realistic_user_input(2, i))
        .collect();
    let enc: Vec<Encoded> = inputs.iter().map(|x| m.encode(x, true).unwrap()).collect();

    // Warm up.
    for x in &enc {
        std::hint::black_box(m.forward(x));
    }
    let mut i = 0;
    let fwd = per_call(4000, || {
        std::hint::black_box(m.forward(&enc[i % enc.len()]));
        i += 1;
    });
    let mut i = 0;
    let encode = per_call(2000, || {
        std::hint::black_box(m.encode(&inputs[i % inputs.len()], true).unwrap());
        i += 1;
    });
    let mut i = 0;
    let embed = per_call(2000, || {
        std::hint::black_box(m.embed(&inputs[i % inputs.len()]).unwrap());
        i += 1;
    });
    let batch = per_call(20, || {
        std::hint::black_box(m.forward_batch(&enc));
    }) / enc.len() as f64;
    let par = per_call(20, || {
        std::hint::black_box(forward_parallel(&m, &enc, 2));
    }) / enc.len() as f64;

    let (ispec, ist) = twotower_testkit::towers::realistic_item_tower(1);
    let im = Model::load(&ispec, &ist).unwrap();
    let items: Vec<Encoded> = (0..1024)
        .map(|i| {
            im.encode(&twotower_testkit::towers::realistic_item_input(3, i), false)
                .unwrap()
        })
        .collect();
    let item_batch = per_call(10, || {
        std::hint::black_box(im.forward_batch(&items));
    }) / items.len() as f64;

    eprintln!(
        "realistic user tower: {} params, {:.1} MB, load {load_ms:.1} ms\n  \
         forward {fwd:.2} µs/call, encode {encode:.2} µs/call, embed {embed:.2} µs/call\n  \
         forward_batch(256) {batch:.2} µs/example, forward_parallel(256, 2 threads) {par:.2} µs/example\n\
         realistic item tower: forward_batch(1024) {item_batch:.2} µs/example",
        m.parameter_count(),
        m.memory_bytes() as f64 / 1e6,
    );
    let out = m.forward(&enc[0]);
    assert!(
        !out.is_empty() && out.iter().all(|x| x.is_finite()),
        "{out:?}"
    );
    let par = forward_parallel(&m, &enc, 2);
    assert!(par.len() == out.len() * enc.len() && par.iter().all(|x| x.is_finite()));
    let iv = im.forward_batch(&items);
    assert!(
        !iv.is_empty() && iv.len().is_multiple_of(items.len()) && iv.iter().all(|x| x.is_finite())
    );
}
