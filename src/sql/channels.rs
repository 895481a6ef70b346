//! SQL surface of the item-to-item channels: `twotower.build_channel` reads an interactions
//! table as the caller, computes item-CF or Swing neighbours with the core (`crates/cf`) and
//! writes them to an ordinary neighbour table `(item_id, neighbor_id, score)`;
//! `twotower.refresh_channel` recomputes only the rows that interactions newer than the last
//! build change; `twotower.i2i_recall` recalls from a history over the neighbour table. The
//! channel catalogue (`twotower.channel`) records kind, sources, options and build statistics;
//! a channel's owner is its neighbour table's owner (a role oid PostgreSQL keeps).

use pgrx::prelude::*;

#[pg_schema]
pub mod twotower {
    use crate::infra::catalog::{
        as_catalog_owner, caller, check_model_name, has_privs, is_admin, role_name, JsonbValue,
        RegClass, ADMIN_ROLE,
    };
    use crate::infra::error::{required, OrReport, TtError, TtResult};
    use crate::infra::spi::{self, is_table, read_rows, time_expr};
    use crate::serve::neighbors::Channel;
    use pgrx::pg_sys;
    use pgrx::prelude::*;
    use std::time::Instant;
    use twotower_cf::{Kind, Log, Options, Similarity};

    /// The most history items `i2i_recall` takes.
    const MAX_HISTORY: usize = 10_000;
    /// Work units (pair visits) per range of source items between cancellation checks.
    const CHUNK_WORK: u64 = 4_000_000;

    /// The owner of relation `rel` (None when it is gone).
    fn rel_owner(rel: pg_sys::Oid) -> Option<pg_sys::Oid> {
        crate::infra::catalog::read_row::<pg_sys::Oid, bool>(
            "SELECT relowner, true FROM pg_catalog.pg_class WHERE oid = $1",
            &[rel.into()],
        )
        .ok()
        .flatten()
        .and_then(|(o, _)| o)
    }

    /// Checks that the caller manages a channel whose neighbour table is `rel`: its owner (or a
    /// member of it) or a twotower_admin member.
    fn check_manage(name: &str, rel: pg_sys::Oid) -> TtResult<()> {
        let me = caller();
        let owner = rel_owner(rel);
        if is_admin(me) || owner.is_some_and(|o| has_privs(me, o)) {
            return Ok(());
        }
        Err(TtError::PermissionDenied {
            action: format!("manage channel \"{name}\""),
            hint: format!(
                "Only the owner of its neighbour table ({}) and members of {ADMIN_ROLE} may build, refresh or drop it.",
                owner.map_or("gone".into(), role_name)
            ),
        })
    }

    /// The quoted, possibly qualified name of `text` (a table name as the caller would write it).
    fn quoted_name(text: &str) -> TtResult<String> {
        crate::infra::catalog::read_row::<String, bool>(
            "SELECT pg_catalog.array_to_string(ARRAY(SELECT pg_catalog.quote_ident(x) FROM pg_catalog.unnest(pg_catalog.parse_ident($1)) AS x), '.'), true",
            &[text.into()],
        )
        .map_err(|e| TtError::BadArgument(format!("neighbour table name \"{text}\": {e}")))?
        .and_then(|(n, _)| n)
        .ok_or_else(|| TtError::BadArgument(format!("neighbour table name \"{text}\" is not a name")))
    }

    /// Checks that an existing neighbour table has the three columns with their types.
    fn check_neighbor_table(rel: pg_sys::Oid, name: &str) -> TtResult<()> {
        for (col, ty) in [
            ("item_id", "bigint"),
            ("neighbor_id", "bigint"),
            ("score", "real"),
        ] {
            let got = spi::column_type(rel, col).ok();
            if got.as_deref() != Some(ty) {
                let e = if got.is_none() {
                    TtError::UndefinedColumn
                } else {
                    TtError::WrongType
                };
                return Err(e(format!(
                    "neighbour table {name} must have column \"{col}\" of type {ty} (it has {})",
                    got.map_or("no such column".into(), |t| format!("type {t}"))
                )));
            }
        }
        Ok(())
    }

