//! The Redis sink: pipelined `UNLINK`s and `SCAN`-based pattern deletes through redis-rs.

use super::Sink;
use crate::action::Action;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use std::time::Duration;

/// Keys per `UNLINK` command; large enough to amortise round trips, small enough not to
/// stall Redis on one command.
const UNLINK_CHUNK: usize = 256;

/// Keys asked for per `SCAN` step of a pattern delete.
const SCAN_COUNT: usize = 1000;

/// A Redis connection that applies invalidation batches.
#[derive(Clone)]
pub struct RedisSink {
    conn: ConnectionManager,
    description: String,
}

/// Why a batch could not be applied to Redis.
#[derive(Debug, thiserror::Error)]
pub enum RedisSinkError {
    /// The URL in `[redis] url` could not be used.
    #[error("invalid redis url `{url}`; expected redis://host:port/db or rediss://host:port/db")]
    Url {
        /// The URL with any password removed.
        url: String,
        /// What redis-rs said about it.
        #[source]
        source: redis::RedisError,
    },
    /// A command failed or the connection was lost; the batch will be retried.
    #[error("redis at {target} failed while {doing}")]
    Command {
        /// Where the sink points, without credentials.
        target: String,
        /// Which step of the batch failed.
        doing: &'static str,
        /// The redis-rs error.
        #[source]
        source: redis::RedisError,
    },
}

impl RedisSink {
    /// A sink for `url`; it connects on first use and reconnects by itself after failures.
    /// `root_cert` is a PEM CA bundle to trust for `rediss://` instead of the public roots.
    pub fn new(url: &str, root_cert: Option<&[u8]>) -> Result<Self, RedisSinkError> {
        let description = redact_url(url);
        let client = match root_cert {
            None => redis::Client::open(url),
            Some(pem) => redis::Client::build_with_tls(
                url,
                redis::TlsCertificates { client_tls: None, root_cert: Some(pem.to_vec()) },
            ),
        }
        .map_err(|source| RedisSinkError::Url { url: description.clone(), source })?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(5)))
            .set_response_timeout(Some(Duration::from_secs(10)))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(500));
        let conn = ConnectionManager::new_lazy_with_config(client, config)
            .map_err(|source| RedisSinkError::Url { url: description.clone(), source })?;
        Ok(RedisSink { conn, description })
    }

    /// The target, safe to log: `redis://host:port/db` without a password.
    pub fn description(&self) -> &str {
        &self.description
    }

    fn failed(&self, doing: &'static str) -> impl FnOnce(redis::RedisError) -> RedisSinkError + '_ {
        move |source| RedisSinkError::Command { target: self.description.clone(), doing, source }
    }

    async fn unlink_all(&mut self, keys: &[&str]) -> Result<(), RedisSinkError> {
        if keys.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        for chunk in keys.chunks(UNLINK_CHUNK) {
            pipe.cmd("UNLINK").arg(chunk).ignore();
        }
        pipe.exec_async(&mut self.conn).await.map_err(self.failed("unlinking keys"))
    }

    async fn scan_unlink(&mut self, pattern: &str) -> Result<(), RedisSinkError> {
        let mut cursor: u64 = 0;
        loop {
            let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(pattern)
                .arg("COUNT")
                .arg(SCAN_COUNT)
                .query_async(&mut self.conn)
                .await
                .map_err(self.failed("scanning for a pattern"))?;
            let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
            self.unlink_all(&keys).await?;
            if next == 0 {
                return Ok(());
            }
            cursor = next;
        }
    }
}

impl Sink for RedisSink {
    type Error = RedisSinkError;

    async fn apply(&mut self, actions: &[Action]) -> Result<(), RedisSinkError> {
        let keys: Vec<&str> = actions
            .iter()
            .filter_map(|a| match a {
                Action::Unlink(k) => Some(k.as_str()),
                _ => None,
            })
            .collect();
        self.unlink_all(&keys).await?;
        for action in actions {
            if let Action::ScanUnlink(pattern) = action {
                self.scan_unlink(pattern).await?;
            }
        }
        Ok(())
    }
}

/// Removes the password from a `redis://user:password@host` URL for logs and errors.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    match rest.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{scheme}://{user}:***@{host}")
        }
        None => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_never_reach_descriptions() {
        assert_eq!(redact_url("redis://:s3cret@cache:6379/0"), "redis://:***@cache:6379/0");
        assert_eq!(redact_url("rediss://app:pw@cache/1"), "rediss://app:***@cache/1");
        assert_eq!(redact_url("redis://127.0.0.1:6379"), "redis://127.0.0.1:6379");
    }
}
