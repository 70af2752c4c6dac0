//! Redis Sentinel: the master is whichever node the Sentinels name now.
//!
//! The master is looked up (and its role checked) on first use and again after any failed
//! batch, so a failover is followed without a restart. A batch counts as applied only when
//! `WAIT` says `wait_replicas` replicas have it too: Sentinel promotes a replica without
//! waiting for it to catch up, and the demoted master then resynchronises from the new
//! one, so a delete the old master acknowledged but had not yet passed on would be lost.

use super::{RedisReport, RedisSinkError};
use crate::domain::config::redact_url;
use redis::aio::MultiplexedConnection;
use redis::sentinel::{SentinelClient, SentinelClientBuilder, SentinelServerType};
use redis::{ConnectionAddr, IntoConnectionInfo, RedisResult};
use std::sync::Arc;
use tokio::sync::Mutex;

/// How long a batch waits for its replicas (`WAIT`) before it is tried again.
const WAIT_TIMEOUT_MS: u64 = 2000;

/// The master behind a set of Sentinels; clones share it.
#[derive(Clone)]
pub(super) struct Master {
    state: Arc<Mutex<State>>,
    wait_replicas: u32,
}

struct State {
    client: SentinelClient,
    /// The master's connection, until a failure makes it stale.
    conn: Option<MultiplexedConnection>,
}

impl Master {
    /// The master called `master_name` by `sentinels`; `url` gives its credentials,
    /// database and TLS (its host is not used).
    pub(super) fn new(
        url: &str,
        sentinels: &[String],
        master_name: &str,
        root_cert: Option<&[u8]>,
        wait_replicas: u32,
    ) -> RedisResult<Master> {
        let template = url.into_connection_info()?;
        let mut addrs = Vec::new();
        let mut sentinel_auth = None;
        for s in sentinels {
            let info = s.as_str().into_connection_info()?;
            sentinel_auth.get_or_insert_with(|| info.redis_settings().clone());
            addrs.push(info.addr().clone());
        }
        let sentinel_tls = addrs.iter().any(|a| matches!(a, ConnectionAddr::TcpTls { .. }));
        let settings = template.redis_settings();
        let mut builder = SentinelClientBuilder::new(addrs, master_name, SentinelServerType::Master)?
            .set_client_to_redis_db(settings.db());
        if let Some(user) = settings.username() {
            builder = builder.set_client_to_redis_username(user);
        }
        if let Some(password) = settings.password() {
            builder = builder.set_client_to_redis_password(password);
        }
        if let Some(auth) = sentinel_auth {
            if let Some(user) = auth.username() {
                builder = builder.set_client_to_sentinel_username(user);
            }
            if let Some(password) = auth.password() {
                builder = builder.set_client_to_sentinel_password(password);
            }
        }
        if matches!(template.addr(), ConnectionAddr::TcpTls { .. }) {
            builder = builder.set_client_to_redis_tls_mode(redis::TlsMode::Secure);
            if let Some(pem) = root_cert {
                builder = builder.set_client_to_redis_certificates(super::certificates(pem));
            }
        }
        if sentinel_tls {
            builder = builder.set_client_to_sentinel_tls_mode(redis::TlsMode::Secure);
            if let Some(pem) = root_cert {
                builder = builder.set_client_to_sentinel_certificates(super::certificates(pem));
            }
        }
        let client = builder.build()?;
        Ok(Master { state: Arc::new(Mutex::new(State { client, conn: None })), wait_replicas })
    }

