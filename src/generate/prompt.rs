//! Prompt templates: files under `prompts/` with a header that declares their variables.
//!
//! ```text
//! id: tinystories
//! version: 1
//! vars: verb noun adjective features
//! ---
//! … the verb "{verb}", the noun "{noun}" … {features}
//! ```
//! `{{` and `}}` are literal braces. A `{var}` that is not declared, or a declared variable the
//! body never uses, is an error at load time, not a silently broken prompt at request time.

use std::collections::BTreeSet;
use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    #[error("{source_name}: {message} — expected a header of `id:`, `version:` and `vars:` lines, then `---`, then the prompt body")]
    Header {
        source_name: String,
        message: String,
    },
    #[error("{source_name}: the body uses `{{{var}}}` but the header's `vars:` line does not declare it — add it to `vars:` or fix the name")]
    Undeclared { source_name: String, var: String },
    #[error("{source_name}: `vars:` declares `{var}` but the body never uses it — remove it or use `{{{var}}}` in the body")]
    Unused { source_name: String, var: String },
    #[error("{source_name}: unbalanced `{{` or `}}` at byte {at} — write `{{{{` or `}}}}` for a literal brace")]
    Brace { source_name: String, at: usize },
    #[error("{path}: could not read the prompt template: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("template `{id}` was rendered without a value for `{var}` (a bug in the corpus code)")]
    MissingValue { id: String, var: String },
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece {
    Text(String),
    Var(String),
}

#[derive(Debug, Clone)]
pub struct Template {
    pub id: String,
    pub version: u32,
    /// blake3 of the whole file, recorded with every record so prompt edits are traceable.
    pub hash: String,
    pieces: Vec<Piece>,
}