    /// Reads the interactions into a log; returns it with the newest time and, when `since`
    /// is given, the users with an interaction newer than it.
    /// Per user: (interactions, a digest of them that does not depend on their order).
    type Prints = std::collections::HashMap<String, (i64, i64)>;
    /// Per user: the newest interaction time.
    type Newest = std::collections::HashMap<String, f64>;

    /// One interaction's share of its user's digest (summed with wrapping: order-free).
    fn row_print(item: i64, t: f64, w: f32) -> i64 {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        (item, t.to_bits(), w.to_bits()).hash(&mut h);
        h.finish() as i64
    }

    /// Reads the interaction log and each user's fingerprint.
    fn read_log(ch: &Channel) -> TtResult<(Log, Option<f64>, Prints, Newest)> {
        let rel = ch.interactions;
        let src = spi::relation_name(rel)?;
        let uc = spi::column(rel, &ch.user_column, "user id")?;
        let ic = spi::column(rel, &ch.item_column, "item id")?;
        let ts = time_expr(rel, &ch.time_column)?;
        let w = match &ch.weight_column {
            Some(c) => format!("t.{}::pg_catalog.float4", spi::column(rel, c, "weight")?),
            None => "1::pg_catalog.float4".into(),
        };
        let order = if is_table(rel) {
            " ORDER BY t.ctid"
        } else {
            ""
        };
        let select = format!("SELECT t.{uc}::pg_catalog.text, t.{ic}::pg_catalog.int8, {ts}, {w} FROM {src} AS t{order}");
        let mut log = Log::default();
        let mut newest: Option<f64> = None;
        let mut prints = Prints::new();
        let mut latest = Newest::new();
        let mut progress = spi::Progress::new("channel: reading interactions", "rows");
        read_rows(&select, &src, Some(&mut progress), |row| {
            let (Some(u), Some(i), Some(t), Some(wt)) = (
                row.get::<String>(1)?,
                row.get::<i64>(2)?,
                row.get::<f64>(3)?,
                row.get::<f32>(4)?,
            ) else {
                TtError::NullValue(format!(
                    "a row of {src} has a NULL user id, item id, time or weight"
                ))
                .report();
            };
            log.push(&u, i, t, wt).map_err(TtError::Cf).or_report();
            newest = Some(newest.map_or(t, |n: f64| n.max(t)));
            let l = latest.entry(u.clone()).or_insert(t);
            *l = l.max(t);
            let p = prints.entry(u).or_insert((0, 0));
            p.0 += 1;
            p.1 = p.1.wrapping_add(row_print(i, t, wt));
            Ok(())
        })?;
        Ok((log, newest, prints, latest))
    }

    /// The fingerprints the last build or refresh of channel `name` stored.
    fn stored_prints(name: &str) -> TtResult<Prints> {
        as_catalog_owner(|| {
            Spi::connect(|c| {
                let mut out = Prints::new();
                for r in c.select(
                    "SELECT user_id, rows, digest FROM twotower.channel_user WHERE channel = $1",
                    None,
                    &[name.into()],
                )? {
                    if let (Some(u), Some(n), Some(d)) =
                        (r.get::<String>(1)?, r.get::<i64>(2)?, r.get::<i64>(3)?)
                    {
                        out.insert(u, (n, d));
                    }
                }
                Ok::<_, pgrx::spi::Error>(out)
            })
        })?
        .map_err(|e| TtError::Catalog(format!("reading the channel catalogue: {e}")))
    }

