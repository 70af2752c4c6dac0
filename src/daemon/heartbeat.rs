//! The heartbeat: a logical message `walbust run` writes through an ordinary connection
//! at a steady interval, so the slot advances on an idle database and the message's arrival
//! measures the whole path's latency. Only this process's own heartbeats count.

use crate::daemon::outage::{Outage, rounded};
use crate::errors::causes::error_chain;
use crate::postgres::HEARTBEAT_PREFIX;
use std::time::Duration;
use tracing::{info, warn};

/// A number this process picks at random and writes into each of its heartbeats: any role
/// may emit a message with the heartbeat prefix, but only this process's own heartbeats
/// carry it, so a forged one cannot move the heartbeat gauge.
pub fn heartbeat_nonce() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    // RandomState is seeded from the operating system's randomness.
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(std::process::id().into());
    h.finish()
}

/// The body of a heartbeat: the nonce and the time it was written, in Postgres microseconds.
pub fn heartbeat_body(nonce: u64, written: i64) -> String {
    format!("{nonce:016x} {written}")
}

/// The write time of a heartbeat body carrying `nonce`; `None` for anything else.
pub fn heartbeat_time(nonce: u64, body: &[u8]) -> Option<i64> {
    let (sent_nonce, written) = std::str::from_utf8(body).ok()?.split_once(' ')?;
    (u64::from_str_radix(sent_nonce, 16).ok()? == nonce).then(|| written.parse().ok()).flatten()
}

/// Writes a non-transactional logical message every `every`, carrying the time it was
/// written: the slot advances even when the database is idle, and its arrival measures the
/// whole path's latency.
pub async fn heartbeat(conninfo: crate::postgres::ConnInfo, every: Duration, nonce: u64) {
    let mut outage = Outage::default();
    let mut written_once = false;
    loop {
        let client = match crate::postgres::connect_sql(&conninfo).await {
            Ok(c) => c,
            // Before the first heartbeat, a connection refused for good (a wrong password)
            // also stops the pipeline, which reports it: said once, not once per task.
            Err(e) if !written_once && !e.is_transient() => {
                tracing::debug!(error = %error_chain(&e), "heartbeat cannot connect; the pipeline reports why");
                tokio::time::sleep(every).await;
                continue;
            }
            Err(e) => {
                if outage.failed() {
                    warn!(error = %error_chain(&e), down_for = ?outage.length(), "heartbeat cannot connect; retrying");
                }
                tokio::time::sleep(every).await;
                continue;
            }
        };
        let mut tick = tokio::time::interval(every);
        loop {
            tick.tick().await;
            let now = heartbeat_body(nonce, crate::postgres::now_pg_micros());
            let sql = "SELECT pg_logical_emit_message(false, $1, $2)";
            if let Err(e) = client.execute(sql, &[&HEARTBEAT_PREFIX, &now]).await {
                // The SQLSTATE and message (57P01 for a terminated backend), not just "db error".
                let e = crate::postgres::sql::from_pg_error(e, &conninfo.describe());
                if outage.failed() {
                    warn!(error = %error_chain(&e), "writing a heartbeat failed; reconnecting");
                }
                break;
            }
            written_once = true;
            if let Some(down) = outage.ended() {
                info!(outage = ?down, "heartbeat written again after {}", rounded(down));
            }
        }
        tokio::time::sleep(every).await;
    }
}
