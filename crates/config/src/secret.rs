//! A secret that never prints.

use std::fmt;

/// A password or token. `Debug` and `Display` print `***`, so a secret
/// cannot leak through a log line or a status page by accident.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret itself: call only where it is handed to an authenticator.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// Where a secret comes from. Sources that name an environment variable or
/// a file are read again each time the secret is used, so a rotated
/// password takes effect without a reload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretSource {
    Inline(Secret),
    /// An environment variable, by name.
    Env(String),
    /// A file; one trailing newline is not part of the secret.
    File(std::path::PathBuf),
}

/// Why a secret could not be read.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("environment variable `{0}` is not set: export it before starting pglb")]
    EnvUnset(String),
    #[error("cannot read {}: {source} (make it readable by the user pglb runs as)", path.display())]
    File { path: std::path::PathBuf, source: std::io::Error },
}

impl SecretSource {
    /// Reads the secret now.
    pub fn read(&self) -> Result<Secret, SecretError> {
        match self {
            Self::Inline(secret) => Ok(secret.clone()),
            Self::Env(var) => std::env::var(var).map(Secret::new).map_err(|_| SecretError::EnvUnset(var.clone())),
            Self::File(path) => std::fs::read_to_string(path)
                .map(|text| Secret::new(text.trim_end_matches(['\r', '\n'])))
                .map_err(|source| SecretError::File { path: path.clone(), source }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{Secret, SecretSource};

    #[test]
    fn file_source_is_read_each_time() {
        let path = std::env::temp_dir().join(format!("pglb-secret-{}", std::process::id()));
        std::fs::write(&path, "first\n").expect("write");
        let source = SecretSource::File(path.clone());
        assert_eq!(source.read().expect("read").expose(), "first");
        std::fs::write(&path, "second").expect("write");
        assert_eq!(source.read().expect("read").expose(), "second");
        std::fs::remove_file(&path).expect("remove");
        assert!(source.read().expect_err("gone").to_string().contains(&path.display().to_string()));
    }

    #[test]
    fn never_prints() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s} {s:?}"), "*** Secret(***)");
        assert_eq!(s.expose(), "hunter2");
    }
}
