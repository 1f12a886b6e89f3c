//! Typed rows ⇄ Parquet (polars).
//!
//! A table's [`Schema`] names each column and its type, so a column that happens to be all-null in
//! one shard still gets the same Parquet type as in the others. Record structs declare their
//! columns with [`row!`]: every field is a column, named after the field, typed by its Rust type
//! ([`Cell`]), in field order — so a struct's schema ([`Row::COLUMNS`]) and its cells
//! ([`Row::push_cells`]) come from the one definition and cannot disagree. The frame builder
//! itself takes cells in schema order or by name ([`Cells`]).

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
    /// A conversation, OpenAI style: a list of `{role, content}` structs (cells are JSON arrays of
    /// such objects), as Hugging Face chat datasets store `messages`.
    Messages,
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

/// A Rust type that is one column: its Parquet [`Kind`] and its cell.
pub trait Cell {
    const KIND: Kind;
    fn into_cell(self) -> Value;
}

impl Cell for bool {
    const KIND: Kind = Kind::Bool;
    fn into_cell(self) -> Value {
        Value::Bool(self)
    }
}

macro_rules! int_cells {
    ($($t:ty),*) => {$(
        impl Cell for $t {
            const KIND: Kind = Kind::Int;
            fn into_cell(self) -> Value {
                Value::from(self)
            }
        }
    )*};
}
int_cells!(i64, u64, u32, usize);

impl Cell for f64 {
    const KIND: Kind = Kind::Float;
    fn into_cell(self) -> Value {
        Value::from(self)
    }
}

/// Stored as the f32 widened to f64 (0.7f32 is 0.699999988…), as `serde_json` writes an f32.
impl Cell for f32 {
    const KIND: Kind = Kind::Float;
    fn into_cell(self) -> Value {
        Value::from(self)
    }
}

impl Cell for String {
    const KIND: Kind = Kind::Text;
    fn into_cell(self) -> Value {
        Value::String(self)
    }
}

impl Cell for &str {
    const KIND: Kind = Kind::Text;
    fn into_cell(self) -> Value {
        Value::String(self.to_string())
    }
}

impl Cell for Vec<String> {
    const KIND: Kind = Kind::TextList;
    fn into_cell(self) -> Value {
        Value::Array(self.into_iter().map(Value::String).collect())
    }
}

/// `None` is a null cell of the inner type's column.
impl<T: Cell> Cell for Option<T> {
    const KIND: Kind = T::KIND;
    fn into_cell(self) -> Value {
        self.map_or(Value::Null, Cell::into_cell)
    }
}

/// A struct that is (part of) a table row: its columns and its cells, from one definition
/// (write it with [`row!`]).
pub trait Row {
    /// Name and type of each column, in order.
    const COLUMNS: &'static [(&'static str, Kind)];
    /// Appends one cell per entry of [`Row::COLUMNS`], in its order.
    fn push_cells(self, cells: &mut Vec<Value>);
}

