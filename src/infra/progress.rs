//! SQL surface of training progress: a running `twotower.train(...)` or `train_prerank` writes where it is to
//! `$PGDATA/pg_twotower/progress/<pid>.json` (atomically, at most twice a second and at every
//! phase change and epoch end), and `twotower.train_progress` (a view over
//! `twotower.train_progress_info()`) reads those files, as `pg_stat_progress_*` reads shared
//! memory, which an extension loaded without `shared_preload_libraries` cannot add to.
//!
//! The files are a cache in the sense of the architecture: a missing or unwritable directory
//! means no progress rows, never a failed run. A file outlives its backend only after a crash;
//! the view joins `pg_stat_activity` on pid and backend start, and the next run removes files
//! of backends that are gone.

use pgrx::prelude::*;
use serde_json::{json, Value};
use std::path::PathBuf;
use std::time::{Duration, Instant};

const DIR: &str = "pg_twotower/progress";
const EVERY: Duration = Duration::from_millis(500);

fn my_pid() -> i32 {
    // SAFETY: MyProcPid is set for every backend.
    unsafe { pg_sys::MyProcPid }
}

/// The progress file of one training run; removed when dropped (also when an ERROR unwinds
/// through the run).
pub struct Run {
    path: Option<PathBuf>,
    state: Value,
    last: Option<Instant>,
    /// When the last progress NOTICE went out.
    last_notice: Instant,
}

impl Run {
    /// A run of `twotower.train` (both towers) or `train_prerank` (one model, `item_model` None).
    pub fn start(user_model: &str, item_model: Option<&str>) -> Run {
        // SAFETY: reading this backend's globals.
        let (role, db, backend_start) = unsafe {
            (
                u32::from(pg_sys::GetUserId()),
                u32::from(pg_sys::MyDatabaseId),
                pg_sys::MyStartTimestamp,
            )
        };
        let now = now_ts();
        let path = std::fs::create_dir_all(DIR).ok().map(|_| {
            remove_stale();
            PathBuf::from(DIR).join(format!("{}.json", my_pid()))
        });
        let mut r = Run {
            path,
            state: json!({
                "pid": my_pid(), "role": role, "database": db, "backend_start": backend_start,
                "user_model": user_model, "item_model": item_model, "phase": "reading",
                "started_at": now, "updated_at": now,
            }),
            last: None,
            last_notice: Instant::now(),
        };
        r.write();
        r
    }

    /// What a training function does with each event of the core's run, on the calling thread
    /// (between batches): checks for a cancel or statement_timeout, records progress, and sends
    /// a NOTICE (prefixed `what`) at each epoch end and at least every 10 s.
    pub fn event(&mut self, what: &str, e: &twotower_train::Event) {
        use twotower_train::Event;
        check_for_interrupts!();
        match e {
            Event::Step(p) => self.progress(p, false),
            Event::Epoch(p) => self.progress(p, true),
            Event::Tick => {}
        }
        match e {
            Event::Epoch(p) => {
                let valid = p.valid.map_or(String::new(), |m| {
                    format!(
                        ", validation Recall@{} {:.4}, NDCG@{} {:.4}",
                        m.k, m.recall, m.k, m.ndcg
                    )
                });
                notice!(
                    "{what}: epoch {}/{}: loss {:.5}, {:.0} examples/s{valid}",
                    p.epoch,
                    p.epochs,
                    p.loss,
                    p.examples_per_s
                );
                self.last_notice = Instant::now();
            }
            Event::Step(p) if self.last_notice.elapsed().as_secs() >= 10 => {
                notice!(
                    "{what}: epoch {}/{}: step {}/{}, loss {:.5}, {:.0} examples/s",
                    p.epoch,
                    p.epochs,
                    p.step,
                    p.steps,
                    p.loss,
                    p.examples_per_s
                );
                self.last_notice = Instant::now();
            }
            _ => {}
        }
    }

    /// Sets the phase (written at once).
    pub fn phase(&mut self, phase: &str) {
        self.state["phase"] = json!(phase);
        self.write();
    }

    /// Records a step or an epoch end of the core's run (`force` writes at once).
    pub fn progress(&mut self, p: &twotower_train::Progress, force: bool) {
        let s = &mut self.state;
        s["phase"] = json!("training");
        s["epoch"] = json!(p.epoch);
        s["epochs"] = json!(p.epochs);
        s["step"] = json!(p.step);
        s["steps"] = json!(p.steps);
        s["loss"] = json!(finite(p.loss));
        s["examples_per_s"] = json!(finite(p.examples_per_s));
        if let Some(m) = p.valid {
            s["last_recall"] = json!(finite(m.recall));
            let best = s["best_recall"].as_f64();
            if best.is_none_or(|b| m.recall > b) {
                s["best_recall"] = json!(finite(m.recall));
                s["best_epoch"] = json!(p.epoch);
            }
        }
        if force || self.last.is_none_or(|t| t.elapsed() >= EVERY) {
            self.write();
        }
    }