    /// Stores the fingerprints of `users` (all of `prints` when None, replacing the old ones)
    /// and forgets the users in `gone`.
    fn store_prints(
        name: &str,
        prints: &Prints,
        users: Option<&[String]>,
        gone: &[String],
    ) -> TtResult<()> {
        let rows: Vec<(&String, &(i64, i64))> = match users {
            None => prints.iter().collect(),
            Some(us) => us.iter().filter_map(|u| prints.get_key_value(u)).collect(),
        };
        as_catalog_owner(|| -> Result<(), pgrx::spi::Error> {
            if users.is_none() {
                Spi::run_with_args("DELETE FROM twotower.channel_user WHERE channel = $1", &[name.into()])?;
            }
            if !gone.is_empty() {
                Spi::run_with_args(
                    "DELETE FROM twotower.channel_user WHERE channel = $1 AND user_id = ANY ($2)",
                    &[name.into(), gone.to_vec().into()],
                )?;
            }
            for chunk in rows.chunks(50_000) {
                let u: Vec<String> = chunk.iter().map(|r| r.0.clone()).collect();
                let n: Vec<i64> = chunk.iter().map(|r| r.1 .0).collect();
                let d: Vec<i64> = chunk.iter().map(|r| r.1 .1).collect();
                Spi::run_with_args(
                    "INSERT INTO twotower.channel_user (channel, user_id, rows, digest)
                     SELECT $1, * FROM ROWS FROM (pg_catalog.unnest($2::pg_catalog.text[]), pg_catalog.unnest($3::pg_catalog.int8[]),
                                                  pg_catalog.unnest($4::pg_catalog.int8[]))
                     ON CONFLICT (channel, user_id) DO UPDATE SET rows = EXCLUDED.rows, digest = EXCLUDED.digest",
                    &[name.into(), u.into(), n.into(), d.into()],
                )?;
                pgrx::check_for_interrupts!();
            }
            Ok(())
        })?
        .map_err(|e| TtError::Catalog(format!("recording channel \"{name}\": {e}")))
    }

    fn budget() -> usize {
        // SAFETY: reading a GUC variable of this backend (an int in kB).
        unsafe { pg_sys::maintenance_work_mem as usize * 1024 }
    }

    /// Computes the rows of `sources` (item indices; all when None) and writes them with one
    /// prepared INSERT per 50 000 rows, answering cancellation between batches of sources.
    fn write_rows(sim: &Similarity, table: &str, sources: Option<&[u32]>) -> TtResult<i64> {
        let insert = spi::prepare(
            &format!(
                "INSERT INTO {table} (item_id, neighbor_id, score)
                 SELECT * FROM ROWS FROM (pg_catalog.unnest($1::pg_catalog.int8[]), pg_catalog.unnest($2::pg_catalog.int8[]),
                                          pg_catalog.unnest($3::pg_catalog.float4[]))"
            ),
            &[pg_sys::INT8ARRAYOID, pg_sys::INT8ARRAYOID, pg_sys::FLOAT4ARRAYOID],
        )
        .map_err(|e| TtError::BadArgument(format!("writing {table}: {e}")))?;
        // Batches of sources in item-id order (ranges of about CHUNK_WORK work, or the given
        // sources 256 at a time), so the rows reach the table's B-tree in key order.
        let batches: Vec<Vec<u32>> = match sources {
            None => sim
                .chunks(CHUNK_WORK)
                .into_iter()
                .map(|r| sim.sources(r).to_vec())
                .collect(),
            Some(s) => {
                let mut s = s.to_vec();
                s.sort_by_key(|&i| sim.item_id(i));
                s.chunks(256).map(<[u32]>::to_vec).collect()
            }
        };
        let mut written = 0i64;
        let mut progress = spi::Progress::new("channel: computing neighbours", "items");
        let mut pending: Vec<(i64, i64, f32)> = Vec::new();
        let flush = |rows: &mut Vec<(i64, i64, f32)>| -> TtResult<()> {
            if rows.is_empty() {
                return Ok(());
            }
            let a: Vec<i64> = rows.iter().map(|r| r.0).collect();
            let b: Vec<i64> = rows.iter().map(|r| r.1).collect();
            let c: Vec<f32> = rows.iter().map(|r| r.2).collect();
            Spi::connect_mut(|cl| {
                cl.update(&insert, None, &[a.into(), b.into(), c.into()])
                    .map(|_| ())
            })
            .map_err(|e| TtError::BadArgument(format!("writing {table}: {e}")))?;
            rows.clear();
            Ok(())
        };
        for batch in &batches {
            check_for_interrupts!();
            let n = batch.len();
            let mut rows = sim.rows_of(batch);
            // Within a source, by neighbour id: the key order of the primary key.
            rows.sort_by_key(|x| (x.0, x.1));
            written += rows.len() as i64;
            pending.extend(rows);
            if pending.len() >= 50_000 {
                flush(&mut pending)?;
            }
            progress.add(n);
        }
        flush(&mut pending)?;
        Ok(written)
    }

