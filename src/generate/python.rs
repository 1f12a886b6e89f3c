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

/// The fenced code blocks of a Markdown answer that hold Python: those tagged `python`/`py`/
/// `python3`, and the untagged ones of an answer that tags none. Blocks tagged with another
/// language (`text`, `bash`) are not Python. Beside tagged Python, an untagged block is the
/// program's output (Qwen2.5-Coder writes ```` ```python ```` for the program and a bare
/// ```` ``` ```` for `Hello, World!`) unless it parses as Python with a statement that output
/// never is: a `def`, a `class`, an `import`, a loop, an `if`, `with` or `try`. Output lines
/// often parse (`42`, `Point(x=1)`, `Sum: 10` (an annotation), `name = Alice`), but as
/// expressions or assignments, which a bare block of code beside tagged Python rarely is alone.
pub fn python_blocks(text: &str) -> Vec<CodeBlock> {
    let mut blocks = fenced_blocks(text);
    if blocks.iter().any(|b| !b.lang.is_empty()) {
        blocks.retain(|b| !b.lang.is_empty() || parse(&b.code).is_ok_and(|m| structured(&m)));
    }
    blocks
}

/// Whether a module has a statement that program output never is (see [`python_blocks`]).
fn structured(module: &[Stmt]) -> bool {
    module.iter().any(|s| {
        matches!(
            s,
            Stmt::FunctionDef(_)
                | Stmt::AsyncFunctionDef(_)
                | Stmt::ClassDef(_)
                | Stmt::Import(_)
                | Stmt::ImportFrom(_)
                | Stmt::For(_)
                | Stmt::AsyncFor(_)
                | Stmt::While(_)
                | Stmt::If(_)
                | Stmt::With(_)
                | Stmt::AsyncWith(_)
                | Stmt::Try(_)
                | Stmt::TryStar(_)
                | Stmt::Match(_)
        )
    })
}

/// The fenced blocks tagged as Python or untagged, in order.
fn fenced_blocks(text: &str) -> Vec<CodeBlock> {
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
    let body = function_def(module, name)?;
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

/// The body of the top-level function `name`.
fn function_def<'a>(module: &'a [Stmt], name: &str) -> Option<&'a [Stmt]> {
    module.iter().find_map(|s| match s {
        Stmt::FunctionDef(f) if f.name.as_str() == name => Some(f.body.as_slice()),
        Stmt::AsyncFunctionDef(f) if f.name.as_str() == name => Some(f.body.as_slice()),
        _ => None,
    })
}

/// The tests that running the module executes, as far as its text shows: the asserts at top
/// level (also inside a top-level `if`, `for`, `while`, `with` or `try`, so under
/// `if __name__ == "__main__":`), and those in the body of a top-level function that such a
/// statement calls by name (`def test_f(): assert …` then `test_f()`, how Qwen2.5-Coder writes
/// its tests), and so on through the functions those call. A test function that is defined and
/// never called adds none: its asserts never run. The asserts of `solution` (the function under
/// test) are not tests but checks of its input, and count for nothing.
pub fn asserts_that_run(module: &[Stmt], solution: &str) -> u64 {
    let mut called = Vec::new();
    let mut n = asserts_in(module, &mut called);
    let mut seen = std::collections::HashSet::from([solution]);
    while let Some(name) = called.pop() {
        if seen.insert(name) {
            if let Some(body) = function_def(module, name) {
                n += asserts_in(body, &mut called);
            }
        }
    }
    n
}