    fn write(&mut self) {
        let Some(path) = &self.path else { return };
        self.state["updated_at"] = json!(now_ts());
        let tmp = path.with_extension("tmp");
        let ok = std::fs::write(&tmp, self.state.to_string()).is_ok()
            && std::fs::rename(&tmp, path).is_ok();
        if !ok {
            // A full or read-only disk: no progress rows, the run goes on.
            let _ = std::fs::remove_file(&tmp);
        }
        self.last = Some(Instant::now());
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        if let Some(p) = &self.path {
            let _ = std::fs::remove_file(p);
        }
    }
}

fn finite(x: f64) -> Option<f64> {
    x.is_finite().then_some(x)
}

fn now_ts() -> i64 {
    // SAFETY: reads the clock; no side effects.
    unsafe { pg_sys::GetCurrentTimestamp() }
}

/// Removes the files of backends that no longer exist (a crash leaves its file behind).
fn remove_stale() {
    let Ok(rd) = std::fs::read_dir(DIR) else {
        return;
    };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        let Some(pid) = name.split('.').next().and_then(|p| p.parse::<i32>().ok()) else {
            continue;
        };
        // SAFETY: looks up the proc array under ProcArrayLock (BackendPidGetProc takes it).
        let alive = unsafe { !pg_sys::BackendPidGetProc(pid).is_null() };
        if !alive {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

#[pg_schema]
pub mod twotower {
    use super::DIR;
    use pgrx::prelude::*;
    use serde_json::Value;

    /// The progress of the training runs of roles whose privileges the caller has (members of
    /// `pg_read_all_stats` see all), one row per run; `twotower.train_progress` joins it with
    /// `pg_stat_activity` to drop files of crashed backends.
    #[pg_extern(volatile, parallel_safe)]
    #[allow(clippy::type_complexity)]
    pub fn train_progress_info() -> TableIterator<
        'static,
        (
            name!(pid, i32),
            name!(role, pg_sys::Oid),
            name!(database, pg_sys::Oid),
            name!(backend_start, TimestampWithTimeZone),
            name!(user_model, String),
            name!(item_model, Option<String>),
            name!(phase, String),
            name!(epoch, Option<i32>),
            name!(epochs, Option<i32>),
            name!(step, Option<i64>),
            name!(steps, Option<i64>),
            name!(loss, Option<f64>),
            name!(examples_per_s, Option<f64>),
            name!(last_recall, Option<f64>),
            name!(best_recall, Option<f64>),
            name!(best_epoch, Option<i32>),
            name!(started_at, TimestampWithTimeZone),
            name!(updated_at, TimestampWithTimeZone),
        ),
    > {
        // SAFETY: reading this backend's user id.
        let me = unsafe { pg_sys::GetUserId() };
        // SAFETY: a catalogue lookup of role membership.
        let all = unsafe {
            pg_sys::has_privs_of_role(me, pg_sys::Oid::from(pg_sys::ROLE_PG_READ_ALL_STATS))
        };
        let mut rows = Vec::new();
        let mut files: Vec<_> = std::fs::read_dir(DIR)
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.path())
                    .filter(|p| p.extension().is_some_and(|x| x == "json"))
                    .collect()
            })
            .unwrap_or_default();
        files.sort();
        for path in files {
            check_for_interrupts!();
            // A regular file of at most 64 kB (the writer's are a few hundred bytes).
            let Ok(meta) = std::fs::symlink_metadata(&path) else {
                continue;
            };
            if !meta.is_file() || meta.len() > 65_536 {
                continue;
            }
            let Some(v) = std::fs::read(&path)
                .ok()
                .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
            else {
                continue;
            };
            let int = |k: &str| v.get(k).and_then(Value::as_i64);
            let num = |k: &str| v.get(k).and_then(Value::as_f64);
            let text = |k: &str| {
                v.get(k)
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_owned()
            };
            let (Some(pid), Some(role), Some(db)) = (int("pid"), int("role"), int("database"))
            else {
                continue;
            };
            let Ok(role_oid) = u32::try_from(role).map(pg_sys::Oid::from) else {
                continue;
            };
            // SAFETY: a catalogue lookup of role membership.
            if !all && !unsafe { pg_sys::has_privs_of_role(me, role_oid) } {
                continue;
            }
            let ts = |k: &str| {
                int(k).and_then(|t| {
                    TimestampWithTimeZone::try_from(pg_sys::TimestampTz::from(t)).ok()
                })
            };
            let (Some(bs), Some(st), Some(up)) =
                (ts("backend_start"), ts("started_at"), ts("updated_at"))
            else {
                continue;
            };
            rows.push((
                pid as i32,
                role_oid,
                pg_sys::Oid::from(db as u32),
                bs,
                text("user_model"),
                v.get("item_model")
                    .and_then(Value::as_str)
                    .map(str::to_owned),
                text("phase"),
                int("epoch").map(|x| x as i32),
                int("epochs").map(|x| x as i32),
                int("step"),
                int("steps"),
                num("loss"),
                num("examples_per_s"),
                num("last_recall"),
                num("best_recall"),
                int("best_epoch").map(|x| x as i32),
                st,
                up,
            ));
        }
        TableIterator::new(rows)
    }
}