/// Declares a struct and implements [`Row`] for it: each field is a column named after it, of
/// the [`Kind`] its type's [`Cell`] gives, in the order of the fields. Fields that are not
/// columns (e.g. the text a prompt needs but the record does not keep) go in a second block,
/// `not columns { … }`, after the struct's; they are part of the struct as usual.
///
/// ```ignore
/// row! {
///     #[derive(Debug, Clone, Serialize)]
///     pub struct Checks {
///         pub words: u64,      // column `words`, Int
///         pub note: Option<String>, // column `note`, Text, null for None
///     } not columns {
///         #[serde(skip)]
///         pub scratch: String,
///     }
/// }
/// ```
macro_rules! row {
    (
        $(#[$attr:meta])*
        $vis:vis struct $name:ident {
            $($(#[$fattr:meta])* $fvis:vis $field:ident : $fty:ty),* $(,)?
        }
        $(not columns {
            $($(#[$sattr:meta])* $svis:vis $sfield:ident : $sty:ty),* $(,)?
        })?
    ) => {
        $(#[$attr])*
        $vis struct $name {
            $($(#[$fattr])* $fvis $field: $fty,)*
            $($($(#[$sattr])* $svis $sfield: $sty,)*)?
        }

        impl $crate::artifact::table::Row for $name {
            const COLUMNS: &'static [(&'static str, $crate::artifact::table::Kind)] = &[
                $((stringify!($field), <$fty as $crate::artifact::table::Cell>::KIND),)*
            ];
            fn push_cells(self, cells: &mut Vec<::serde_json::Value>) {
                $(cells.push($crate::artifact::table::Cell::into_cell(self.$field));)*
            }
        }
    };
}
pub(crate) use row;

/// Rows [`frame`] can read: a JSON object (cells by name) or cells in schema order.
pub trait Cells {
    fn cell(&self, column: usize, name: &str) -> Option<&Value>;
}

impl Cells for Map<String, Value> {
    fn cell(&self, _column: usize, name: &str) -> Option<&Value> {
        self.get(name)
    }
}

/// Cells in the order of the schema the row was built for (no lookups by name).
impl Cells for Vec<Value> {
    fn cell(&self, column: usize, _name: &str) -> Option<&Value> {
        self.get(column)
    }
}

/// Builds a frame with one column per schema entry (missing cells are null).
pub fn frame<R: Cells>(schema: &Schema, rows: &[R]) -> PolarsResult<DataFrame> {
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
                Kind::Messages => {
                    let lists: Vec<Option<Series>> = cells
                        .map(|v| v.and_then(Value::as_array).map(|m| message_structs(m)))
                        .collect();
                    let mut ca = if lists.iter().all(Option::is_none) {
                        ListChunked::full_null_with_dtype(name.into(), rows.len(), &message_dtype())
                    } else {
                        lists.into_iter().collect::<ListChunked>()
                    };
                    ca.rename(name.into());
                    ca.into_series()
                }
            };
            series.into_column()
        })
        .collect();
    DataFrame::new(rows.len(), columns)
}

/// The struct of one message of a [`Kind::Messages`] column.
fn message_dtype() -> DataType {
    DataType::Struct(vec![
        Field::new("role".into(), DataType::String),
        Field::new("content".into(), DataType::String),
    ])
}

/// The messages of one conversation cell as a struct series (a missing field is null).
fn message_structs(messages: &[Value]) -> Series {
    let field = |k: &str| -> Vec<Option<&str>> {
        messages
            .iter()
            .map(|m| m.get(k).and_then(Value::as_str))
            .collect()
    };
    let role = Series::new("role".into(), field("role"));
    let content = Series::new("content".into(), field("content"));
    StructChunked::from_series("".into(), messages.len(), [role, content].iter())
        .expect("role and content hold one value per message")
        .into_series()
}

/// Writes `rows` to `path` atomically as zstd-compressed Parquet.
pub fn write_parquet<R: Cells>(path: &Path, schema: &Schema, rows: &[R]) -> Result<(), TableError> {
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

/// Whether `cell` is a value of a `kind` column (null fits every kind): what [`frame`] stores
/// as it is rather than as null.
#[cfg(test)]
pub(crate) fn cell_fits(kind: Kind, cell: &Value) -> bool {
    cell.is_null()
        || match kind {
            Kind::Bool => cell.is_boolean(),
            Kind::Int => cell.is_i64(),
            Kind::Float => cell.is_f64(),
            Kind::Text => cell.is_string(),
            Kind::TextList => cell
                .as_array()
                .is_some_and(|items| items.iter().all(Value::is_string)),
            Kind::Messages => cell.as_array().is_some_and(|items| {
                items.iter().all(|m| {
                    m.get("role").is_some_and(Value::is_string)
                        && m.get("content").is_some_and(Value::is_string)
                })
            }),
        }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    row! {
        /// One field of every cell type, and one that is not a column.
        struct Every {
            flag: bool,
            count: u64,
            share: f64,
            temperature: f32,
            name: String,
            tags: Vec<String>,
            note: Option<String>,
        } not columns {
            scratch: String,
        }
    }

    /// The columns are the fields in order, typed by their Rust types; the cells line up with
    /// them one to one, and a field outside the columns yields no cell.
    #[test]
    fn a_row_struct_declares_its_columns_and_fills_them() {
        assert_eq!(
            Every::COLUMNS,
            [
                ("flag", Kind::Bool),
                ("count", Kind::Int),
                ("share", Kind::Float),
                ("temperature", Kind::Float),
                ("name", Kind::Text),
                ("tags", Kind::TextList),
                ("note", Kind::Text),
            ]
        );
        let row = Every {
            flag: true,
            count: 3,
            share: 0.25,
            temperature: 0.7,
            name: "n".into(),
            tags: vec!["a".into()],
            note: None,
            scratch: "not stored".into(),
        };
        assert_eq!(row.scratch, "not stored");
        let mut cells = Vec::new();
        row.push_cells(&mut cells);
        // An f32 is stored as `serde_json` has always written it (0.699999988…, not 0.7).
        assert_eq!(
            cells,
            [
                json!(true),
                json!(3),
                json!(0.25),
                json!(0.7f32),
                json!("n"),
                json!(["a"]),
                Value::Null
            ]
        );
        for ((name, kind), cell) in Every::COLUMNS.iter().zip(&cells) {
            assert!(cell_fits(*kind, cell), "{name}: {cell}");
        }
        let df = frame(&Every::COLUMNS.to_vec(), &[cells]).unwrap();
        assert_eq!(
            df.column("temperature").unwrap().dtype(),
            &DataType::Float64
        );
        assert_eq!(df.column("note").unwrap().null_count(), 1);
        assert_eq!(df.column("count").unwrap().null_count(), 0);
    }

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
