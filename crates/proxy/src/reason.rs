//! Closed sets of label values on the data path: why a client was turned
//! away before reaching a backend, and which side of a session failed.
//! (Why pglb closed a session is `pglb_routing::CloseReason`.)

/// Why a client never reached a backend: `pglb_clients_rejected_total`'s
/// `reason` and the connection log's `end`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reject {
    /// No eligible backend within `hold_timeout`.
    NoBackend,
    /// The backend did not answer the client's first message in time.
    BackendSilent,
    /// `hold_max` clients already wait.
    HoldFull,
    /// No place under the connection limits within `queue_timeout`.
    QueueTimeout,
    /// No eligible backend accepted the connection.
    ConnectFailed,
    /// No first message within `startup_timeout`.
    StartupTimeout,
    /// A first message that is not PostgreSQL's.
    BadStartup,
    /// The client closed before sending its first message.
    ClientClosed,
    /// Reading the first message failed (reset, error).
    ClientError,
    /// The client hung up while it waited.
    ClientGaveUp,
    /// pglb is shutting down.
    Shutdown,
    /// The client's address is not in the listener's `allow` list.
    NotAllowed,
    /// On an address routed by TLS server name: no listener has the name
    /// and there is no default.
    UnknownServerName,
    /// A plaintext client on an address routed by TLS server name that has
    /// no default listener.
    TlsRequired,
    /// The backend answered `N` to pglb's SSLRequest (TLS off on it).
    BackendNoTls,
    /// `limits.max_pending` connections already wait (refused at accept).
    PendingFull,
    /// `limits.max_pending_per_source` connections from the client's
    /// address already wait (refused at accept).
    SourcePendingFull,
    /// The listening address holds its share of `limits.max_pending`
    /// (half, while pglb listens on more than one address): a flood on one
    /// address leaves the rest to the others (refused at accept).
    AddressPendingFull,
}

impl Reject {
    pub const ALL: [Reject; 18] = [
        Self::NoBackend,
        Self::BackendSilent,
        Self::HoldFull,
        Self::QueueTimeout,
        Self::ConnectFailed,
        Self::StartupTimeout,
        Self::BadStartup,
        Self::ClientClosed,
        Self::ClientError,
        Self::ClientGaveUp,
        Self::Shutdown,
        Self::NotAllowed,
        Self::UnknownServerName,
        Self::TlsRequired,
        Self::BackendNoTls,
        Self::PendingFull,
        Self::SourcePendingFull,
        Self::AddressPendingFull,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::NoBackend => "no_backend",
            Self::BackendSilent => "backend_silent",
            Self::HoldFull => "hold_full",
            Self::QueueTimeout => "queue_timeout",
            Self::ConnectFailed => "connect_failed",
            Self::StartupTimeout => "startup_timeout",
            Self::BadStartup => "bad_startup",
            Self::ClientClosed => "client_closed",
            Self::ClientError => "client_error",
            Self::ClientGaveUp => "client_gave_up",
            Self::Shutdown => "shutdown",
            Self::NotAllowed => "not_allowed",
            Self::UnknownServerName => "unknown_server_name",
            Self::TlsRequired => "tls_required",
            Self::BackendNoTls => "backend_no_tls",
            Self::PendingFull => "pending_full",
            Self::SourcePendingFull => "source_pending_full",
            Self::AddressPendingFull => "address_pending_full",
        }
    }

    /// Its position in [`Reject::ALL`] (for arrays of metric handles).
    pub fn index(self) -> usize {
        Self::ALL.iter().position(|r| *r == self).unwrap_or(0)
    }
}

/// One side of a forwarded session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Client,
    Backend,
}

impl Side {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Client => "client",
            Self::Backend => "backend",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Reject;

    #[test]
    fn every_reason_is_listed_once_with_its_own_label() {
        for (i, r) in Reject::ALL.iter().enumerate() {
            assert_eq!(r.index(), i);
        }
        let mut labels: Vec<&str> = Reject::ALL.iter().map(|r| r.as_str()).collect();
        labels.sort_unstable();
        labels.dedup();
        assert_eq!(labels.len(), Reject::ALL.len());
    }
}
