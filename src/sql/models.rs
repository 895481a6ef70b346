//! SQL surface of the model catalogue: import (from bytea or server files), activate, drop.
//! Privileges and catalogue access live in `catalog.rs`; validation in the tower core.

use crate::infra::catalog;
use crate::infra::error::{OrReport, TtError};
use pgrx::prelude::*;

#[pg_schema]
pub mod twotower {
    use crate::infra::catalog::{
        self, as_catalog_owner, caller, check_manage, check_model_name, is_admin, model_owner,
        role_name, JsonbValue, RegRole, ADMIN_ROLE,
    };
    use crate::infra::error::{OrReport, TtError, TtResult};
    use pgrx::pg_sys;
    use pgrx::prelude::*;
    use twotower_tower::Model;

    /// The largest spec or weights file `import_model_file` reads.
    const MAX_FILE_BYTES: u64 = 1 << 30;

    /// Whether the caller may store a new version of `name` (the model exists and the caller
    /// manages it, or it does not exist and the caller may create models). Checked before any
    /// long work whose result would be stored.
    pub(crate) fn check_can_store(name: &str) -> TtResult<bool> {
        check_model_name(name)?;
        let me = caller();
        match model_owner(name) {
            Ok(owner) => {
                check_manage(name, owner)?;
                Ok(true)
            }
            Err(TtError::ModelNotFound { .. }) if is_admin(me) => Ok(false),
            Err(TtError::ModelNotFound { .. }) => Err(TtError::PermissionDenied {
                action: format!("create model \"{name}\""),
                hint: format!(
                    "Members of {ADMIN_ROLE} create models: GRANT {ADMIN_ROLE} TO {};",
                    role_name(me)
                ),
            }),
            Err(e) => Err(e),
        }
    }

