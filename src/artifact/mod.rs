//! The record/artifact layer shared by every stage: atomic writes, typed Parquet tables, and the
//! crash-safe shard writer that gives generation its exactly-once output.

pub mod atomic;
pub mod docs;
pub mod shards;
pub mod table;
