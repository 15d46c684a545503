//! Config errors: every problem with its file, item, position and fix.

use std::fmt;
use std::path::PathBuf;

/// One thing wrong with a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The item, as `listeners[1].role`; empty for the whole file.
    pub item: String,
    /// 1-based line and column, where they can be known.
    pub line: Option<usize>,
    pub column: Option<usize>,
    /// What is wrong, a lowercase phrase.
    pub message: String,
    /// What to write instead.
    pub help: Option<String>,
}

/// A config that cannot be used: it lists every problem found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: PathBuf,
    pub problems: Vec<Problem>,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if !self.item.is_empty() {
            write!(f, "{}: ", self.item)?;
        }
        f.write_str(&self.message)?;
        if let Some(help) = &self.help {
            write!(f, "\n  help: {help}")?;
        }
        Ok(())
    }
}

impl ConfigError {
    /// The `file:line:column` prefix of one problem.
    pub fn location(&self, problem: &Problem) -> String {
        let file = self.file.display();
        match (problem.line, problem.column) {
            (Some(l), Some(c)) => format!("{file}:{l}:{c}"),
            (Some(l), None) => format!("{file}:{l}"),
            _ => format!("{file}"),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.problems.len();
        write!(f, "invalid config {}: {n} problem{}", self.file.display(), if n == 1 { "" } else { "s" })?;
        for problem in &self.problems {
            write!(f, "\n{}: error: {problem}", self.location(problem))?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}
