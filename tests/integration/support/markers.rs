//! Marker keys: cached before the write that must invalidate them, looked for afterwards,
//! on one node, a Redis Cluster or Sentinel's master of the moment; and a write load that
//! caches a marker for every row it inserts.

use futures_util::StreamExt;
use redis::aio::MultiplexedConnection;
use redis::cluster_async::ClusterConnection;
use std::time::Duration;

/// Where the test caches and looks for markers.
#[derive(Clone)]
pub enum Markers {
    /// One node (or a fixed master).
    Node(MultiplexedConnection),
    /// A Redis Cluster.
    Cluster(ClusterConnection),
    /// The master the Sentinels name, looked up again after an error; each SET waits for
    /// a replica (`WAIT`), so a failover cannot drop a marker and make the test pass by itself.
    Sentinel { sentinels: Vec<String>, master_name: String },
}

impl Markers {
    /// Markers on the cluster seeded by `url`.
    pub async fn cluster(url: &str) -> Markers {
        let client = redis::cluster::ClusterClientBuilder::new(vec![url]).retries(10).build().expect("cluster url");
        Markers::Cluster(client.get_async_connection().await.expect("connecting to the cluster"))
    }

    /// Sets every key in `keys` to "cached", retrying through a failover.
    pub async fn cache(&self, keys: &[String]) {
        self.each(keys, |key| {
            let mut cmd = redis::cmd("SET");
            cmd.arg(key).arg("cached");
            cmd
        })
        .await;
    }

    /// Which of `keys` exist.
    pub async fn existing(&self, keys: &[String]) -> Vec<String> {
        let flags = self.each(keys, |key| redis::cmd("EXISTS").arg(key).clone()).await;
        keys.iter().zip(flags).filter(|(_, v)| *v == redis::Value::Int(1)).map(|(k, _)| k.clone()).collect()
    }

    /// Runs `command` on each key (one command per key, so that a cluster routes each);
    /// retries a failed command for up to a minute, since a failover may be under way.
    pub async fn each(&self, keys: &[String], command: impl Fn(&str) -> redis::Cmd) -> Vec<redis::Value> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let result = match self {
                Markers::Node(conn) => {
                    let mut pipe = redis::pipe();
                    for key in keys {
                        pipe.add_command(command(key));
                    }
                    pipe.query_async::<Vec<redis::Value>>(&mut conn.clone()).await
                }
                Markers::Cluster(conn) => {
                    // Built before the first await: a lazily mapping stream would hold its
                    // closure across awaits, which tokio::spawn's Send check rejects.
                    let mut sends = Vec::with_capacity(keys.len());
                    for key in keys {
                        let (cmd, mut conn) = (command(key), conn.clone());
                        sends.push(async move { cmd.query_async::<redis::Value>(&mut conn).await });
                    }
                    let replies: Vec<redis::RedisResult<redis::Value>> =
                        futures_util::stream::iter(sends).buffered(256).collect().await;
                    replies.into_iter().collect()
                }
                Markers::Sentinel { sentinels, master_name } => {
                    sentinel_each(sentinels, master_name, keys, &command).await
                }
            };
            match result {
                Ok(values) => return values,
                Err(e) if tokio::time::Instant::now() < deadline => {
                    eprintln!("marker command failed, retrying: {e}");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => panic!("marker command failed for a minute: {e}"),
            }
        }
    }

    /// Waits until none of `keys` exists; panics with some that are left after `timeout`.
    #[track_caller]
    pub fn all_gone<'a>(&'a self, keys: &'a [String], timeout: Duration) -> impl Future<Output = ()> + 'a {
        let caller = std::panic::Location::caller();
        async move {
            let deadline = tokio::time::Instant::now() + timeout;
            loop {
                let left = self.existing(keys).await;
                if left.is_empty() {
                    return;
                }
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "{} of {} marker keys never invalidated, e.g. {:?} (at {caller})",
                    left.len(),
                    keys.len(),
                    &left[..left.len().min(5)]
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn sentinel_each(
    sentinels: &[String],
    master_name: &str,
    keys: &[String],
    command: &impl Fn(&str) -> redis::Cmd,
) -> redis::RedisResult<Vec<redis::Value>> {
    let mut client = redis::sentinel::SentinelClient::build(
        sentinels.to_vec(),
        master_name,
        None,
        redis::sentinel::SentinelServerType::Master,
    )?;
    let mut conn = client.get_async_connection().await?;
    let mut pipe = redis::pipe();
    for key in keys {
        pipe.add_command(command(key));
    }
    let values: Vec<redis::Value> = pipe.query_async(&mut conn).await?;
    let acked: i64 = redis::cmd("WAIT").arg(1).arg(2000).query_async(&mut conn).await?;
    if acked < 1 {
        return Err(redis::RedisError::from((redis::ErrorKind::Io, "no replica confirmed the markers")));
    }
    Ok(values)
}

/// Inserts one row a time into `items (id)` for `duration`, caching the keys `keys(id)`
/// returns just before each insert; returns every key cached.
pub async fn write_load(
    db_url: &str,
    markers: &Markers,
    duration: Duration,
    keys: impl Fn(i32) -> Vec<String>,
) -> Vec<String> {
    let client = super::connect(db_url).await;
    let end = tokio::time::Instant::now() + duration;
    let mut all = Vec::new();
    let mut id = 0;
    while tokio::time::Instant::now() < end {
        id += 1;
        let cached = keys(id);
        markers.cache(&cached).await;
        client.execute("INSERT INTO items (id) VALUES ($1)", &[&id]).await.expect("insert");
        all.extend(cached);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    all
}
