//! `walbust health`: asks a running walbust's `/healthz`, for container health checks and
//! scripts on hosts without an HTTP client; the logic is `walbust::telemetry::health::probe`.

use super::{CliError, Outcome};
use std::path::Path;
use std::time::Duration;
use walbust::errors::exit;
use walbust::telemetry::health::probe;

/// Long enough for a loaded host, short enough for a health check's own timeout.
const TIMEOUT: Duration = Duration::from_secs(5);

/// GETs `/healthz` on the config's `[metrics] listen` (loopback when it listens on every
/// interface) and prints the answer; 0 when healthy, 1 when not or unreachable, 2 when the
/// config is bad or has the endpoint off.
pub async fn health(config_path: &Path) -> Outcome {
    let config = super::load_config(config_path)?;
    let Some(listen) = config.metrics.listen else {
        return Err(CliError::usage(anyhow::anyhow!(
            "`[metrics] listen` is \"off\" in {}, so there is no /healthz to ask; set it to host:port",
            config_path.display()
        )));
    };
    let answer = probe(&listen, TIMEOUT).await.map_err(CliError::failed)?;
    if answer.status == 200 {
        print!("{}", answer.body);
        Ok(exit::OK)
    } else {
        eprint!("unhealthy ({}): {}", answer.status, answer.body);
        Ok(exit::FAILED)
    }
}
