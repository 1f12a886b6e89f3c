//! Python code in teacher answers: fenced code blocks, and whether each parses as Python 3
//! (with RustPython's parser, a full Python 3 grammar, not a regex).

use rustpython_parser::ast::{self, Stmt};
use rustpython_parser::Parse;
use serde::Serialize;

/// One fenced block of an answer.
#[derive(Debug, Clone, PartialEq)]
pub struct CodeBlock {
    /// The info string after the opening fence (`python`, `py`, empty…).
    pub lang: String,
    pub code: String,
    /// 1-based line of the answer where the code starts.
    pub line: usize,
}

/// The fenced code blocks of a Markdown answer that hold Python (tagged `python`/`py`/`python3`, or
/// untagged). Blocks tagged with another language (`text`, `bash`, output) are not Python.
pub fn python_blocks(text: &str) -> Vec<CodeBlock> {
    let mut blocks = Vec::new();
    let mut open: Option<(String, usize, Vec<&str>)> = None;
    for (i, line) in text.lines().enumerate() {
        let trimmed = line.trim_start();
        match open.take() {
            None => {
                if let Some(info) = trimmed.strip_prefix("```") {
                    open = Some((info.trim().to_lowercase(), i + 2, Vec::new()));
                }
            }
            Some((lang, start, mut lines)) => {
                if trimmed.starts_with("```") {
                    if matches!(lang.as_str(), "" | "python" | "py" | "python3") {
                        blocks.push(CodeBlock {
                            lang,
                            code: dedent(&lines),
                            line: start,
                        });
                    }
                } else {
                    lines.push(line);
                    open = Some((lang, start, lines));
                }
            }
        }
    }
    blocks
}

/// Removes the indentation common to all non-blank lines (blocks inside lists are indented).
fn dedent(lines: &[&str]) -> String {
    let indent = lines
        .iter()
        .filter(|l| !l.trim().is_empty())
        .map(|l| l.len() - l.trim_start().len())
        .min()
        .unwrap_or(0);
    let mut out: String = lines
        .iter()
        .map(|l| l.get(indent..).unwrap_or("").trim_end())
        .collect::<Vec<_>>()
        .join("\n");
    out.push('\n');
    out
}

/// Why a block does not parse, with the line (1-based, within the block).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SyntaxIssue {
    pub line: usize,
    pub message: String,
}

/// Parses `code` as a Python 3 module.
pub fn parse(code: &str) -> Result<Vec<Stmt>, SyntaxIssue> {
    ast::Suite::parse(code, "<block>").map_err(|e| {
        let offset = (u32::from(e.offset) as usize).min(code.len());
        let line = code.get(..offset).unwrap_or(code).matches('\n').count() + 1;
        SyntaxIssue {
            line,
            message: e.error.to_string(),
        }
    })
}

/// Names of the functions a module defines at top level.
pub fn function_names(module: &[Stmt]) -> Vec<String> {
    module
        .iter()
        .filter_map(|s| match s {
            Stmt::FunctionDef(f) => Some(f.name.to_string()),
            Stmt::AsyncFunctionDef(f) => Some(f.name.to_string()),
            _ => None,
        })
        .collect()
}

/// The body of the top-level function `name`, split into its docstring (if its first statement
/// is a string) and the statements after it that do something: `pass`, `...` and a bare `return`
/// are left out, so a stub has no code.
pub fn function_body<'a>(module: &'a [Stmt], name: &str) -> Option<(bool, Vec<&'a Stmt>)> {
    let body = module.iter().find_map(|s| match s {
        Stmt::FunctionDef(f) if f.name.as_str() == name => Some(&f.body),
        Stmt::AsyncFunctionDef(f) if f.name.as_str() == name => Some(&f.body),
        _ => None,
    })?;
    let is_constant = |s: &Stmt, string: bool| {
        matches!(s, Stmt::Expr(e) if matches!(
            e.value.as_ref(),
            ast::Expr::Constant(c) if matches!(c.value, ast::Constant::Str(_)) == string
        ))
    };
    let docstring = body.first().is_some_and(|s| is_constant(s, true));
    let code = body
        .iter()
        .skip(usize::from(docstring))
        .filter(|s| match s {
            Stmt::Pass(_) => false,
            Stmt::Return(r) => r.value.is_some(),
            s => !is_constant(s, false),
        })
        .collect();
    Some((docstring, code))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_python_blocks_and_skips_other_languages() {
        let text = "Intro\n```python\nx = 1\nprint(x)\n```\nOutput:\n```text\n1\n```\n  ```\n  def f():\n      return 2\n  ```\n";
        let blocks = python_blocks(text);
        assert_eq!(blocks.len(), 2);
        assert_eq!(blocks[0].code, "x = 1\nprint(x)\n");
        assert_eq!(blocks[0].line, 3);
        assert_eq!(blocks[1].code, "def f():\n    return 2\n");
    }

    #[test]
    fn python_3_syntax_is_checked_by_a_real_parser() {
        // Valid Python 3 that a regex would struggle with; the oracle is CPython's grammar.
        assert!(parse(
            "def f(*, a=1, **kw):\n    return [x async for x in a] if False else {**kw}\n"
        )
        .is_ok());
        let e = parse("x = 1\nprint 'hello'\n").unwrap_err();
        assert_eq!(e.line, 2, "{e:?}");
        let e = parse("def f(:\n    pass\n").unwrap_err();
        assert_eq!(e.line, 1, "{e:?}");
    }

    #[test]
    fn lists_top_level_function_names() {
        let m = parse("import os\ndef add(a, b):\n    def inner(): pass\n    return a + b\nasync def fetch(): pass\nclass C:\n    def m(self): pass\n").unwrap();
        assert_eq!(function_names(&m), ["add", "fetch"]);
    }
}
