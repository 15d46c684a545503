//! Reading a config: strict parse, then validation of every item at once.

use std::path::Path;

use crate::error::{ConfigError, Problem};
use crate::positions::Positions;
use crate::raw::RawConfig;
use crate::validate::Validator;
use crate::Config;

/// Reads and validates the config at `path`.
pub fn load_file(path: &Path) -> Result<Config, ConfigError> {
    match std::fs::read_to_string(path) {
        Ok(text) => load_str(path, &text),
        Err(err) => Err(ConfigError {
            file: path.to_owned(),
            problems: vec![Problem {
                item: String::new(),
                line: None,
                column: None,
                message: format!("cannot read config file: {err}"),
                help: Some("pass an existing, readable file with --config FILE".into()),
            }],
        }),
    }
}

/// Validates config `text`; `path` names it in errors and anchors relative paths.
pub fn load_str(path: &Path, text: &str) -> Result<Config, ConfigError> {
    let fail = |problems| ConfigError { file: path.to_owned(), problems };
    let raw: RawConfig = serde_yaml::from_str(text).map_err(|e| fail(vec![syntax_problem(&e)]))?;
    let positions = Positions::index(text);
    let base = path.parent().unwrap_or_else(|| Path::new("."));
    Validator::new(&positions, base).run(raw).map_err(fail)
}

fn syntax_problem(err: &serde_yaml::Error) -> Problem {
    let location = err.location();
    let mut message = err.to_string();
    // serde_yaml appends " at line L column C": the location is printed in front.
    if let Some(cut) = message.find(" at line ") {
        message.truncate(cut);
    }
    let help = if message.contains("unknown field") {
        "remove the key or fix its spelling (the expected keys are listed above)"
    } else if message.contains("EOF while parsing") || message.is_empty() {
        "the file is empty or truncated: see lb.yaml in the repository for a complete example"
    } else {
        "fix the YAML at this position"
    };
    Problem {
        item: String::new(),
        line: location.as_ref().map(|l| l.line()),
        column: location.as_ref().map(|l| l.column()),
        message,
        help: Some(help.into()),
    }
}