    #[allow(clippy::too_many_arguments)]
    fn record(
        name: &str,
        ch: &Channel,
        newest: Option<f64>,
        log: &Log,
        sim: &Similarity,
        rows: i64,
        secs: f64,
    ) -> TtResult<()> {
        let opts = pgrx::JsonB(ch.options.clone());
        as_catalog_owner(|| {
            Spi::run_with_args(
                "INSERT INTO twotower.channel AS c (name, kind, neighbors, interactions, user_column, item_column, time_column,
                        weight_column, options, built_at, watermark, items, users, interactions_read, rows, seconds)
                 VALUES ($1, $2, $3::pg_catalog.oid::pg_catalog.regclass, $4::pg_catalog.oid::pg_catalog.regclass, $5, $6, $7,
                         $8, $9, pg_catalog.now(), $10, $11, $12, $13, $14, $15)
                 ON CONFLICT (name) DO UPDATE SET kind = EXCLUDED.kind, neighbors = EXCLUDED.neighbors,
                        interactions = EXCLUDED.interactions, user_column = EXCLUDED.user_column,
                        item_column = EXCLUDED.item_column, time_column = EXCLUDED.time_column,
                        weight_column = EXCLUDED.weight_column, options = EXCLUDED.options,
                        built_at = EXCLUDED.built_at, watermark = EXCLUDED.watermark, items = EXCLUDED.items,
                        users = EXCLUDED.users, interactions_read = EXCLUDED.interactions_read,
                        rows = EXCLUDED.rows, seconds = EXCLUDED.seconds",
                &[
                    name.into(),
                    ch.kind.name().into(),
                    ch.neighbors.into(),
                    ch.interactions.into(),
                    ch.user_column.as_str().into(),
                    ch.item_column.as_str().into(),
                    ch.time_column.as_str().into(),
                    ch.weight_column.as_deref().into(),
                    opts.into(),
                    newest.into(),
                    (sim.items() as i64).into(),
                    (sim.users() as i64).into(),
                    (log.len() as i64).into(),
                    rows.into(),
                    secs.into(),
                ],
            )
        })?
        .map_err(|e| TtError::Catalog(format!("recording channel \"{name}\": {e}")))
    }

    /// Builds (or rebuilds) channel `name`: item-CF (`kind` 'itemcf') or Swing ('swing')
    /// neighbours of every item of `interactions`, top `top_n` per item, into the table
    /// `neighbors` (created with PRIMARY KEY (item_id, neighbor_id) when it does not exist;
    /// emptied and refilled when it does). Options: docs/channels.md.
    #[pg_extern(volatile, parallel_unsafe)]
    #[allow(clippy::too_many_arguments)]
    fn build_channel(
        name: Option<&str>,
        kind: Option<&str>,
        interactions: Option<RegClass>,
        neighbors: Option<&str>,
        options: default!(Option<JsonbValue>, "'{}'"),
        user_column: default!(Option<&str>, "'user_id'"),
        item_column: default!(Option<&str>, "'item_id'"),
        time_column: default!(Option<&str>, "'ts'"),
        weight_column: default!(Option<&str>, "NULL"),
    ) -> TableIterator<
        'static,
        (
            name!(channel, String),
            name!(kind, String),
            name!(items, i64),
            name!(users, i64),
            name!(interactions, i64),
            name!(rows, i64),
            name!(seconds, f64),
        ),
    > {
        let started = Instant::now();
        let (name, kind, interactions, neighbors) = (
            required(name, "name"),
            required(kind, "kind"),
            required(interactions, "interactions"),
            required(neighbors, "neighbors"),
        );
        let options = required(options, "options");
        let (user_column, item_column, time_column) = (
            required(user_column, "user_column"),
            required(item_column, "item_column"),
            required(time_column, "time_column"),
        );
        check_model_name(name).map_err(|_| TtError::BadArgument(format!("\"{name}\" is not a valid channel name (1..=63 of [A-Za-z0-9_.-], starting with a letter or _)"))).or_report();
        let kind = Kind::parse(kind).map_err(TtError::Cf).or_report();
        let opts_json = options.value("options").or_report();
        let opts = Options::parse(kind, &opts_json)
            .map_err(TtError::Cf)
            .or_report();
        let table = quoted_name(neighbors).or_report();
        // Privileges before reading anything: an existing channel is its owner's; a new one
        // needs twotower_admin (channel names are shared, as model names are).
        let existing = crate::serve::neighbors::find(name).or_report();
        let me = caller();
        match &existing {
            Some(ch) => {
                check_manage(name, ch.neighbors).or_report();
                if spi::regclass(&table) != Some(ch.neighbors) {
                    TtError::BadArgument(format!(
                        "channel \"{name}\" writes to another neighbour table; drop the channel first to change it"
                    ))
                    .report();
                }
            }
            None if !is_admin(me) => TtError::PermissionDenied {
                action: format!("create channel \"{name}\""),
                hint: format!(
                    "Members of {ADMIN_ROLE} create channels: GRANT {ADMIN_ROLE} TO {};",
                    role_name(me)
                ),
            }
            .report(),
            None => {}
        }
        let rel = match spi::regclass(&table) {
            Some(rel) => {
                check_neighbor_table(rel, &table).or_report();
                check_manage(name, rel).or_report();
                rel
            }
            None => {
                // Created as the caller, who owns it (and so the channel).
                Spi::run(&format!(
                    "CREATE TABLE {table} (item_id pg_catalog.int8 NOT NULL, neighbor_id pg_catalog.int8 NOT NULL,
                                           score pg_catalog.float4 NOT NULL, PRIMARY KEY (item_id, neighbor_id))"
                ))
                .map_err(|e| TtError::BadArgument(format!("creating {table}: {e}")))
                .or_report();
                spi::regclass(&table).expect("the table just created")
            }
        };
        let mut ch = Channel {
            kind,
            neighbors: rel,
            interactions: interactions.0,
            user_column: user_column.to_owned(),
            item_column: item_column.to_owned(),
            time_column: time_column.to_owned(),
            weight_column: weight_column.map(str::to_owned),
            options: opts_json,
            watermark: None,
        };
        let (log, newest, prints, _) = read_log(&ch).or_report();
        let sim = Similarity::new(&log, &opts, budget())
            .map_err(TtError::Cf)
            .or_report();
        if opts.half_life.is_some() && opts.decay_reference.is_none() {
            // Refreshes measure ages from this build's reference (old weights stay as they are).
            if let Some(o) = ch.options.as_object_mut() {
                o.insert("decay_reference".into(), serde_json::json!(sim.reference()));
            }
        }
        Spi::run(&format!("TRUNCATE {table}"))
            .map_err(|e| TtError::BadArgument(format!("emptying {table}: {e}")))
            .or_report();
        let rows = write_rows(&sim, &table, None).or_report();
        let secs = started.elapsed().as_secs_f64();
        record(name, &ch, newest, &log, &sim, rows, secs).or_report();
        store_prints(name, &prints, None, &[]).or_report();
        TableIterator::once((
            name.to_owned(),
            kind.name().to_owned(),
            sim.items() as i64,
            sim.users() as i64,
            log.len() as i64,
            rows,
            secs,
        ))
    }

    /// Recomputes the rows of channel `name` that interactions newer than its last build change
    /// (every row of an item of a user with new interactions; item-CF: also of the items sharing
    /// a user with those). The result equals a full build over the same interactions, when the
    /// interactions since the build were only added.
    #[pg_extern(volatile, parallel_unsafe)]
    fn refresh_channel(
        name: &str,
    ) -> TableIterator<
        'static,
        (
            name!(channel, String),
            name!(changed_users, i64),
            name!(affected_items, i64),
            name!(rows, i64),
            name!(seconds, f64),
        ),
    > {
        let started = Instant::now();
        let ch = crate::serve::neighbors::find(name)
            .or_report()
            .unwrap_or_else(|| TtError::UnknownChannel(name.to_owned()).report());
        check_manage(name, ch.neighbors).or_report();
        let table = spi::relation_name(ch.neighbors)
            .map_err(|_| {
                TtError::BadArgument(format!(
                    "the neighbour table of channel \"{name}\" was dropped"
                ))
            })
            .or_report();
        let opts = Options::parse(ch.kind, &ch.options)
            .map_err(TtError::Cf)
            .or_report();
        // A user changed when their interactions differ from the last read's (count and an
        // order-free digest): rows added late, whatever their time, count. A channel built
        // before 0.8.0 has no fingerprints: its first refresh goes by time, as it did.
        let (log, newest, prints, latest) = read_log(&ch).or_report();
        let before = stored_prints(name).or_report();
        let changed: Vec<String> = if before.is_empty() && ch.watermark.is_some() {
            let since = ch.watermark.unwrap_or(f64::NEG_INFINITY);
            let mut users: Vec<String> = latest
                .iter()
                .filter(|(_, &t)| t > since)
                .map(|(u, _)| u.clone())
                .collect();
            users.sort();
            users
        } else {
            let mut users: Vec<String> = prints
                .iter()
                .filter(|(u, p)| before.get(*u) != Some(*p))
                .map(|(u, _)| u.clone())
                .collect();
            users.sort();
            users
        };
        let gone: Vec<String> = before
            .keys()
            .filter(|u| !prints.contains_key(*u))
            .cloned()
            .collect();
        let sim = Similarity::new(&log, &opts, budget())
            .map_err(TtError::Cf)
            .or_report();
        let changed_refs: Vec<&str> = changed.iter().map(String::as_str).collect();
        let affected = sim.affected(&log, &changed_refs);
        let ids: Vec<i64> = affected.iter().map(|&i| sim.item_id(i)).collect();
        if !ids.is_empty() {
            Spi::run_with_args(
                &format!("DELETE FROM {table} WHERE item_id = ANY ($1)"),
                &[ids.into()],
            )
            .map_err(|e| TtError::BadArgument(format!("updating {table}: {e}")))
            .or_report();
        }
        let rows = write_rows(&sim, &table, Some(&affected)).or_report();
        let total = crate::infra::catalog::read_row::<i64, bool>(
            &format!("SELECT count(*), true FROM {table}"),
            &[],
        )
        .ok()
        .flatten()
        .and_then(|(n, _)| n)
        .unwrap_or(rows);
        let secs = started.elapsed().as_secs_f64();
        record(name, &ch, newest.or(ch.watermark), &log, &sim, total, secs).or_report();
        if before.is_empty() {
            store_prints(name, &prints, None, &[]).or_report();
        } else {
            store_prints(name, &prints, Some(&changed), &gone).or_report();
        }
        TableIterator::once((
            name.to_owned(),
            changed.len() as i64,
            affected.len() as i64,
            rows,
            secs,
        ))
    }

    /// Removes channel `name` from the catalogue; with `drop_table`, drops its neighbour table.
    #[pg_extern(volatile, parallel_unsafe)]
    fn drop_channel(name: &str, drop_table: default!(bool, "false")) -> bool {
        let ch = crate::serve::neighbors::find(name)
            .or_report()
            .unwrap_or_else(|| TtError::UnknownChannel(name.to_owned()).report());
        check_manage(name, ch.neighbors).or_report();
        crate::serve::pipelines::check_unused(crate::serve::pipelines::Uses::Channel, name)
            .or_report();
        if drop_table {
            if let Ok(t) = spi::relation_name(ch.neighbors) {
                Spi::run(&format!("DROP TABLE {t}"))
                    .map_err(|e| TtError::BadArgument(format!("dropping {t}: {e}")))
                    .or_report();
            }
        }
        as_catalog_owner(|| {
            Spi::run_with_args(
                "DELETE FROM twotower.channel WHERE name = $1",
                &[name.into()],
            )
        })
        .or_report()
        .map_err(|e| TtError::Catalog(format!("dropping channel \"{name}\": {e}")))
        .or_report();
        true
    }

    /// Recall from a history over channel `channel`'s neighbours: Σ_h weight_h · score(h, item)
    /// (weights default to 1), top `k`, with the history item contributing most (`via`).
    /// History items and `exclude` are never returned. Reads the neighbour table as the caller.
    #[pg_extern(stable, parallel_restricted)]
    fn i2i_recall(
        channel: Option<&str>,
        history: Option<Vec<Option<i64>>>,
        weights: default!(Option<Vec<Option<f32>>>, "NULL"),
        k: default!(Option<i32>, "100"),
        exclude: default!(Option<Vec<Option<i64>>>, "NULL"),
    ) -> TableIterator<
        'static,
        (
            name!(item_id, i64),
            name!(score, f32),
            name!(rank, i32),
            name!(via, i64),
        ),
    > {
        let (channel, history, k) = (
            required(channel, "channel"),
            required(history, "history"),
            required(k, "k"),
        );
        if !(1..=10_000).contains(&k) {
            TtError::BadArgument(format!("k must be between 1 and 10000, got {k}")).report();
        }
        if history.len() > MAX_HISTORY {
            TtError::BadArgument(format!(
                "a history of {} items is more than the {MAX_HISTORY} i2i_recall takes",
                history.len()
            ))
            .report();
        }
        let ids: Vec<i64> = history
            .iter()
            .map(|h| {
                h.unwrap_or_else(|| {
                    TtError::NullValue("history has a NULL element".into()).report()
                })
            })
            .collect();
        let ws: Vec<f32> = match weights {
            None => vec![1.0; ids.len()],
            Some(w) if w.len() == ids.len() => w
                .into_iter()
                .map(|x| {
                    x.unwrap_or_else(|| {
                        TtError::NullValue("weights has a NULL element".into()).report()
                    })
                })
                .collect(),
            Some(w) => TtError::BadArgument(format!(
                "weights has {} elements, history {}",
                w.len(),
                ids.len()
            ))
            .report(),
        };
        let exclude: Vec<i64> = exclude.unwrap_or_default().into_iter().flatten().collect();
        let history: Vec<(i64, f32)> = ids.into_iter().zip(ws).collect();
        let hits =
            crate::serve::neighbors::i2i_hits(channel, &history, k as usize, &exclude).or_report();
        TableIterator::new(
            hits.into_iter()
                .map(|h| (h.item, h.score, h.rank as i32, h.via)),
        )
    }
}
