//! Shards: the foreign partitions of a partitioned item table, searched by `recall()` (and the
//! pipelines' two-tower channels) next to its local leaves.
//!
//! PostgreSQL's catalogue is the topology: the partitioned table's foreign partitions, their
//! foreign servers and user mappings. Every shard is asked for its own top `k` at once, the
//! user vector (computed once, here) sent as a parameter; the caller merges the lists. Two
//! ways to ask (`twotower.shard_protocol`): pg_twotower's own libpq client, one prepared
//! statement per shard (`crate::infra::shard_conn`, the default), or one statement through
//! postgres_fdw, `ORDER BY vector <op> $1 LIMIT k` per shard joined by UNION ALL, which
//! postgres_fdw runs at once on servers marked `async_capable` and ships to servers that list
//! `pg_twotower` in their `extensions`.

use crate::infra::error::{TtError, TtResult};
use pgrx::prelude::*;
use pgrx::spi::quote_identifier;
use pgrx::PgTryBuilder;
use std::cell::RefCell;
use std::rc::Rc;
use twotower_ann::Metric;

/// The foreign partitions of a partitioned table, and how to ask them.
pub struct Shards {
    /// Each foreign partition, schema-qualified and quoted, its oid and its foreign server's name.
    tables: Vec<(String, pg_sys::Oid, String)>,
    id_column: String,
    vector_column: String,
    metric: Metric,
}

/// What one foreign partition did in this session's last fan-out.
#[derive(Clone)]
struct Report {
    partition: String,
    server: String,
    answered: bool,
    items: i32,
    ms: Option<f64>,
    error: Option<String>,
}

thread_local! {
    /// The foreign partitions the last fan-out of this session asked (`twotower.fanout_report()`).
    static LAST: RefCell<Vec<Report>> = const { RefCell::new(Vec::new()) };
}

fn fail(e: pgrx::spi::Error) -> TtError {
    TtError::BadArgument(format!("reading the partitions of the index: {e}"))
}

/// The foreign partitions of the table of partitioned index `index` (None when it has none),
/// with the index's vector column and metric (its operator class, read by the access method)
/// and the table's item id column: its primary key,
/// or, since a table with foreign partitions cannot have one, its partition key (one integer
/// column).
///
/// Read once per backend until a relation it mentions changes (the caller has locked the
/// partitioned table and index, which takes in the invalidations committed before).
pub fn shards(index: pg_sys::Oid) -> TtResult<Option<Rc<Shards>>> {
    crate::infra::relcache::subscribe(forget);
    if let Some(known) = KNOWN.with(|c| c.get(index.to_u32())) {
        return Ok(known);
    }
    let found = read_shards(index)?.map(Rc::new);
    // SAFETY: a catalogue lookup of an index that exists (the caller has it locked).
    let parent = unsafe { pg_sys::IndexGetRelation(index, false) };
    let mentions = found
        .iter()
        .flat_map(|s| s.tables.iter().map(|(_, o, _)| o.to_u32()))
        .chain([parent.to_u32()])
        .collect();
    KNOWN.with(|c| c.put(index.to_u32(), mentions, found.clone()));
    Ok(found)
}

thread_local! {
    /// The shards of partitioned indexes (None: no foreign partitions), by index oid.
    static KNOWN: crate::infra::relcache::RelCache<Option<Rc<Shards>>> = const { crate::infra::relcache::RelCache::new() };
}

fn forget(relid: u32) {
    KNOWN.with(|c| c.forget(relid));
}