    pub(crate) fn import(
        name: &str,
        spec: &serde_json::Value,
        weights: &[u8],
        activate: bool,
        train_options: Option<&serde_json::Value>,
    ) -> TtResult<i32> {
        check_model_name(name)?;
        let spec_text = spec.to_string();
        // Validate everything before touching the catalogue.
        let model = Model::load(&spec_text, weights)?;
        let checksum = (twotower_ann::checksum(weights)
            ^ twotower_ann::checksum(spec_text.as_bytes()).rotate_left(1))
            as i64;
        let me = caller();
        let me_name = role_name(me);
        let exists = check_can_store(name)?;
        if !exists {
            as_catalog_owner(|| {
                Spi::run_with_args(
                    "INSERT INTO twotower.model (name) VALUES ($1)",
                    &[name.into()],
                )
            })?
            .map_err(|e| TtError::Catalog(format!("storing model \"{name}\": {e}")))?;
            catalog::set_model_owner(name, me)?;
        }
        let version = as_catalog_owner(|| -> Result<i32, pgrx::spi::Error> {
            let v = Spi::get_one_with_args::<i32>(
                "UPDATE twotower.model SET next_version = next_version + 1 WHERE name = $1
                 RETURNING next_version - 1",
                &[name.into()],
            )?
            .unwrap_or(1);
            Spi::run_with_args(
                "INSERT INTO twotower.model_version
                   (model, version, kind, dim, metric, parameters, checksum, spec, weights, imported_by, train_options)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8::jsonb, $9, $10::name, $11::jsonb)",
                &[
                    name.into(),
                    v.into(),
                    model.kind().name().into(),
                    (model.output_dim() as i32).into(),
                    model.metric().spec_name().into(),
                    (model.parameter_count() as i64).into(),
                    checksum.into(),
                    spec_text.as_str().into(),
                    weights.into(),
                    me_name.clone().into(),
                    train_options.map(|o| o.to_string()).into(),
                ],
            )?;
            if activate {
                Spi::run_with_args(
                    "UPDATE twotower.model SET active_version = $2 WHERE name = $1",
                    &[name.into(), v.into()],
                )?;
            }
            Ok(v)
        })?
        .map_err(|e| TtError::Catalog(format!("storing model \"{name}\": {e}")))?;
        catalog::invalidate();
        Ok(version)
    }

    /// Imports a new version of model `name` from a JSON spec and safetensors weights (see
    /// docs/model-format.md); everything is validated first. Returns the new version number.
    /// With `activate` (the default) the new version serves from the next transaction on.
    #[pg_extern(volatile, parallel_unsafe)]
    fn import_model(
        name: &str,
        spec: JsonbValue,
        weights: &[u8],
        activate: default!(bool, true),
    ) -> i32 {
        let spec = spec.value("spec").or_report();
        import(name, &spec, weights, activate, None).or_report()
    }

    /// Copies model `name`'s active version to every Citus worker (a Citus coordinator only):
    /// each worker imports it as a new version of its own model `name` and activates it, so
    /// what runs a model by name on a worker (an `embed_user` Citus ships there, `recall()` on a
    /// worker's shard index) finds it. Only a role that may store a new version of the model
    /// here may copy it. Not one transaction: each worker commits its import (Citus's
    /// `run_command_on_workers`, as the caller); a worker that fails is an error naming it,
    /// after the others have imported. Returns each worker and the version it made.
    #[pg_extern(volatile, parallel_unsafe)]
    fn distribute_model(
        name: &str,
    ) -> TableIterator<'static, (name!(node, String), name!(version, i32))> {
        if !check_can_store(name).or_report() {
            TtError::ModelNotFound {
                name: name.to_string(),
                version: None,
            }
            .report();
        }
        if !crate::infra::citus::is_coordinator().or_report() {
            TtError::Unsupported(
                "distribute_model copies a model to the Citus workers: this node is not a Citus coordinator with workers".into(),
            )
            .report();
        }
        let l = crate::infra::catalog::active_model(name).or_report();
        let (spec, weights) =
            crate::infra::catalog::model_blobs(name, l.loaded.version).or_report();
        let hex = crate::infra::spi::hex(&weights);
        let command = format!(
            "SELECT twotower.import_model({}, {}::jsonb, '\\x{hex}'::bytea)",
            pgrx::spi::quote_literal(name),
            pgrx::spi::quote_literal(&spec)
        );
        drop(hex);
        let rows = Spi::connect(|c| {
            let t = c.select(
                "SELECT w.nodename OPERATOR(pg_catalog.||) ':' OPERATOR(pg_catalog.||) w.nodeport, w.success, w.result
                   FROM pg_catalog.run_command_on_workers($1) AS w ORDER BY 1",
                None,
                &[command.as_str().into()],
            )?;
            let mut out = Vec::new();
            for r in t {
                out.push((
                    r.get::<String>(1)?.unwrap_or_default(),
                    r.get::<bool>(2)?.unwrap_or(false),
                    r.get::<String>(3)?.unwrap_or_default(),
                ));
            }
            Ok::<_, pgrx::spi::Error>(out)
        })
        .map_err(|e| TtError::Internal(format!("distribute_model: {e}")))
        .or_report();
        let mut done = Vec::with_capacity(rows.len());
        for (node, ok, result) in rows {
            match (ok, result.parse::<i32>()) {
                (true, Ok(v)) => done.push((node, v)),
                _ => TtError::ShardError {
                    server: node,
                    message: result,
                }
                .report(),
            }
        }
        TableIterator::new(done)
    }

    /// Reads a regular server file of at most 1 GB in chunks, answering cancellation between
    /// chunks. FIFOs, devices and directories are refused before anything is read.
    fn read_server_file(path: &str, what: &str) -> TtResult<Vec<u8>> {
        use std::io::Read;
        use std::os::unix::fs::OpenOptionsExt;
        let fail = |e: std::io::Error| {
            if e.kind() == std::io::ErrorKind::NotFound {
                TtError::FileMissing(format!("{what} file \"{path}\" does not exist"))
            } else {
                TtError::FileIo(format!("could not read {what} file \"{path}\": {e}"))
            }
        };
        let not_regular =
            || TtError::BadArgument(format!("{what} file \"{path}\" is not a regular file"));
        if !std::fs::metadata(path).map_err(fail)?.is_file() {
            return Err(not_regular());
        }
        // O_NONBLOCK: a file swapped for a FIFO after the check cannot block the open.
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(0o4000)
            .open(path)
            .map_err(fail)?;
        let meta = f.metadata().map_err(fail)?;
        if !meta.is_file() {
            return Err(not_regular());
        }
        let too_large =
            || TtError::FileTooLarge(format!("{what} file \"{path}\" is larger than 1 GB"));
        if meta.len() > MAX_FILE_BYTES {
            return Err(too_large());
        }
        let mut out = Vec::with_capacity(meta.len() as usize);
        let mut chunk = vec![0u8; 1 << 20];
        loop {
            check_for_interrupts!();
            let n = f.read(&mut chunk).map_err(fail)?;
            if n == 0 {
                break;
            }
            if out.len() as u64 + n as u64 > MAX_FILE_BYTES {
                return Err(too_large());
            }
            out.extend_from_slice(&chunk[..n]);
        }
        Ok(out)
    }

    /// Imports a model from files on the database server (relative paths are relative to the
    /// data directory). Needs the privileges of pg_read_server_files (or superuser).
    #[pg_extern(volatile, parallel_unsafe)]
    fn import_model_file(
        name: &str,
        spec_path: &str,
        weights_path: &str,
        activate: default!(bool, true),
    ) -> i32 {
        let me = caller();
        let reader = pg_sys::Oid::from(pg_sys::ROLE_PG_READ_SERVER_FILES);
        if !catalog::has_privs(me, reader) {
            TtError::PermissionDenied {
                action: "import a model from server files".into(),
                hint: "Only superusers and members of pg_read_server_files may read server files; others use twotower.import_model(name, spec, weights).".into(),
            }
            .report();
        }
        let spec_bytes = read_server_file(spec_path, "spec").or_report();
        let weights = read_server_file(weights_path, "weights").or_report();
        let spec: serde_json::Value = serde_json::from_slice(&spec_bytes)
            .map_err(|e| {
                TtError::Tower(twotower_tower::TowerError::SpecJson {
                    reason: e.to_string(),
                })
            })
            .or_report();
        import(name, &spec, &weights, activate, None).or_report()
    }

    /// Makes `version` the serving version of model `name` (atomic: one row update; every
    /// backend switches at its next transaction after commit).
    #[pg_extern(volatile, parallel_unsafe)]
    fn activate_model(name: &str, version: i32) {
        catalog::check_manage_model(name).or_report();
        let found = as_catalog_owner(|| {
            Spi::get_one_with_args::<bool>(
                "UPDATE twotower.model SET active_version = $2 WHERE name = $1
                    AND EXISTS (SELECT 1 FROM twotower.model_version WHERE model = $1 AND version = $2)
                 RETURNING true",
                &[name.into(), version.into()],
            )
        })
        .or_report();
        if !matches!(found, Ok(Some(true))) {
            TtError::ModelNotFound {
                name: name.to_string(),
                version: Some(version),
            }
            .report();
        }
        catalog::invalidate();
    }

    /// Drops one version of model `name` (not the active one), or, without `version`, the whole
    /// model with all its versions.
    #[pg_extern(volatile, parallel_unsafe)]
    fn drop_model(name: Option<&str>, version: default!(Option<i32>, "NULL")) {
        let Some(name) = name else {
            TtError::NullArgument("name").report();
        };
        catalog::check_manage_model(name).or_report();
        match version {
            None => {
                crate::serve::pipelines::check_unused(crate::serve::pipelines::Uses::Model, name)
                    .or_report();
                let object = as_catalog_owner(|| {
                    Spi::get_one_with_args::<pg_sys::Oid>(
                        "DELETE FROM twotower.model WHERE name = $1 RETURNING owner_object",
                        &[name.into()],
                    )
                })
                .or_report()
                .map_err(|e| crate::infra::error::TtError::Catalog(format!("drop_model: {e}")))
                .or_report();
                if let Some(object) = object {
                    catalog::drop_owner_object(object);
                }
            }
            Some(v) => {
                let active = as_catalog_owner(|| {
                    Spi::get_one_with_args::<i32>(
                        "SELECT active_version FROM twotower.model WHERE name = $1",
                        &[name.into()],
                    )
                })
                .or_report()
                .ok()
                .flatten();
                if active == Some(v) {
                    TtError::ActiveVersion {
                        name: name.to_string(),
                        version: v,
                    }
                    .report();
                }
                let deleted = as_catalog_owner(|| {
                    Spi::get_one_with_args::<bool>(
                        "DELETE FROM twotower.model_version WHERE model = $1 AND version = $2 RETURNING true",
                        &[name.into(), v.into()],
                    )
                })
                .or_report();
                if !matches!(deleted, Ok(Some(true))) {
                    TtError::ModelNotFound {
                        name: name.to_string(),
                        version: Some(v),
                    }
                    .report();
                }
            }
        }
        catalog::invalidate();
    }

    /// Gives model `name` to role `new_owner` (as `ALTER … OWNER TO` does for built-in objects):
    /// allowed to members of twotower_admin, and to the current owner when they are also a
    /// member of `new_owner`. Also the way to give an owner back to a model whose owner was
    /// dropped with `DROP OWNED`.
    #[pg_extern(volatile, parallel_unsafe)]
    fn alter_model_owner(name: &str, new_owner: RegRole) {
        catalog::check_manage_model(name).or_report();
        let me = caller();
        if !is_admin(me) && !catalog::has_privs(me, new_owner.0) {
            TtError::PermissionDenied {
                action: format!("give model \"{name}\" to role {}", role_name(new_owner.0)),
                hint: format!(
                    "The owner must be a member of the new owning role, or a member of {ADMIN_ROLE}."
                ),
            }
            .report();
        }
        catalog::set_model_owner(name, new_owner.0).or_report();
        catalog::invalidate();
    }

    /// Lets role `grantee` (or `'PUBLIC'`) run model `name`: embed with it, recall and
    /// refresh with it, serve pipelines that name it. The right is the SELECT privilege on the
    /// model's owner object, so it is tracked, dumped and dropped with roles as PostgreSQL's own
    /// grants are. Allowed to whoever may manage the model.
    #[pg_extern(volatile, parallel_unsafe)]
    fn grant_model_usage(name: &str, grantee: &str) {
        super::model_usage(name, grantee, true);
    }

    /// Takes back what `grant_model_usage` gave.
    #[pg_extern(volatile, parallel_unsafe)]
    fn revoke_model_usage(name: &str, grantee: &str) {
        super::model_usage(name, grantee, false);
    }

    /// Changes a model's settings. `unknown_features`: `'error'` (the default: a key of the
    /// user features that is not a feature of the active version is an error, so typos are
    /// caught) or `'ignore'` (such keys are skipped, so an application that already sends a
    /// newer version's features keeps working after a rollback). NULL leaves a setting as it is.
    #[pg_extern(volatile, parallel_unsafe)]
    fn alter_model(name: Option<&str>, unknown_features: default!(Option<&str>, "NULL")) {
        let Some(name) = name else {
            TtError::NullArgument("name").report();
        };
        catalog::check_manage_model(name).or_report();
        if let Some(u) = unknown_features {
            if !matches!(u, "error" | "ignore") {
                TtError::BadArgument(format!(
                    "unknown_features must be 'error' or 'ignore', not '{u}'"
                ))
                .report();
            }
            as_catalog_owner(|| {
                Spi::run_with_args(
                    "UPDATE twotower.model SET unknown_features = $2 WHERE name = $1",
                    &[name.into(), u.into()],
                )
            })
            .or_report()
            .map_err(|e| crate::infra::error::TtError::Catalog(format!("alter_model: {e}")))
            .or_report();
        }
        catalog::invalidate();
    }

    /// One version of model `name` (the active one when `version` is NULL) as its spec and
    /// safetensors weights, exactly as imported: `import_model(name, spec, weights)` on another
    /// server recreates it, and the bytes can be written to files (`spec.json`,
    /// `weights.safetensors`) to keep a model outside the database. Allowed to the model's owner
    /// and members of twotower_admin.
    #[pg_extern(stable, parallel_safe)]
    fn export_model(
        name: Option<&str>,
        version: default!(Option<i32>, "NULL"),
    ) -> TableIterator<
        'static,
        (
            name!(version, i32),
            name!(spec, pgrx::JsonB),
            name!(weights, Vec<u8>),
        ),
    > {
        let Some(name) = name else {
            TtError::NullArgument("name").report();
        };
        let owner = catalog::model_owner_readonly(name).or_report();
        check_manage(name, owner).or_report();
        let row = as_catalog_owner(|| {
            catalog::read_row3::<i32, String, Vec<u8>>(
                "SELECT v.version, v.spec::text, v.weights FROM twotower.model m
                   JOIN twotower.model_version v ON v.model = m.name
                  WHERE m.name = $1 AND v.version = coalesce($2, m.active_version)",
                &[name.into(), version.into()],
            )
        })
        .or_report()
        .map_err(|e| crate::infra::error::TtError::Catalog(format!("export_model: {e}")))
        .or_report();
        let Some((Some(v), Some(spec), Some(weights))) = row else {
            TtError::ModelNotFound {
                name: name.to_string(),
                version,
            }
            .report();
        };
        let spec = serde_json::from_str(&spec)
            .map_err(|e| crate::infra::error::TtError::Catalog(format!("export_model: {e}")))
            .or_report();
        TableIterator::once((v, pgrx::JsonB(spec), weights))
    }

    /// This backend's cache of decoded models: how many versions, how many bytes.
    #[pg_extern(volatile, parallel_safe)]
    fn model_cache_info() -> TableIterator<'static, (name!(models, i64), name!(bytes, i64))> {
        TableIterator::once(catalog::cache_stats())
    }
}

