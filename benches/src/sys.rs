//! Process limits, without `unsafe`.

use std::io;

/// Raises the soft open-files limit to the hard one (the memory test holds
/// thousands of sockets, and pglb inherits the limit). Returns (soft, hard).
pub fn raise_nofile() -> io::Result<(u64, u64)> {
    let (_, hard) = rlimit::getrlimit(rlimit::Resource::NOFILE)?;
    let soft = rlimit::increase_nofile_limit(hard)?;
    Ok((soft, hard))
}
