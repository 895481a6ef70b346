//! The model catalogue underneath the SQL surfaces: privileges, catalogue access as the
//! extension owner, and the per-backend cache of decoded models.
//!
//! The tables `twotower.model` and `twotower.model_version` are readable and writable by their
//! owner (the role that created the extension) only. Functions run as their caller
//! (no SECURITY DEFINER): they check the caller's rights themselves, then read or write the
//! catalogue as the table owner, with `search_path` pinned to `pg_catalog, pg_temp` for the
//! duration, as PostgreSQL's own maintenance commands do.

mod access;
mod datums;
mod models;
mod owners;
mod privileges;
pub use access::*;
pub use datums::*;
pub use models::*;
pub use owners::*;
pub use privileges::*;