/// GRANT or REVOKE the SELECT right on model `name`'s owner object for `grantee`.
fn model_usage(name: &str, grantee: &str, grant: bool) {
    catalog::check_manage_model(name).or_report();
    let who = if grantee.eq_ignore_ascii_case("public") {
        "PUBLIC".to_string()
    } else {
        if catalog::role_oid(grantee).is_none() {
            TtError::UndefinedRole(format!("role \"{grantee}\" does not exist")).report();
        }
        pgrx::spi::quote_identifier(grantee)
    };
    let lo = catalog::as_catalog_owner(|| {
        Spi::get_one_with_args::<pg_sys::Oid>(
            "SELECT m.owner_object FROM twotower.model m
               JOIN pg_catalog.pg_largeobject_metadata o ON o.oid OPERATOR(pg_catalog.=) m.owner_object
              WHERE m.name OPERATOR(pg_catalog.=) $1",
            &[name.into()],
        )
    })
    .or_report()
    .ok()
    .flatten();
    let Some(lo) = lo else {
        TtError::BadArgument(format!(
            "model \"{name}\" has no owner: give it one with twotower.alter_model_owner first"
        ))
        .report();
    };
    let sql = if grant {
        format!("GRANT SELECT ON LARGE OBJECT {} TO {who}", lo.to_u32())
    } else {
        format!("REVOKE SELECT ON LARGE OBJECT {} FROM {who}", lo.to_u32())
    };
    catalog::as_catalog_owner(|| Spi::run(&sql))
        .or_report()
        .unwrap_or_else(|e| {
            TtError::BadArgument(format!("changing the rights on model \"{name}\": {e}")).report()
        });
}
