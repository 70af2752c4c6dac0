//! `walbust health`: asks a running walbust's `/healthz`, for container health checks and
//! scripts on hosts without an HTTP client; the logic is `walbust::health::probe`.

use super::{EXIT_FAILED, EXIT_OK, EXIT_USAGE};
use std::path::Path;
use std::time::Duration;
use walbust::config::Config;
use walbust::health::probe;

/// Long enough for a loaded host, short enough for a health check's own timeout.
const TIMEOUT: Duration = Duration::from_secs(5);

/// GETs `/healthz` on the config's `[metrics] listen` (loopback when it listens on every
/// interface) and prints the answer; 0 when healthy, 1 when not or unreachable, 2 when the
/// config is bad or has the endpoint off.
pub async fn health(config_path: &Path) -> u8 {
    let config = match Config::load(config_path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return EXIT_USAGE;
        }
    };
    let Some(listen) = config.metrics.listen else {
        eprintln!(
            "error: `[metrics] listen` is \"off\" in {}, so there is no /healthz to ask; set it to host:port",
            config_path.display()
        );
        return EXIT_USAGE;
    };
    match probe(&listen, TIMEOUT).await {
        Ok(answer) if answer.status == 200 => {
            print!("{}", answer.body);
            EXIT_OK
        }
        Ok(answer) => {
            eprint!("unhealthy ({}): {}", answer.status, answer.body);
            EXIT_FAILED
        }
        Err(e) => {
            eprintln!("error: {:#}", anyhow::Error::from(e));
            EXIT_FAILED
        }
    }
}
