//! Counts of `walbust.wait()` calls: the function counts them on the server (it runs in
//! the application's session, not in walbust), and this task reads those counts into
//! `walbust_wait_calls_total`.

use crate::daemon::fix::WAIT_SCHEMA;
use crate::postgres::{ConnInfo, sql};
use crate::telemetry::metrics::Metrics;
use std::sync::Arc;
use std::time::Duration;
use tracing::debug;

/// How often the counts are read.
const EVERY: Duration = Duration::from_secs(5);

/// Reads the server's `walbust.wait()` counts every few seconds, for as long as it runs.
/// Where setup has not installed the function, there is nothing to read and nothing counts.
pub async fn read_wait_calls(conninfo: ConnInfo, metrics: Arc<Metrics>) {
    let query = format!(
        "SELECT (SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM {s}.wait_answered), \
                (SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM {s}.wait_timed_out)",
        s = WAIT_SCHEMA
    );
    loop {
        match sql::connect_sql(&conninfo).await {
            Ok(client) => loop {
                match client.query_one(query.as_str(), &[]).await {
                    Ok(row) => {
                        let (answered, timed_out): (i64, i64) = (row.get(0), row.get(1));
                        metrics.set_wait_calls("answered", answered.max(0) as u64);
                        metrics.set_wait_calls("timed_out", timed_out.max(0) as u64);
                    }
                    Err(e) => {
                        debug!(error = %e, "cannot read the walbust.wait() counts");
                        if client.is_closed() {
                            break;
                        }
                    }
                }
                tokio::time::sleep(EVERY).await;
            },
            Err(e) => debug!(error = %e, "cannot connect to read the walbust.wait() counts"),
        }
        tokio::time::sleep(EVERY).await;
    }
}
