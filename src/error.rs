//! The one error type: each variant is a decision the caller must make, and maps to an exit code.

use std::fmt;

/// Everything that stops the mirror, grouped by what an operator has to do about it.
#[derive(Debug)]
pub enum Error {
    /// Bad command line or configuration, or a refused `--reload`: fix the invocation.
    Usage(String),
    /// The network or a server failed for longer than the retry budget: safe to restart.
    Transient(String),
    /// The destination does not hold the state the source event started from.
    Inconsistency {
        key: String,
        source: String,
        destination: String,
    },
    /// The stored replication index is ahead of the source's current index: the source
    /// was rebuilt or restored, or is another cluster.
    IndexAhead {
        source: String,
        head: u64,
        index: u64,
    },
    /// The source no longer has the events after our index: only `--reload` recovers.
    IndexCleared(String),
    /// Somebody else moved the replication index under us.
    OtherWriter(String),
    /// etcd refused a request for a reason that says nothing about the key's state (a value
    /// too large, a malformed request): the destination is unchanged, a human must look.
    Refused(String),
}

impl Error {
    /// The process exit code for this error; the README and `--help` list the same table.
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::Transient(_) => 1,
            Error::Usage(_) => 2,
            Error::Inconsistency { .. } | Error::IndexAhead { .. } => 3,
            Error::IndexCleared(_) => 4,
            Error::OtherWriter(_) => 5,
            Error::Refused(_) => 6,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Usage(m) => write!(f, "{m}"),
            Error::Transient(m) => write!(f, "giving up after transient failures: {m}"),
            Error::Inconsistency {
                key,
                source,
                destination,
            } => write!(
                f,
                "inconsistency at {key}: the source had {source} before this event, \
                 the destination has {destination}; nothing more was written \
                 (fix the key by hand, or run with --reload --dry-run, then --reload)"
            ),
            Error::IndexAhead {
                source,
                head,
                index,
            } => write!(
                f,
                "inconsistency: the replication index {index} on the destination is ahead of the \
                 source {source}, whose current index is {head} (the source was rebuilt or \
                 restored, or is another cluster); nothing was written. Compare the trees with \
                 --reload --dry-run, then run --reload"
            ),
            Error::IndexCleared(m) => write!(
                f,
                "{m}: the source no longer holds the events after the replication index; \
                 restart with --reload (try --reload --dry-run first)"
            ),
            Error::Refused(m) => write!(
                f,
                "{m}; this refusal says nothing about the key's state and the destination is \
                 unchanged: fix its cause (see the etcd error), then restart"
            ),
            Error::OtherWriter(m) => write!(
                f,
                "another writer is active on the destination: {m}; \
                 stop the other etcdmirror before restarting this one"
            ),
        }
    }
}

impl std::error::Error for Error {}

/// Shorthand used across the crate.
pub type Result<T> = std::result::Result<T, Error>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_match_the_readme_table() {
        assert_eq!(Error::Transient(String::new()).exit_code(), 1);
        assert_eq!(Error::Usage(String::new()).exit_code(), 2);
        let inc = Error::Inconsistency {
            key: "/k".into(),
            source: "value \"a\"".into(),
            destination: "no key".into(),
        };
        assert_eq!(inc.exit_code(), 3);
        assert!(inc.to_string().contains("/k"));
        let ahead = Error::IndexAhead {
            source: "http://s".into(),
            head: 10,
            index: 20,
        };
        assert_eq!(ahead.exit_code(), 3);
        let text = ahead.to_string();
        assert!(text.contains("ahead of the source") && text.contains("--reload --dry-run"));
        assert!(text.contains("20") && text.contains("10"));
        assert_eq!(Error::IndexCleared(String::new()).exit_code(), 4);
        assert_eq!(Error::OtherWriter(String::new()).exit_code(), 5);
        assert_eq!(Error::Refused(String::new()).exit_code(), 6);
    }
}
