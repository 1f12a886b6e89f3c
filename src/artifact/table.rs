//! Typed rows ⇄ Parquet (polars).
//!
//! Rows are JSON cells (a `Vec<Value>` in schema order, or an object by name); a table's [`Schema`] names each column and its type, so a column
//! that happens to be all-null in one shard still gets the same Parquet type as in the others.

use std::fs::File;
use std::path::{Path, PathBuf};

use polars::prelude::*;
use serde_json::{Map, Value};

use super::atomic;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Bool,
    Int,
    Float,
    Text,
    TextList,
}

pub type Schema = Vec<(&'static str, Kind)>;

#[derive(Debug, thiserror::Error)]
pub enum TableError {
    #[error("{path}: could not write Parquet: {source}")]
    Write { path: PathBuf, source: PolarsError },
    #[error("{path}: could not read Parquet (a damaged or foreign file? move it away and re-run): {source}")]
    Read { path: PathBuf, source: PolarsError },
    #[error("{path}: column `{column}` should hold {expected:?} values: {source}")]
    Column {
        path: PathBuf,
        column: String,
        expected: Kind,
        source: PolarsError,
    },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// A row [`frame`] can read: a JSON object (cells by name) or cells in schema order.
pub trait Row {
    fn cell(&self, column: usize, name: &str) -> Option<&Value>;
}

impl Row for Map<String, Value> {
    fn cell(&self, _column: usize, name: &str) -> Option<&Value> {
        self.get(name)
    }
}

/// Cells in the order of the schema the row was built for (no lookups by name).
impl Row for Vec<Value> {
    fn cell(&self, column: usize, _name: &str) -> Option<&Value> {
        self.get(column)
    }
}

/// Builds a frame with one column per schema entry (missing cells are null).
pub fn frame<R: Row>(schema: &Schema, rows: &[R]) -> PolarsResult<DataFrame> {
    let columns = schema
        .iter()
        .enumerate()
        .map(|(column, &(name, kind))| {
            let cells = rows
                .iter()
                .map(|r| r.cell(column, name).filter(|v| !v.is_null()));
            let series = match kind {
                Kind::Bool => Series::new(
                    name.into(),
                    cells
                        .map(|v| v.and_then(Value::as_bool))
                        .collect::<Vec<_>>(),
                ),
                Kind::Int => Series::new(
                    name.into(),
                    cells.map(|v| v.and_then(Value::as_i64)).collect::<Vec<_>>(),
                ),
                Kind::Float => Series::new(
                    name.into(),
                    cells.map(|v| v.and_then(Value::as_f64)).collect::<Vec<_>>(),
                ),
                Kind::Text => Series::new(
                    name.into(),
                    cells.map(|v| v.and_then(Value::as_str)).collect::<Vec<_>>(),
                ),
                Kind::TextList => {
                    let mut b =
                        ListStringChunkedBuilder::new(name.into(), rows.len(), rows.len() * 4);
                    for cell in cells {
                        match cell.and_then(Value::as_array) {
                            Some(items) => {
                                b.append_values_iter(items.iter().filter_map(Value::as_str))
                            }
                            None => b.append_null(),
                        }
                    }
                    b.finish().into_series()
                }
            };
            series.into_column()
        })
        .collect();
    DataFrame::new(rows.len(), columns)
}

/// Writes `rows` to `path` atomically as zstd-compressed Parquet.
pub fn write_parquet<R: Row>(path: &Path, schema: &Schema, rows: &[R]) -> Result<(), TableError> {
    let write_err = |source| TableError::Write {
        path: path.to_path_buf(),
        source,
    };
    let mut df = frame(schema, rows).map_err(write_err)?;
    write_frame(path, &mut df)
}

/// Writes a frame to `path` atomically as zstd-compressed Parquet.
pub fn write_frame(path: &Path, df: &mut DataFrame) -> Result<(), TableError> {
    atomic::write_with(path, |file| {
        ParquetWriter::new(file)
            .with_compression(ParquetCompression::Zstd(None))
            .finish(df)
            .map_err(std::io::Error::other)
    })
    .map_err(|source| TableError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(())
}

/// Reads the named columns of a Parquet file.
pub fn read_columns(path: &Path, columns: &[&str]) -> Result<DataFrame, TableError> {
    read_frame(path, Some(columns))
}

/// Reads a Parquet file: the named columns, or all of them.
pub fn read_frame(path: &Path, columns: Option<&[&str]>) -> Result<DataFrame, TableError> {
    let file = File::open(path).map_err(|source| TableError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    ParquetReader::new(file)
        .with_columns(columns.map(|cs| cs.iter().map(|c| c.to_string()).collect()))
        .finish()
        .map_err(|source| TableError::Read {
            path: path.to_path_buf(),
            source,
        })
}

/// A text column as owned strings (nulls as `None`).
pub fn text_column(
    df: &DataFrame,
    path: &Path,
    name: &str,
) -> Result<Vec<Option<String>>, TableError> {
    let err = |source| TableError::Column {
        path: path.to_path_buf(),
        column: name.into(),
        expected: Kind::Text,
        source,
    };
    let ca = df
        .column(name)
        .and_then(|c| c.str().cloned())
        .map_err(err)?;
    Ok(ca.iter().map(|v| v.map(str::to_string)).collect())
}

/// An integer column (nulls as `None`).
pub fn int_column(df: &DataFrame, path: &Path, name: &str) -> Result<Vec<Option<i64>>, TableError> {
    let err = |source| TableError::Column {
        path: path.to_path_buf(),
        column: name.into(),
        expected: Kind::Int,
        source,
    };
    let ca = df
        .column(name)
        .and_then(|c| c.i64().cloned())
        .map_err(err)?;
    Ok(ca.iter().collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn all_null_columns_keep_their_declared_type() {
        let schema: Schema = vec![
            ("id", Kind::Text),
            ("n", Kind::Int),
            ("ok", Kind::Bool),
            ("tags", Kind::TextList),
            ("x", Kind::Float),
        ];
        let rows: Vec<Map<String, Value>> = vec![
            json!({"id": "a", "n": 1, "tags": ["p", "q"], "x": 0.5})
                .as_object()
                .unwrap()
                .clone(),
            json!({"id": "b", "n": null, "tags": []})
                .as_object()
                .unwrap()
                .clone(),
        ];
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.parquet");
        write_parquet(&p, &schema, &rows).unwrap();
        let df = read_columns(&p, &["id", "n", "ok", "tags", "x"]).unwrap();
        assert_eq!(df.column("ok").unwrap().dtype(), &DataType::Boolean);
        assert_eq!(
            df.column("tags").unwrap().dtype(),
            &DataType::List(Box::new(DataType::String))
        );
        assert_eq!(int_column(&df, &p, "n").unwrap(), vec![Some(1), None]);
        assert_eq!(
            text_column(&df, &p, "id").unwrap(),
            vec![Some("a".into()), Some("b".into())]
        );
        // The same rows with their cells in schema order make the same frame.
        let positional: Vec<Vec<Value>> = rows
            .iter()
            .map(|r| {
                schema
                    .iter()
                    .map(|(n, _)| r.get(*n).cloned().unwrap_or(Value::Null))
                    .collect()
            })
            .collect();
        let by_name = frame(&schema, &rows).unwrap();
        assert!(frame(&schema, &positional)
            .unwrap()
            .equals_missing(&by_name));
    }
}