fn read_shards(index: pg_sys::Oid) -> TtResult<Option<Shards>> {
    let row = Spi::connect(|c| {
        let tables: Vec<(String, pg_sys::Oid, String)> = c
            .select(
                "SELECT pg_catalog.format('%I.%I', n.nspname, c.relname), c.oid, s.srvname::text
                   FROM pg_catalog.pg_partition_tree((SELECT indrelid FROM pg_catalog.pg_index WHERE indexrelid = $1)) p
                   JOIN pg_catalog.pg_class c ON c.oid OPERATOR(pg_catalog.=) p.relid
                   JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) c.relnamespace
                   JOIN pg_catalog.pg_foreign_table f ON f.ftrelid OPERATOR(pg_catalog.=) c.oid
                   JOIN pg_catalog.pg_foreign_server s ON s.oid OPERATOR(pg_catalog.=) f.ftserver
                  WHERE c.relkind OPERATOR(pg_catalog.=) 'f' ORDER BY p.relid",
                None,
                &[index.into()],
            )?
            .map(|r| Ok::<_, pgrx::spi::Error>((r.get::<String>(1)?, r.get::<pg_sys::Oid>(2)?, r.get::<String>(3)?)))
            .collect::<Result<Vec<_>, _>>()?
            .into_iter()
            .filter_map(|(t, o, s)| Some((t?, o?, s?)))
            .collect();
        if tables.is_empty() {
            return Ok(None);
        }
        let cols = c
            .select(
                "SELECT (SELECT a.attname::text FROM pg_catalog.pg_attribute a
                          WHERE a.attrelid OPERATOR(pg_catalog.=) i.indrelid AND a.attnum OPERATOR(pg_catalog.=) i.indkey[0]),
                        (SELECT a.attname::text FROM pg_catalog.pg_attribute a
                          WHERE a.attrelid OPERATOR(pg_catalog.=) i.indrelid AND a.attnum OPERATOR(pg_catalog.=) COALESCE(
                            (SELECT k.indkey[0] FROM pg_catalog.pg_index k
                              WHERE k.indrelid OPERATOR(pg_catalog.=) i.indrelid AND k.indisprimary AND k.indnkeyatts OPERATOR(pg_catalog.=) 1),
                            (SELECT t.partattrs[0] FROM pg_catalog.pg_partitioned_table t
                              WHERE t.partrelid OPERATOR(pg_catalog.=) i.indrelid AND t.partnatts OPERATOR(pg_catalog.=) 1))
                            AND a.atttypid OPERATOR(pg_catalog.=) ANY ('{int2,int4,int8}'::pg_catalog.regtype[]))
                   FROM pg_catalog.pg_index i WHERE i.indexrelid OPERATOR(pg_catalog.=) $1",
                None,
                &[index.into()],
            )?
            .first();
        let (vector, id) = (cols.get::<String>(1)?, cols.get::<String>(2)?);
        Ok::<_, pgrx::spi::Error>(Some((tables, vector, id)))
    })
    .map_err(fail)?;
    let Some((tables, vector, id)) = row else {
        return Ok(None);
    };
    let Some(vector) = vector else {
        return Err(TtError::Unsupported(
            "recall() does not support expression indexes".into(),
        ));
    };
    let Some(id) = id else {
        return Err(TtError::NoItemId(
            "a partitioned table with foreign partitions needs its item id as its partition key (one integer column)".into(),
        ));
    };
    let metric = crate::am::search::index_metric(index, "recall()")?;
    Ok(Some(Shards {
        tables,
        id_column: id,
        vector_column: vector,
        metric,
    }))
}

impl Shards {
    pub fn metric(&self) -> Metric {
        self.metric
    }

