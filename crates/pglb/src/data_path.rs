//! Which data path sessions take: the kernel's sockmap, splice pipes or a
//! userspace copy (`forwarder:` in lb.yaml). The kernel program is loaded
//! at most once per process and kept across reloads.

use std::sync::Arc;

use anyhow::bail;
use pglb_config::{Config, Forwarder};
use pglb_proxy::PipePool;

/// Most empty splice pipes kept for reuse (each is two fds).
pub const PIPE_POOL: usize = 64;
/// Bytes per splice pipe (F_SETPIPE_SZ); within the unprivileged pipe-max-size.
const PIPE_SIZE: usize = 256 * 1024;

/// What sessions forward with.
pub struct DataPath {
    pub pipes: Option<Arc<PipePool>>,
    #[cfg(target_os = "linux")]
    pub sockmap: Option<Arc<pglb_sockmap::Kernel>>,
}

/// The kernel program, once loaded.
#[derive(Default)]
pub struct Loaded {
    #[cfg(target_os = "linux")]
    kernel: Option<Arc<pglb_sockmap::Kernel>>,
}

/// Why the kernel path is not chosen by `auto` and `sockmap` warns: what
/// the kernel does with an overlapping retransmission (README, "The kernel
/// path"; issue 21).
pub const KERNEL_PATH_FINDING: &str = "the kernel's sockmap redirect sends a retransmitted TCP segment whole, including the bytes of it the socket had already received (tcp_read_skb ignores the overlap; seen on Linux 6.18), so a lossy moment duplicates bytes inside the stream; pglb resets such a session when its counts disagree (pglb_forward_integrity_errors_total) but cannot undo what the peer already read";

/// The data path for `config`. `forwarder: sockmap` fails when the kernel
/// path cannot be had (the error says why and what to do) and warns when
/// it can; `auto` uses splice and says why, once per call (start and
/// reloads that change the forwarder). Must run on the data-path runtime.
pub fn choose(config: &Config, loaded: &mut Loaded) -> anyhow::Result<DataPath> {
    let pipes = || cfg!(target_os = "linux").then(|| Arc::new(PipePool::new(PIPE_POOL, PIPE_SIZE)));
    match config.forwarder {
        Forwarder::Copy => Ok(DataPath::userspace(None)),
        Forwarder::Splice => Ok(DataPath::userspace(pipes())),
        Forwarder::Auto => {
            tracing::info!(finding = KERNEL_PATH_FINDING, "forwarder: auto uses splice: the kernel path is not trusted");
            Ok(DataPath::userspace(pipes()))
        }
        Forwarder::Sockmap => match kernel(loaded) {
            Ok(kernel) => {
                tracing::warn!(
                    finding = KERNEL_PATH_FINDING,
                    "forwarder: sockmap (the kernel moves session bytes; splice for sessions it cannot take): not recommended; use splice"
                );
                Ok(DataPath {
                    pipes: pipes(),
                    #[cfg(target_os = "linux")]
                    sockmap: Some(kernel),
                })
            }
            Err(reason) => bail!(
                "forwarder: sockmap is not available: {reason}. Grant the privileges (deploy/systemd/sockmap.conf) or use forwarder: splice"
            ),
        },
    }
}

impl DataPath {
    fn userspace(pipes: Option<Arc<PipePool>>) -> Self {
        Self {
            pipes,
            #[cfg(target_os = "linux")]
            sockmap: None,
        }
    }
}

#[cfg(target_os = "linux")]
fn kernel(loaded: &mut Loaded) -> Result<Arc<pglb_sockmap::Kernel>, String> {
    if let Some(kernel) = &loaded.kernel {
        return Ok(kernel.clone());
    }
    let kernel = Arc::new(pglb_sockmap::Kernel::load().map_err(|e| e.to_string())?);
    loaded.kernel = Some(kernel.clone());
    Ok(kernel)
}

#[cfg(not(target_os = "linux"))]
fn kernel(_: &mut Loaded) -> Result<std::convert::Infallible, String> {
    Err("sockmap needs Linux".into())
}
