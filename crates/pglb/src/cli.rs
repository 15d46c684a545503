//! Command-line parsing (a few commands and options: no parser crate needed),
//! and the one rule for which config file a command uses.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

pub const USAGE: &str = "\
usage:
  pglb [run] [--config FILE]          run the balancer in the foreground
  pglb check [--config FILE]          validate a config: exit 0, or print every problem and exit 1
  pglb status [--json]                listeners and backends of the running pglb, as a table
  pglb connections [--json]           its open client sessions
  pglb drain BACKEND                  no new sessions on BACKEND; open ones finish
  pglb disable BACKEND                no new sessions on BACKEND; open ones are closed
  pglb enable BACKEND                 undo drain/disable
  pglb unfence BACKEND                clear BACKEND's fence
                                      (BACKEND: `cluster/name`, or `name` where one cluster has it)
  pglb upgrade                        start the (replaced) binary anew; it takes over the sockets
                                      and state with no connection refused; the old process
                                      finishes its sessions and exits
  pglb demo                           start a local primary + 2 replicas and pglb in front of them
  pglb --help | --version

config file (every command): --config FILE, else $PGLB_CONFIG, else ./lb.yaml if it
exists, else /etc/pglb/lb.yaml. The control commands (status ... unfence) read only its
`admin` section: the address (a wildcard address is reached on loopback) and the token
source; --token-file FILE or $PGLB_ADMIN_TOKEN override the token.

exit codes of the control commands: 0 done; 1 pglb refused the action or answered
unexpectedly (message says why); 2 usage or config problem; 3 pglb is not running
(admin endpoint unreachable); 4 token missing or wrong; 5 no such backend; 6 no such cluster.

signals: SIGHUP reloads the config (a bad one is rejected whole, the old one keeps serving);
         SIGUSR2 upgrades, like `pglb upgrade` (the outcome is in the log);
         SIGTERM/SIGINT drain (new clients refused, sessions finish for shutdown_timeout)
         and stop; a second SIGTERM/SIGINT stops at once.";

/// An operator action on one backend (POST /backends/{name}/{action}).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Drain,
    Disable,
    Enable,
    Unfence,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Drain => "drain",
            Self::Disable => "disable",
            Self::Enable => "enable",
            Self::Unfence => "unfence",
        }
    }
}

/// What a control command asks the running pglb.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Control {
    Status,
    Connections,
    Act { action: Action, backend: String },
    Upgrade,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Command {
    Run { config: Option<PathBuf> },
    Check { config: Option<PathBuf> },
    Control { control: Control, config: Option<PathBuf>, token_file: Option<PathBuf>, json: bool },
    Demo,
    Help,
    Version,
}

pub fn parse(args: impl Iterator<Item = OsString>) -> Result<Command, String> {
    let mut args = args.peekable();
    let sub = match args.peek().and_then(|a| a.to_str()) {
        Some(
            s @ ("check" | "demo" | "run" | "status" | "connections" | "drain" | "disable" | "enable" | "unfence"
            | "upgrade"),
        ) => {
            let s = s.to_owned();
            args.next();
            Some(s)
        }
        _ => None,
    };
    let (mut config, mut token_file, mut json, mut positional) = (None, None, false, Vec::new());
    while let Some(arg) = args.next() {
        match arg.to_str() {
            Some("-h" | "--help") => return Ok(Command::Help),
            Some("-V" | "--version") => return Ok(Command::Version),
            Some("-c" | "--config") => {
                config = Some(args.next().map(PathBuf::from).ok_or("--config needs a FILE")?);
            }
            Some(s) if s.starts_with("--config=") => config = Some(PathBuf::from(&s["--config=".len()..])),
            Some("--token-file") => {
                token_file = Some(args.next().map(PathBuf::from).ok_or("--token-file needs a FILE")?);
            }
            Some(s) if s.starts_with("--token-file=") => {
                token_file = Some(PathBuf::from(&s["--token-file=".len()..]));
            }
            Some("--json") => json = true,
            Some(s) if !s.starts_with('-') => positional.push(s.to_owned()),
            _ => return Err(format!("unexpected argument `{}`", arg.to_string_lossy())),
        }
    }
    let control = |control| Command::Control { control, config: config.clone(), token_file: token_file.clone(), json };
    let command = match sub.as_deref() {
        Some("check") => Command::Check { config: config.clone() },
        Some("demo") => Command::Demo,
        Some("status") => control(Control::Status),
        Some("connections") => control(Control::Connections),
        Some("upgrade") => control(Control::Upgrade),
        Some(name @ ("drain" | "disable" | "enable" | "unfence")) => {
            let action = match name {
                "drain" => Action::Drain,
                "disable" => Action::Disable,
                "enable" => Action::Enable,
                _ => Action::Unfence,
            };
            let backend = match positional.as_slice() {
                [one] => one.clone(),
                [] => return Err(format!("`pglb {name}` needs a BACKEND name (see `pglb status`)")),
                _ => return Err(format!("`pglb {name}` takes one BACKEND")),
            };
            positional.clear();
            control(Control::Act { action, backend })
        }
        _ => Command::Run { config: config.clone() },
    };
    if let Some(extra) = positional.first() {
        return Err(format!("unexpected argument `{extra}`"));
    }
    let control_only = token_file.is_some() || json;
    if control_only && !matches!(command, Command::Control { .. }) {
        return Err("--json and --token-file go with the control commands (status, connections, drain...)".into());
    }
    Ok(command)
}