    /// Each shard's `k` nearest rows to `query` that are not in `exclude`, as (item id,
    /// distance as the SQL operator computes it), all shards together (unordered). With
    /// `twotower.unavailable_shards = skip`, a shard that fails is left out with a WARNING.
    /// What each shard did is kept for `twotower.fanout_report()`.
    pub fn nearest(
        &self,
        query: &[f32],
        k: usize,
        exclude: &[i64],
        ef_search: i32,
    ) -> TtResult<Vec<(i64, f64)>> {
        let skip = crate::infra::gucs::UNAVAILABLE_SHARDS.get()
            == crate::infra::gucs::UnavailableShards::Skip;
        LAST.with(|l| l.borrow_mut().clear());
        // One answer (or failure) per shard, in the order of `self.tables`.
        let mut answers: Vec<Result<(Vec<(i64, f64)>, Option<f64>), String>> =
            Vec::with_capacity(self.tables.len());
        if crate::infra::gucs::SHARD_PROTOCOL.get() == crate::infra::gucs::ShardProtocol::Direct {
            let remotes: Vec<crate::infra::shard_conn::Remote> = self
                .tables
                .iter()
                .map(|(_, rel, _)| {
                    crate::infra::shard_conn::remote(*rel, &self.id_column, &self.vector_column)
                })
                .collect::<TtResult<_>>()?;
            let op = self.operator()?;
            match crate::infra::shard_conn::nearest(&remotes, &op, query, k, exclude, ef_search) {
                Ok(all) => answers.extend(all.into_iter().map(|a| Ok((a.rows, Some(a.ms))))),
                Err(e) if !skip => return Err(e),
                Err(_) => {
                    // Each shard on its own: the ones that answer count.
                    for r in &remotes {
                        answers.push(
                            crate::infra::shard_conn::nearest(
                                std::slice::from_ref(r),
                                &op,
                                query,
                                k,
                                exclude,
                                ef_search,
                            )
                            .map_err(|e| crate::infra::error::describe(&e))
                            .and_then(|mut a| match a.pop() {
                                Some(a) => Ok((a.rows, Some(a.ms))),
                                None => Err(format!(
                                    "shard server \"{}\" sent no answer",
                                    r.server_name
                                )),
                            }),
                        );
                    }
                }
            }
        } else {
            let all: Vec<usize> = (0..self.tables.len()).collect();
            if !skip {
                answers.extend(
                    self.ask(&all, query, k, exclude)?
                        .into_iter()
                        .map(|rows| Ok((rows, None))),
                );
            } else if let Ok(r) = in_subtransaction(|| self.ask(&all, query, k, exclude)) {
                // All at once first (in a subtransaction); after a failure, each shard on its
                // own, so that a failure rolls back that shard only.
                answers.extend(r?.into_iter().map(|rows| Ok((rows, None))));
            } else {
                for i in all {
                    let start = std::time::Instant::now();
                    match in_subtransaction(|| self.ask(&[i], query, k, exclude)) {
                        Ok(Ok(mut rows)) => answers.push(Ok((
                            rows.pop().unwrap_or_default(),
                            Some(start.elapsed().as_secs_f64() * 1e3),
                        ))),
                        Ok(Err(e)) => return Err(e),
                        Err(msg) => answers.push(Err(msg)),
                    }
                }
            }
        }
        let mut out = Vec::new();
        let mut failed = Vec::new();
        let mut report = Vec::with_capacity(self.tables.len());
        for ((table, _, server), a) in self.tables.iter().zip(answers) {
            let (answered, items, ms, error) = match a {
                Ok((rows, ms)) => {
                    let n = rows.len() as i32;
                    out.extend(rows);
                    (true, n, ms, None)
                }
                Err(msg) => {
                    failed.push(format!("{table} ({msg})"));
                    (false, 0, None, Some(msg))
                }
            };
            report.push(Report {
                partition: table.clone(),
                server: server.clone(),
                answered,
                items,
                ms,
                error,
            });
        }
        LAST.with(|l| *l.borrow_mut() = report);
        if !failed.is_empty() {
            pgrx::warning!(
                "recall() left out {} of {} foreign partitions that did not answer: {}",
                failed.len(),
                self.tables.len(),
                failed.join("; ")
            );
        }
        Ok(out)
    }

    /// The metric's operator, qualified by the schema it lives in here (the extension's own
    /// schema, `public` unless `CREATE EXTENSION ... SCHEMA` chose another; shards install the
    /// extension into the same schema).
    fn operator(&self) -> TtResult<String> {
        distance_operator(self.metric)
    }

    /// The top `k` of each of the shards numbered `which` in one statement (the branches joined
    /// by UNION ALL): one list per shard, in the order of `which`.
    fn ask(
        &self,
        which: &[usize],
        query: &[f32],
        k: usize,
        exclude: &[i64],
    ) -> TtResult<Vec<Vec<(i64, f64)>>> {
        let op = self.operator()?;
        let (id, v) = (
            quote_identifier(&self.id_column),
            quote_identifier(&self.vector_column),
        );
        let branches: Vec<String> = which
            .iter()
            .enumerate()
            .map(|(b, &i)| {
                let t = &self.tables[i].0;
                format!(
                    "(SELECT {b}, s.{id}::pg_catalog.int8, (s.{v} {op} $1)::pg_catalog.float8 FROM {t} s
                       WHERE s.{id} OPERATOR(pg_catalog.<>) ALL ($2) AND s.{v} IS NOT NULL
                       ORDER BY s.{v} {op} $1 LIMIT $3)"
                )
            })
            .collect();
        let sql = branches.join(" UNION ALL ");
        let mut out = vec![Vec::with_capacity(k); which.len()];
        Spi::connect(|c| {
            for r in c.select(
                &sql,
                None,
                &[
                    query.to_vec().into(),
                    exclude.to_vec().into(),
                    (k as i64).into(),
                ],
            )? {
                if let (Some(b), Some(i), Some(d)) =
                    (r.get::<i32>(1)?, r.get::<i64>(2)?, r.get::<f64>(3)?)
                {
                    if let Some(list) = out.get_mut(b as usize) {
                        list.push((i, d));
                    }
                }
            }
            Ok::<_, pgrx::spi::Error>(())
        })
        .map_err(|e| TtError::BadArgument(format!("asking the shards: {e}")))?;
        Ok(out)
    }
}