impl Template {
    pub fn load(path: &Path) -> Result<Template, TemplateError> {
        let text = std::fs::read_to_string(path).map_err(|source| TemplateError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Template::parse(&path.display().to_string(), &text)
    }

    /// Loads `path`, or parses the built-in copy of `prompts/{name}` when `path` is `None`.
    pub fn load_or_builtin(
        path: Option<&Path>,
        name: &str,
        builtin: &str,
    ) -> Result<Template, TemplateError> {
        match path {
            Some(p) => Template::load(p),
            None => Template::parse(&format!("<built-in prompts/{name}>"), builtin),
        }
    }

    pub fn parse(source_name: &str, text: &str) -> Result<Template, TemplateError> {
        let header_err = |message: String| TemplateError::Header {
            source_name: source_name.to_string(),
            message,
        };
        let (header, body) = text
            .split_once("\n---\n")
            .ok_or_else(|| header_err("no `---` line after the header".into()))?;
        let (mut id, mut version, mut vars) = (None, None, None);
        for line in header
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
        {
            let (key, value) = line
                .split_once(':')
                .ok_or_else(|| header_err(format!("header line `{line}` is not `key: value`")))?;
            let value = value.trim();
            match key.trim() {
                "id" => id = Some(value.to_string()),
                "version" => {
                    version = Some(value.parse::<u32>().map_err(|_| {
                        header_err(format!("version `{value}` is not a whole number"))
                    })?)
                }
                "vars" => {
                    vars = Some(
                        value
                            .split_whitespace()
                            .map(str::to_string)
                            .collect::<Vec<_>>(),
                    )
                }
                other => return Err(header_err(format!("unknown header key `{other}`"))),
            }
        }
        let id = id.ok_or_else(|| header_err("missing `id:`".into()))?;
        let version = version.ok_or_else(|| header_err("missing `version:`".into()))?;
        let vars = vars.unwrap_or_default();
        let body = body.strip_suffix('\n').unwrap_or(body);
        let pieces = parse_body(source_name, body)?;
        let used: BTreeSet<&str> = pieces
            .iter()
            .filter_map(|p| match p {
                Piece::Var(v) => Some(v.as_str()),
                Piece::Text(_) => None,
            })
            .collect();
        if let Some(var) = used.iter().find(|v| !vars.iter().any(|d| d == *v)) {
            return Err(TemplateError::Undeclared {
                source_name: source_name.into(),
                var: var.to_string(),
            });
        }
        if let Some(var) = vars.iter().find(|d| !used.contains(d.as_str())) {
            return Err(TemplateError::Unused {
                source_name: source_name.into(),
                var: var.clone(),
            });
        }
        Ok(Template {
            id,
            version,
            hash: blake3::hash(text.as_bytes()).to_hex()[..16].to_string(),
            pieces,
        })
    }

    /// Fills the template; `values` must cover every declared variable.
    pub fn render(&self, values: &[(&str, &str)]) -> Result<String, TemplateError> {
        let mut out = String::new();
        for piece in &self.pieces {
            match piece {
                Piece::Text(t) => out.push_str(t),
                Piece::Var(v) => {
                    let value = values.iter().find(|(k, _)| k == v).ok_or_else(|| {
                        TemplateError::MissingValue {
                            id: self.id.clone(),
                            var: v.clone(),
                        }
                    })?;
                    out.push_str(value.1);
                }
            }
        }
        Ok(out)
    }
}

fn parse_body(source_name: &str, body: &str) -> Result<Vec<Piece>, TemplateError> {
    let brace = |at| TemplateError::Brace {
        source_name: source_name.into(),
        at,
    };
    let mut pieces = Vec::new();
    let mut text = String::new();
    let mut chars = body.char_indices().peekable();
    while let Some((at, c)) = chars.next() {
        match c {
            '{' if chars.peek().map(|&(_, n)| n) == Some('{') => {
                chars.next();
                text.push('{');
            }
            '}' if chars.peek().map(|&(_, n)| n) == Some('}') => {
                chars.next();
                text.push('}');
            }
            '{' => {
                let mut name = String::new();
                loop {
                    match chars.next() {
                        Some((_, '}')) => break,
                        Some((_, ch)) if ch.is_ascii_alphanumeric() || ch == '_' => name.push(ch),
                        _ => return Err(brace(at)),
                    }
                }
                if name.is_empty() {
                    return Err(brace(at));
                }
                if !text.is_empty() {
                    pieces.push(Piece::Text(std::mem::take(&mut text)));
                }
                pieces.push(Piece::Var(name));
            }
            '}' => return Err(brace(at)),
            c => text.push(c),
        }
    }
    if !text.is_empty() {
        pieces.push(Piece::Text(text));
    }
    Ok(pieces)
}

#[cfg(test)]
mod tests {
    use super::*;

    const OK: &str = "id: t\nversion: 2\nvars: a b\n---\nUse {a} and {b}, literally {{a}}.\n";

    #[test]
    fn renders_declared_variables_and_literal_braces() {
        let t = Template::parse("t.txt", OK).unwrap();
        assert_eq!((t.id.as_str(), t.version), ("t", 2));
        assert_eq!(
            t.render(&[("a", "x"), ("b", "y")]).unwrap(),
            "Use x and y, literally {a}."
        );
    }

    #[test]
    fn undeclared_and_unused_variables_are_load_errors() {
        let undeclared = "id: t\nversion: 1\nvars: a\n---\n{a} {c}\n";
        let err = Template::parse("p.txt", undeclared)
            .unwrap_err()
            .to_string();
        assert!(err.contains("p.txt") && err.contains("{c}"), "{err}");
        let unused = "id: t\nversion: 1\nvars: a b\n---\n{a}\n";
        let err = Template::parse("p.txt", unused).unwrap_err().to_string();
        assert!(err.contains("`b`") && err.contains("never uses"), "{err}");
        assert!(Template::parse("p.txt", "id: t\nversion: 1\n---\n{ oops\n").is_err());
        assert!(Template::parse("p.txt", "no header at all").is_err());
    }
}
