//! Against a real Sentinel setup (one master, one replica, three Sentinels): walbust
//! follows the master across a `SENTINEL FAILOVER` under a write load and loses nothing.

use crate::routing::drained;
use crate::support::markers::{Markers, write_load};
use crate::support::{Running, fresh_db, wait_until, write_config_with};
use std::time::Duration;
use walbust::offline::throwaway::ThrowawaySentinel;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinel_failover_under_writes_is_followed_without_restart_and_leaves_no_marker() {
    let s = crate::support::shared();
    let setup = tokio::task::spawn_blocking(|| ThrowawaySentinel::start(1, 3))
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("cannot start the test Sentinel setup: {e}"));
    let db = fresh_db(&s.pg, "CREATE TABLE items (id int PRIMARY KEY);").await;
    let n = db.name.clone();
    let sentinels = setup.sentinel_urls();
    let list = sentinels.iter().map(|u| format!("\"{u}\"")).collect::<Vec<_>>().join(", ");
    let redis_extra = format!("sentinels = [{list}]\nmaster_name = \"{}\"", setup.master_name);
    let rules = format!("[[rule]]\nname = \"items\"\ntable = \"items\"\nkeys = [\"{n}:item:{{id}}\"]\n");
    // The url's host is not used under Sentinel; its database and credentials are.
    let files = write_config_with(&db, "redis://127.0.0.1:1/0", &rules, "", &redis_extra, "off");
    let markers = Markers::Sentinel { sentinels: sentinels.clone(), master_name: setup.master_name.clone() };
    let first_master = setup.master_port().unwrap();
    let check = |path: std::path::PathBuf| {
        tokio::task::spawn_blocking(move || crate::cluster::walbust(&["check", "--online"], &path))
    };
    let (code, out, err) = check(files.path.clone()).await.unwrap();
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains(&format!(
            "ok   redis sentinel master `{}` at 127.0.0.1:{first_master}, 1 replica(s) connected, wait_replicas 1, 3 of 3 sentinels reachable",
            setup.master_name
        )),
        "{out}{err}"
    );
    let run = Running::start(&files.path).await;

    let load = tokio::spawn({
        let (url, markers, n) = (db.url.clone(), markers.clone(), n.clone());
        async move { write_load(&url, &markers, Duration::from_secs(20), |id| vec![format!("{n}:item:{id}")]).await }
    });
    tokio::time::sleep(Duration::from_secs(6)).await;
    let reply = setup.cli(setup.sentinels[0].port(), &["SENTINEL", "FAILOVER", &setup.master_name]).unwrap();
    assert_eq!(reply.trim(), "OK", "sentinel failover");
    wait_until(Duration::from_secs(60), "the sentinels to name the replica master", || {
        let now = setup.master_port().ok();
        async move { now.is_some_and(|p| p != first_master) }
    })
    .await;

    let cached = load.await.unwrap();
    // A floor, not a rate: writes stall while the failover is under way, and a loaded
    // machine writes fewer; a hundred still spread over the whole 20 s.
    assert!(cached.len() > 100, "the load wrote {} markers", cached.len());
    drained(&run, &db.client).await;
    markers.all_gone(&cached, Duration::from_secs(5)).await;
    let now = setup.master_port().unwrap();
    assert_ne!(now, first_master, "the failover happened");
    let (_, out, err) = tokio::task::spawn_blocking({
        let path = files.path.clone();
        move || crate::cluster::walbust(&["status"], &path)
    })
    .await
    .unwrap();
    assert!(out.contains(&format!("sentinel master `{}` at 127.0.0.1:{now}", setup.master_name)), "{out}{err}");
    run.stop().await.expect("clean stop, never restarted");
}
