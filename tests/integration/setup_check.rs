//! `walbust setup --apply` on a fresh database, then `walbust check --online`, passes with
//! no warnings for the example config's rules.

use crate::support::{self, fresh_db, write_config};

/// The demo schema's tables, without the publication and replica identity `setup` provides.
fn tables_only() -> String {
    include_str!("../../sql/demo.sql")
        .lines()
        .filter(|l| !l.starts_with("CREATE PUBLICATION") && !l.starts_with("ALTER TABLE"))
        .collect::<Vec<_>>()
        .join("\n")
}

fn walbust(args: &[&str]) -> (Option<i32>, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_walbust")).args(args).output().expect("walbust");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.code(), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn setup_apply_on_a_fresh_database_then_check_online_passes_without_warnings() {
    let s = support::shared();
    let db = fresh_db(&s.pg, &tables_only()).await;
    db.client.batch_execute(&format!("DROP PUBLICATION {}", db.name)).await.unwrap();
    let files = write_config(&db, &s.redis.url(), include_str!("../../rules/demo.toml"), "");
    let config = files.path.to_str().unwrap();

    let (code, before) = walbust(&["check", "--online", "--config", config]);
    assert_eq!(code, Some(1), "a fresh database is not ready: {before}");
    assert!(before.contains("publication"), "{before}");

    let (code, out) = walbust(&["setup", "--apply", "--config", config, "--admin-url", &db.url]);
    assert_eq!(code, Some(0), "{out}");
    let (code, out) = walbust(&["check", "--online", "--deny-warnings", "--config", config]);
    assert_eq!(code, Some(0), "{out}");
    assert!(!out.contains("warning"), "{out}");
    let identity: String = db
        .client
        .query_one("SELECT relreplident::text FROM pg_class WHERE oid = 'public.plans'::regclass", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(identity, "f", "plans rules key on non-key columns: setup made its identity FULL");
}
