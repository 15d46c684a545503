//! Reading a config: strict parse, then validation of every item at once.

use std::path::Path;

use crate::error::{ConfigError, Problem};
use crate::positions::Positions;
use crate::raw::{RawAdminOnly, RawConfig};
use crate::validate::Validator;
use crate::{AdminAccess, Config};

/// Reads and validates the config at `path`.
pub fn load_file(path: &Path) -> Result<Config, ConfigError> {
    load_str(path, &read(path)?)
}

/// Reads only the `admin` section of the config at `path` (the control
/// commands need nothing else, and must work while the rest is being edited).
pub fn load_admin(path: &Path) -> Result<AdminAccess, ConfigError> {
    let text = read(path)?;
    let fail = |problems| ConfigError { file: path.to_owned(), problems };
    let raw: RawAdminOnly = serde_yaml::from_str(&text).map_err(|e| fail(vec![syntax_problem(&e)]))?;
    let positions = Positions::index(&text);
    let base = path.parent().unwrap_or_else(|| Path::new("."));
    Validator::new(&positions, base).admin_access(raw.admin).map_err(fail)
}

fn read(path: &Path) -> Result<String, ConfigError> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(text),
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
    // serde_yaml puts the item's path first: `health: invalid type: ...`.
    let (item, rest) = match message.split_once(": invalid type: ") {
        Some((path, rest)) => (path.to_owned(), format!("invalid type: {rest}")),
        None => (String::new(), message.clone()),
    };
    let (item, message, help) = match in_user_terms(&rest) {
        Some(plain) => (item, plain, "give this item the shape lb.yaml in the repository shows"),
        None if message.contains("EOF while parsing") || message.is_empty() => (
            String::new(),
            message,
            "the file is empty or truncated: see lb.yaml in the repository for a complete example",
        ),
        None => (String::new(), message, "fix the YAML at this position"),
    };
    Problem {
        item,
        line: location.as_ref().map(|l| l.line()),
        column: location.as_ref().map(|l| l.column()),
        message,
        help: Some(help.into()),
    }
}

/// serde's "invalid type: integer `5`, expected struct RawHealth" in the
/// user's words: "expected a mapping (key: value lines), found the number 5".
fn in_user_terms(message: &str) -> Option<String> {
    let rest = message.strip_prefix("invalid type: ")?;
    let (found, expected) = rest.split_once(", expected ")?;
    let found = match found.split_once(' ') {
        Some(("integer" | "floating", value)) => format!("the number {}", value.trim_matches('`')),
        Some(("string", value)) => format!("the text {value}"),
        Some(("boolean", value)) => value.trim_matches('`').to_owned(),
        _ => match found {
            "map" => "a mapping".to_owned(),
            "sequence" => "a list".to_owned(),
            "unit value" => "nothing".to_owned(),
            other => other.to_owned(),
        },
    };
    let expected = if expected.starts_with("struct") || expected == "a map" {
        "a mapping (key: value lines)"
    } else if expected.starts_with("a sequence") {
        "a list (`- item` lines)"
    } else {
        "a single value"
    };
    Some(format!("expected {expected}, found {found}"))
}

#[cfg(test)]
mod tests {
    use super::in_user_terms;

    #[test]
    fn type_errors_in_user_terms() {
        let plain = |m: &str| in_user_terms(m).unwrap_or_default();
        assert_eq!(
            plain("invalid type: integer `5`, expected struct RawHealth"),
            "expected a mapping (key: value lines), found the number 5"
        );
        assert_eq!(
            plain("invalid type: string \"rw\", expected a sequence"),
            "expected a list (`- item` lines), found the text \"rw\""
        );
        assert_eq!(in_user_terms("did not find expected key"), None);
    }
}
