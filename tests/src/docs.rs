//! The fenced blocks of the project's Markdown files, and what each shell
//! block says about being run. Every shell block (`sh`, `bash`, `shell`,
//! `console`) is preceded by one of:
//!
//! - `<!-- runnable -->`: `tests/tests/docs.rs` runs it as written (`sh -e`,
//!   from the repository's root);
//! - `<!-- runnable: until TEXT -->`: a command that serves until stopped:
//!   run until its output shows TEXT, then interrupted (Ctrl-C);
//! - `<!-- runnable by FILE: ID -->`: the test in FILE runs it as written
//!   (it calls [`block`] with ID), because it needs more than `sh -e`;
//! - `<!-- not runnable: REASON -->`: why no test runs it here.
//!
//! Every other block names its language (`text`, `yaml`, `sql`...), so that
//! a shell block cannot go unmarked by having none.

use std::path::{Path, PathBuf};

/// The Markdown files whose blocks are checked.
pub const FILES: [&str; 5] =
    ["README.md", "deploy/README.md", "deploy/keepalived/README.md", "deploy/patroni/README.md", "benches/README.md"];

/// The languages that mark a shell block.
pub const SHELL: [&str; 4] = ["sh", "bash", "shell", "console"];

/// One fenced block.
#[derive(Debug, Clone)]
pub struct Block {
    pub file: String,
    /// The line of its opening fence (1-based).
    pub line: usize,
    /// The fence's info string (`sh`, `yaml`, or empty).
    pub info: String,
    /// The HTML comment on the line before the fence, without `<!--`/`-->`.
    pub marker: Option<String>,
    pub body: String,
}

impl Block {
    pub fn is_shell(&self) -> bool {
        SHELL.contains(&self.info.split_whitespace().next().unwrap_or(""))
    }

    /// `file:line`, for messages.
    pub fn place(&self) -> String {
        format!("{}:{}", self.file, self.line)
    }
}

/// The repository's root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().map_or_else(|| PathBuf::from(".."), Path::to_owned)
}

/// The fenced blocks of `file` (relative to the root), in order.
pub fn blocks(file: &str) -> Vec<Block> {
    let text = std::fs::read_to_string(root().join(file)).unwrap_or_else(|e| panic!("read {file}: {e}"));
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let Some((indent, info)) = fence(lines[i]) else {
            i += 1;
            continue;
        };
        let marker = lines[..i]
            .iter()
            .rev()
            .find(|l| !l.trim().is_empty())
            .and_then(|l| l.trim().strip_prefix("<!--"))
            .and_then(|l| l.strip_suffix("-->"))
            .map(|m| m.trim().to_owned());
        let start = i;
        i += 1;
        let mut body = String::new();
        while i < lines.len() && fence(lines[i]).is_none_or(|(_, info)| !info.is_empty()) {
            body.push_str(lines[i].get(indent..).unwrap_or(lines[i].trim_start()));
            body.push('\n');
            i += 1;
        }
        out.push(Block { file: file.to_owned(), line: start + 1, info: info.to_owned(), marker, body });
        i += 1;
    }
    out
}

/// A fence line: its indent and info string.
fn fence(line: &str) -> Option<(usize, &str)> {
    let trimmed = line.trim_start();
    let rest = trimmed.strip_prefix("```")?;
    Some((line.len() - trimmed.len(), rest.trim()))
}

/// The shell block that `<!-- runnable by FILE: id -->` marks, in any of
/// [`FILES`]; panics when there is not exactly one.
pub fn block(id: &str) -> Block {
    let found: Vec<Block> = FILES
        .iter()
        .flat_map(|f| blocks(f))
        .filter(|b| b.marker.as_deref().and_then(runnable_by).is_some_and(|(_, i)| i == id))
        .collect();
    assert_eq!(found.len(), 1, "want one block marked `runnable by ...: {id}`, found {found:?}");
    found.into_iter().next().unwrap_or_else(|| unreachable!())
}

/// `runnable by FILE: ID` as (FILE, ID).
pub fn runnable_by(marker: &str) -> Option<(&str, &str)> {
    let rest = marker.strip_prefix("runnable by ")?;
    let (file, id) = rest.split_once(':')?;
    Some((file.trim(), id.trim()))
}