/// The asserts among `stmts` and the compound statements nested in them (not in the functions
/// or classes they define); the names of the functions they call as statements go to `called`.
fn asserts_in<'a>(stmts: &'a [Stmt], called: &mut Vec<&'a str>) -> u64 {
    let mut n = 0;
    for s in stmts {
        let nested: Vec<&[Stmt]> = match s {
            Stmt::Assert(_) => {
                n += 1;
                continue;
            }
            Stmt::Expr(e) => {
                if let ast::Expr::Call(c) = e.value.as_ref() {
                    if let ast::Expr::Name(f) = c.func.as_ref() {
                        called.push(f.id.as_str());
                    }
                }
                continue;
            }
            Stmt::If(s) => vec![&s.body, &s.orelse],
            Stmt::For(s) => vec![&s.body, &s.orelse],
            Stmt::While(s) => vec![&s.body, &s.orelse],
            Stmt::With(s) => vec![&s.body],
            Stmt::Try(s) => vec![&s.body, &s.orelse, &s.finalbody],
            _ => continue,
        };
        n += nested
            .into_iter()
            .map(|b| asserts_in(b, called))
            .sum::<u64>();
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_python_blocks_and_skips_other_languages() {
        let text = "Intro\n```python\nx = 1\nprint(x)\n```\nOutput:\n```text\n1\n```\n  ```py\n  def f():\n      return 2\n  ```\n";
        let blocks = python_blocks(text);
        assert_eq!(blocks.len(), 2);
        assert_eq!(blocks[0].code, "x = 1\nprint(x)\n");
        assert_eq!(blocks[0].line, 3);
        assert_eq!(blocks[1].code, "def f():\n    return 2\n");
    }

    #[test]
    fn asserts_count_at_top_level_and_in_test_functions_called_there() {
        // Hand-counted: which asserts a run of each program executes.
        let n = |code: &str| asserts_that_run(&parse(code).unwrap(), "f");
        assert_eq!(
            n("def f(x):\n    assert x\n    return x\nassert f(1) == 1\nassert f(2)\n"),
            2
        );
        // Qwen2.5-Coder's shape: asserts in a test function, called once at the end (twice
        // counts once: the count is of asserts in the text, not of executions).
        let called = "def f(x):\n    return x\ndef test_f():\n    assert f(1) == 1\n    for i in range(3):\n        assert f(i) == i\ntest_f()\ntest_f()\n";
        assert_eq!(n(called), 2);
        assert_eq!(
            n(&called.replace(
                "test_f()\ntest_f()\n",
                "if __name__ == '__main__':\n    test_f()\n"
            )),
            2
        );
        // Defined and never called: nothing runs. Asserts of a nested def don't run with its parent.
        assert_eq!(
            n("def f(x):\n    return x\ndef test_f():\n    assert f(1) == 1\n"),
            0
        );
        assert_eq!(
            n("def t():\n    def inner():\n        assert False\nt()\n"),
            0
        );
        // The solution's own assert checks its input: a call of it is no test. A test function
        // that calls others runs theirs too (each counted once, recursion included).
        assert_eq!(n("def f(x):\n    assert x > 0\n    return x\nf(3)\n"), 0);
        let nested = "def f(x):\n    return x\ndef test_a():\n    assert f(1) == 1\n    test_a()\ndef test_b():\n    assert f(2) == 2\n    assert f(3) == 3\ndef run_all():\n    test_a()\n    test_b()\nrun_all()\n";
        assert_eq!(n(nested), 3);
    }

    #[test]
    fn untagged_blocks_beside_tagged_python_are_output() {
        // The shape of Qwen2.5-Coder's sections (15 of the 17 `syntax_error` drops in a run of 113
        // answers): the program tagged, its output in a bare fence.
        let text = "```python\nprint('Hello, World!')\n```\nOutput:\n```\nHello, World!\n```\n";
        let blocks = python_blocks(text);
        assert_eq!(blocks.len(), 1);
        assert_eq!(blocks[0].code, "print('Hello, World!')\n");
        // `py` and `python3` tag Python too; another language's tag leaves bare blocks as code.
        assert_eq!(python_blocks("```py\nx = 1\n```\n```\n1\n```\n").len(), 1);
        let bash = "```bash\nls\n```\n```\nx = 1\n```\n";
        assert_eq!(python_blocks(bash).len(), 1);
        assert_eq!(python_blocks(bash)[0].code, "x = 1\n");
        // Beside tagged Python, a bare block with an import, a def or a loop is code; values,
        // reprs, `label: value` lines (annotations to the parser) and `name = value` lines are
        // output.
        let code = "```python\ndef f():\n    return 1\n```\n```\nimport math\nx = f()\n```\n";
        let blocks = python_blocks(code);
        assert_eq!(blocks.len(), 2);
        assert_eq!(blocks[1].code, "import math\nx = f()\n");
        let looped = "```python\nx = 1\n```\n```\nfor i in range(2):\n    print(i)\n```\n";
        assert_eq!(python_blocks(looped).len(), 2);
        for output in [
            "42\n[1, 2]",
            "Point(x=1, y=2)",
            "True",
            "Sum: 10",
            "name = Alice",
        ] {
            let text = format!("```python\nprint(1)\n```\n```\n{output}\n```\n");
            assert_eq!(python_blocks(&text).len(), 1, "{output}");
        }
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