/// Runs `f` in an internal subtransaction: committed when `f` returns, rolled back when it
/// raises an ERROR, whose message is then returned (a cancel or a FATAL is not caught: only
/// errors). Memory context and resource owner are restored either way.
fn in_subtransaction<R>(f: impl FnOnce() -> R) -> Result<R, String> {
    // SAFETY: the standard pattern of PL handlers: begin an internal subtransaction, and on
    // success release it, on error roll it back, restoring the caller's memory context and
    // resource owner in both cases.
    unsafe {
        let (cx, owner) = (pg_sys::CurrentMemoryContext, pg_sys::CurrentResourceOwner);
        pg_sys::BeginInternalSubTransaction(std::ptr::null());
        pg_sys::MemoryContextSwitchTo(cx);
        let f = std::panic::AssertUnwindSafe(f);
        PgTryBuilder::new(move || {
            let whole = f;
            let r = (whole.0)();
            pg_sys::ReleaseCurrentSubTransaction();
            pg_sys::MemoryContextSwitchTo(cx);
            pg_sys::CurrentResourceOwner = owner;
            Ok(r)
        })
        .catch_others(move |e| {
            pg_sys::MemoryContextSwitchTo(cx);
            pg_sys::RollbackAndReleaseCurrentSubTransaction();
            pg_sys::MemoryContextSwitchTo(cx);
            pg_sys::CurrentResourceOwner = owner;
            let (code, message) = match &e {
                pg_sys::panic::CaughtError::PostgresError(r)
                | pg_sys::panic::CaughtError::ErrorReport(r)
                | pg_sys::panic::CaughtError::RustPanic { ereport: r, .. } => {
                    (r.sql_error_code(), r.message().to_owned())
                }
            };
            if code == pgrx::PgSqlErrorCode::ERRCODE_QUERY_CANCELED {
                // A cancel or statement_timeout ends the whole call.
                e.rethrow()
            }
            Err(message)
        })
        .execute()
    }
}

#[pg_schema]
mod twotower {
    use pgrx::prelude::*;

    /// The foreign partitions (shards) that this session's last fan-out asked (a `recall()` or a
    /// pipeline's two-tower channel over a partitioned table with foreign partitions): whether
    /// each answered, how many items it returned, the milliseconds until its answer was read
    /// (NULL when one postgres_fdw statement asked them together) and why it did not answer.
    /// Empty before the first fan-out. With `twotower.unavailable_shards = skip`, this says which
    /// shards a partial result is missing.
    #[pg_extern(volatile, parallel_restricted)]
    fn fanout_report() -> TableIterator<
        'static,
        (
            name!(partition, String),
            name!(server, String),
            name!(answered, bool),
            name!(items, i32),
            name!(ms, Option<f64>),
            name!(error, Option<String>),
        ),
    > {
        let rows = super::LAST.with(|l| {
            l.borrow()
                .iter()
                .map(|r| {
                    (
                        r.partition.clone(),
                        r.server.clone(),
                        r.answered,
                        r.items,
                        r.ms,
                        r.error.clone(),
                    )
                })
                .collect::<Vec<_>>()
        });
        TableIterator::new(rows)
    }
}

/// The distance operator of `metric` on real[], schema-qualified (the operators live in the
/// extension's schema, whatever it is).
pub fn distance_operator(metric: Metric) -> TtResult<String> {
    let (name, function) = match metric {
        Metric::L2 => ("<->", "l2_distance"),
        Metric::InnerProduct => ("<#>", "negative_inner_product"),
        Metric::Cosine => ("<=>", "cosine_distance"),
    };
    let schema = crate::infra::catalog::read_row::<String, String>(
        "SELECT pg_catalog.quote_ident(n.nspname), '' FROM pg_catalog.pg_operator o
           JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) o.oprnamespace
          WHERE o.oprname OPERATOR(pg_catalog.=) $1
            AND o.oprcode OPERATOR(pg_catalog.=) pg_catalog.to_regprocedure($2)
          ORDER BY o.oid LIMIT 1",
        &[
            name.into(),
            format!("twotower.{function}(real[],real[])").into(),
        ],
    )
    .map_err(|e| TtError::BadArgument(format!("looking up the operator {name}: {e}")))?
    .and_then(|(s, _)| s)
    .ok_or_else(|| {
        TtError::Damaged(format!(
            "the operator {name} on real[] of pg_twotower is missing"
        ))
    })?;
    Ok(format!("OPERATOR({schema}.{name})"))
}
