//! Process limits: raise the soft fd limit to the hard one.

/// Raises RLIMIT_NOFILE's soft limit to its hard limit and logs the result.
pub fn raise_fd_limit() {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => tracing::info!(limit, "file descriptor limit"),
        Err(err) => {
            let current = rlimit::getrlimit(rlimit::Resource::NOFILE).map(|(soft, _)| soft).unwrap_or(0);
            tracing::warn!(error = %err, limit = current, "cannot raise the file descriptor limit; keeping it");
        }
    }
}
