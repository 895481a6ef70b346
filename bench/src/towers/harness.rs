//! The benchmark harness of the towers part: latency summaries, verdicts against targets,
//! output files, load average, CPU pinning, and the numpy runner.

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// Latency summary in milliseconds.
#[derive(Clone, Copy)]
pub(crate) struct Lat {
    pub p50: f64,
    pub p99: f64,
    pub mean: f64,
}

pub(crate) fn lat(mut v: Vec<Duration>) -> Lat {
    assert!(!v.is_empty());
    v.sort();
    let n = v.len();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    Lat {
        p50: ms(v[n * 50 / 100]),
        p99: ms(v[(n * 99 / 100).min(n - 1)]),
        mean: v.iter().map(|d| ms(*d)).sum::<f64>() / n as f64,
    }
}

pub(crate) fn verdict(ok: bool) -> &'static str {
    if ok {
        "**holds**"
    } else {
        "**missed**"
    }
}

/// Median of `reps` timings of `f` (a whole statement), in seconds.
pub(crate) fn median_secs(reps: usize, mut f: impl FnMut()) -> f64 {
    let mut t: Vec<f64> = (0..reps)
        .map(|_| {
            let s = Instant::now();
            f();
            s.elapsed().as_secs_f64()
        })
        .collect();
    t.sort_by(f64::total_cmp);
    t[t.len() / 2]
}

pub(crate) fn out_dir() -> PathBuf {
    std::env::var_os("TT_OUT")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("out"))
}

pub(crate) fn write(path: &Path, bytes: &[u8]) {
    std::fs::write(path, bytes).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
}

/// One value of a COPY text row: numbers and strings as they are, string lists as array
/// literals, null as \N.
pub(crate) fn copy_field(v: Option<&Value>) -> String {
    fn esc(s: &str) -> String {
        s.replace('\\', "\\\\")
            .replace('\t', "\\t")
            .replace('\n', "\\n")
    }
    match v {
        None | Some(Value::Null) => "\\N".into(),
        Some(Value::String(s)) => esc(s),
        Some(Value::Number(n)) => n.to_string(),
        Some(Value::Bool(b)) => b.to_string(),
        Some(Value::Array(a)) => {
            let parts: Vec<String> = a
                .iter()
                .map(|x| match x {
                    Value::String(s) => {
                        format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
                    }
                    other => other.to_string(),
                })
                .collect();
            esc(&format!("{{{}}}", parts.join(",")))
        }
        Some(Value::Object(_)) => panic!("object-valued item feature"),
    }
}

/// The 1/5/15-minute load averages (other work on this machine skews latencies).
pub(crate) fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

/// Sets the CPU affinity of process `pid` (and its threads) to `cpus` with taskset; false when
/// that is not possible.
pub(crate) fn pin(pid: u32, cpus: &str) -> bool {
    Command::new("taskset")
        .args(["-a", "-p", "-c", cpus, &pid.to_string()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Runs bench/numpy_tower.py on the same spec, weights and inputs; its JSON result or why not.
pub(crate) fn run_numpy(out: &Path, calls: usize) -> Result<Value, String> {
    let python = match std::env::var_os("TT_PYTHON") {
        Some(p) => PathBuf::from(p),
        None => {
            let p = out_dir().join("venv/bin/python");
            if !p.exists() {
                return Err(format!(
                    "no Python venv at {} (bench/run.sh creates it with numpy)",
                    p.display()
                ));
            }
            p
        }
    };
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("numpy_tower.py");
    let o = Command::new(&python)
        .arg(&script)
        .arg(out.join("user_spec.json"))
        .arg(out.join("user_weights.safetensors"))
        .arg(out.join("inputs.json"))
        .arg(out.join("pg_outputs.json"))
        .arg(format!("--warmup={}", 200.min(calls)))
        .env("OMP_NUM_THREADS", "1")
        .env("OPENBLAS_NUM_THREADS", "1")
        .env("MKL_NUM_THREADS", "1")
        .output()
        .map_err(|e| format!("running {}: {e}", python.display()))?;
    if !o.status.success() {
        let err = String::from_utf8_lossy(&o.stderr);
        let tail: Vec<&str> = err.lines().rev().take(3).collect();
        return Err(format!(
            "{} {} failed ({}): {}",
            python.display(),
            script.display(),
            o.status,
            tail.into_iter().rev().collect::<Vec<_>>().join(" / ")
        ));
    }
    serde_json::from_slice(&o.stdout).map_err(|e| format!("numpy_tower.py output: {e}"))
}