    /// The master's connection, asking the Sentinels for the master when there is none.
    pub(super) async fn connection(&self) -> RedisResult<MultiplexedConnection> {
        let mut state = self.state.lock().await;
        if let Some(conn) = &state.conn {
            return Ok(conn.clone());
        }
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(super::CONNECT_TIMEOUT))
            .set_response_timeout(Some(super::RESPONSE_TIMEOUT));
        let client = state.client.async_get_client().await?;
        let conn = client.get_multiplexed_async_connection_with_config(&config).await?;
        tracing::info!(address = %client.get_connection_info().addr(), "redis master found through sentinel");
        state.conn = Some(conn.clone());
        Ok(conn)
    }

    /// Drops the master's connection, so that the next batch asks the Sentinels again.
    pub(super) async fn forget(&self) {
        self.state.lock().await.conn = None;
    }

    /// Waits until `wait_replicas` replicas have every write made on `conn` so far.
    pub(super) async fn confirm(
        &self,
        conn: &mut impl redis::aio::ConnectionLike,
        target: &str,
    ) -> Result<(), RedisSinkError> {
        if self.wait_replicas == 0 {
            return Ok(());
        }
        let acked: i64 =
            redis::cmd("WAIT").arg(self.wait_replicas).arg(WAIT_TIMEOUT_MS).query_async(conn).await.map_err(
                |source| RedisSinkError::Command { target: target.to_string(), doing: "waiting for replicas", source },
            )?;
        if acked < i64::from(self.wait_replicas) {
            return Err(RedisSinkError::Unreplicated {
                target: target.to_string(),
                wanted: self.wait_replicas,
                acked,
                timeout_ms: WAIT_TIMEOUT_MS,
            });
        }
        Ok(())
    }
}

/// What `check --online` and `status` say about Sentinel: the master each Sentinel names,
/// whether it answers as a master, and its replicas against `wait_replicas`.
pub(super) async fn inspect(
    url: &str,
    sentinels: &[String],
    master_name: &str,
    root_cert: Option<&[u8]>,
    wait_replicas: u32,
) -> RedisReport {
    let mut problems = Vec::new();
    let mut named = Vec::new();
    for s in sentinels {
        let asked = async {
            let config = redis::AsyncConnectionConfig::new()
                .set_connection_timeout(Some(super::PROBE_TIMEOUT))
                .set_response_timeout(Some(super::PROBE_TIMEOUT));
            let mut conn = super::client(s, root_cert)?.get_multiplexed_async_connection_with_config(&config).await?;
            redis::cmd("SENTINEL")
                .arg("GET-MASTER-ADDR-BY-NAME")
                .arg(master_name)
                .query_async::<Option<(String, u16)>>(&mut conn)
                .await
        };
        match asked.await {
            Ok(Some((host, port))) => named.push(format!("{host}:{port}")),
            Ok(None) => problems.push(format!(
                "sentinel {} does not monitor a master named `{master_name}`; check master_name",
                redact_url(s)
            )),
            Err(e) => problems.push(format!("cannot reach sentinel {}: {e}", redact_url(s))),
        }
    }
    named.sort();
    named.dedup();
    let master = match Master::new(url, sentinels, master_name, root_cert, wait_replicas) {
        Ok(m) => m.connection().await,
        Err(e) => Err(e),
    };
    let replicas = match master {
        Ok(mut conn) => {
            let info: redis::RedisResult<String> = redis::cmd("INFO").arg("replication").query_async(&mut conn).await;
            info.ok()
                .and_then(|i| i.lines().find_map(|l| l.strip_prefix("connected_slaves:")?.trim().parse::<u32>().ok()))
        }
        Err(e) => {
            problems.push(format!("cannot reach the master `{master_name}` the sentinels name: {e}"));
            None
        }
    };
    if let Some(n) = replicas.filter(|n| *n < wait_replicas) {
        problems.push(format!(
            "the master has {n} connected replica(s) but wait_replicas = {wait_replicas}: no batch can be confirmed until one reconnects; lower wait_replicas or fix the replica"
        ));
    }
    if named.len() > 1 {
        problems.push(format!("the sentinels disagree on the master of `{master_name}`: {}", named.join(", ")));
    }
    let summary = format!(
        "sentinel master `{master_name}` at {}, {}, {} of {} sentinels reachable",
        if named.is_empty() { "unknown".to_string() } else { named.join(" / ") },
        match replicas {
            Some(n) => format!("{n} replica(s) connected, wait_replicas {wait_replicas}"),
            None => "master unreachable".to_string(),
        },
        sentinels.len() - problems.iter().filter(|p| p.starts_with("cannot reach sentinel")).count(),
        sentinels.len()
    );
    RedisReport { summary, problems }
}