/// The system-wide config, where the Debian package and the systemd unit put it.
pub const SYSTEM_CONFIG: &str = "/etc/pglb/lb.yaml";

/// The config file a command uses: `--config`, else `$PGLB_CONFIG`, else
/// `./lb.yaml` if it exists, else `/etc/pglb/lb.yaml`.
pub fn config_path(explicit: Option<PathBuf>) -> Result<PathBuf, String> {
    config_path_in(explicit, std::env::var_os("PGLB_CONFIG"), Path::new("lb.yaml"), Path::new(SYSTEM_CONFIG))
}

fn config_path_in(
    explicit: Option<PathBuf>,
    env: Option<OsString>,
    local: &Path,
    system: &Path,
) -> Result<PathBuf, String> {
    if let Some(path) = explicit {
        return Ok(path);
    }
    if let Some(path) = env.filter(|p| !p.is_empty()) {
        return Ok(PathBuf::from(path));
    }
    for candidate in [local, system] {
        if candidate.exists() {
            return Ok(candidate.to_owned());
        }
    }
    Err(format!(
        "no config file: --config is not given, PGLB_CONFIG is not set, and neither {} nor {} exists",
        local.display(),
        system.display()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(args: &[&str]) -> Result<Command, String> {
        parse(args.iter().map(OsString::from))
    }

    #[test]
    fn parses_commands() {
        assert_eq!(p(&[]), Ok(Command::Run { config: None }));
        assert_eq!(p(&["--config", "x.yaml"]), Ok(Command::Run { config: Some("x.yaml".into()) }));
        assert_eq!(p(&["check", "--config=y.yaml"]), Ok(Command::Check { config: Some("y.yaml".into()) }));
        assert_eq!(p(&["demo"]), Ok(Command::Demo));
        assert_eq!(p(&["--help"]), Ok(Command::Help));
        assert!(p(&["--config"]).is_err());
        assert!(p(&["bogus"]).is_err());
    }

    #[test]
    fn parses_control_commands() {
        assert_eq!(
            p(&["status", "--json"]),
            Ok(Command::Control { control: Control::Status, config: None, token_file: None, json: true })
        );
        assert_eq!(
            p(&["drain", "pg1", "--token-file", "t"]),
            Ok(Command::Control {
                control: Control::Act { action: Action::Drain, backend: "pg1".into() },
                config: None,
                token_file: Some("t".into()),
                json: false,
            })
        );
        assert!(p(&["drain"]).expect_err("no backend").contains("needs a BACKEND"));
        assert!(p(&["enable", "a", "b"]).is_err());
        assert!(p(&["status", "pg1"]).is_err());
        assert!(p(&["check", "--json"]).is_err());
    }

    #[test]
    fn one_rule_for_the_config_file() {
        let dir = std::env::temp_dir().join(format!("pglb-cli-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let (local, system) = (dir.join("lb.yaml"), dir.join("etc-lb.yaml"));
        let pick = |explicit: Option<&str>, env: Option<&str>| {
            config_path_in(explicit.map(PathBuf::from), env.map(OsString::from), &local, &system)
        };
        assert!(pick(None, None).expect_err("nothing exists").contains("neither"));
        std::fs::write(&system, "").expect("write");
        assert_eq!(pick(None, None), Ok(system.clone()));
        std::fs::write(&local, "").expect("write");
        assert_eq!(pick(None, None), Ok(local.clone()), "./lb.yaml before /etc/pglb/lb.yaml");
        assert_eq!(pick(None, Some("env.yaml")), Ok(PathBuf::from("env.yaml")));
        assert_eq!(pick(Some("flag.yaml"), Some("env.yaml")), Ok(PathBuf::from("flag.yaml")));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn help_names_the_signals() {
        for signal in ["SIGHUP", "SIGTERM", "SIGINT"] {
            assert!(USAGE.contains(signal), "--help does not mention {signal}");
        }
    }
}
