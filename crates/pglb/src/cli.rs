//! Command-line parsing (three commands and one option: no parser crate needed).

use std::ffi::OsString;
use std::path::PathBuf;

pub const USAGE: &str = "\
usage:
  pglb [--config FILE]          run the balancer in the foreground (default ./lb.yaml)
  pglb check [--config FILE]    validate a config: exit 0, or print every problem and exit 1
  pglb demo                     start a local primary + 2 replicas and pglb in front of them
  pglb --help | --version

signals: SIGHUP reloads the config (a bad one is rejected whole, the old one keeps serving);
         SIGTERM/SIGINT drain (new clients refused, sessions finish for shutdown_timeout)
         and stop; a second SIGTERM/SIGINT stops at once.";

#[derive(Debug, PartialEq, Eq)]
pub enum Command {
    Run { config: PathBuf },
    Check { config: PathBuf },
    Demo,
    Help,
    Version,
}

pub fn parse(args: impl Iterator<Item = OsString>) -> Result<Command, String> {
    let mut args = args.peekable();
    let sub = match args.peek().and_then(|a| a.to_str()) {
        Some("check") | Some("demo") | Some("run") => args.next().and_then(|a| a.into_string().ok()),
        _ => None,
    };
    let mut config = PathBuf::from("lb.yaml");
    while let Some(arg) = args.next() {
        match arg.to_str() {
            Some("-h" | "--help") => return Ok(Command::Help),
            Some("-V" | "--version") => return Ok(Command::Version),
            Some("-c" | "--config") => {
                config = args.next().map(PathBuf::from).ok_or("--config needs a FILE")?;
            }
            Some(s) if s.starts_with("--config=") => config = PathBuf::from(&s["--config=".len()..]),
            _ => return Err(format!("unexpected argument `{}`", arg.to_string_lossy())),
        }
    }
    Ok(match sub.as_deref() {
        Some("check") => Command::Check { config },
        Some("demo") => Command::Demo,
        _ => Command::Run { config },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(args: &[&str]) -> Result<Command, String> {
        parse(args.iter().map(OsString::from))
    }

    #[test]
    fn parses_commands() {
        assert_eq!(p(&[]), Ok(Command::Run { config: "lb.yaml".into() }));
        assert_eq!(p(&["--config", "x.yaml"]), Ok(Command::Run { config: "x.yaml".into() }));
        assert_eq!(p(&["check", "--config=y.yaml"]), Ok(Command::Check { config: "y.yaml".into() }));
        assert_eq!(p(&["demo"]), Ok(Command::Demo));
        assert_eq!(p(&["--help"]), Ok(Command::Help));
        assert!(p(&["--config"]).is_err());
        assert!(p(&["bogus"]).is_err());
    }

    #[test]
    fn help_names_the_signals() {
        for signal in ["SIGHUP", "SIGTERM", "SIGINT"] {
            assert!(USAGE.contains(signal), "--help does not mention {signal}");
        }
    }
}
