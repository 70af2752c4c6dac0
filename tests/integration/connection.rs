//! The replication connection against a real server: SCRAM, md5, TLS verification,
//! pinned session settings, and clear errors when any of it is wrong.

use crate::support::{self, MD5_USER, PASSWORD, SCRAM_USER};
use walbust::postgres::{ConnInfo, ReplicationConn, SourceError};

fn conninfo(s: &str) -> ConnInfo {
    ConnInfo::parse(s, |_| None).unwrap_or_else(|e| panic!("conninfo `{s}`: {e}"))
}

async fn replication(s: &str) -> Result<ReplicationConn, SourceError> {
    ReplicationConn::connect(&conninfo(s), true).await
}

fn password_conninfo(user: &str, password: &str, extra: &str) -> String {
    let port = support::shared().pg.port();
    let pw = password.replace('\\', "\\\\").replace('\'', "\\'");
    format!("host=127.0.0.1 port={port} user={user} password='{pw}' dbname=postgres {extra}")
}

/// Writes a PEM file for the test and returns its path (kept alive by the returned dir).
fn pem_file(pem: &str) -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("root.crt");
    std::fs::write(&path, pem).expect("write pem");
    let path = path.display().to_string();
    (dir, path)
}

#[tokio::test]
async fn scram_sha_256_login_works_and_identifies_the_system() {
    let mut conn = replication(&password_conninfo(SCRAM_USER, PASSWORD, "sslmode=disable")).await.expect("scram login");
    let rows = conn.simple_query("IDENTIFY_SYSTEM").await.expect("IDENTIFY_SYSTEM");
    assert_eq!(rows.len(), 1);
    assert!(rows[0].get("systemid").is_some_and(|s| !s.is_empty()));
    assert_eq!(rows[0].get("dbname"), Some("postgres"));
}

#[tokio::test]
async fn md5_login_works() {
    let mut conn = replication(&password_conninfo(MD5_USER, PASSWORD, "sslmode=disable")).await.expect("md5 login");
    let rows = conn.simple_query("SELECT current_user AS u").await.expect("query");
    assert_eq!(rows[0].get("u"), Some(MD5_USER));
}

#[tokio::test]
async fn a_wrong_password_is_a_clear_permanent_error() {
    let err = replication(&password_conninfo(SCRAM_USER, "wrong", "sslmode=disable"))
        .await
        .map(|_| ())
        .expect_err("must fail");
    let text = walbust::errors::causes::error_chain(&err);
    assert!(text.contains("password authentication failed"), "{text}");
    assert!(text.contains(SCRAM_USER), "{text}");
    assert!(!err.is_transient(), "a wrong password is not retried: {text}");
}

#[tokio::test]
async fn a_wrong_password_names_where_the_password_came_from_on_both_kinds_of_connection() {
    let port = support::shared().pg.port();
    let from_env = ConnInfo::parse(
        &format!("host=127.0.0.1 port={port} user={SCRAM_USER} dbname=postgres sslmode=disable"),
        |name| (name == "PGPASSWORD").then(|| "wrong".to_string()),
    )
    .expect("conninfo");
    let from_text = conninfo(&password_conninfo(SCRAM_USER, "wrong", "sslmode=disable"));
    for (info, origin) in [(from_env, "came from PGPASSWORD"), (from_text, "came from the connection string")] {
        let replication = ReplicationConn::connect(&info, true).await.map(|_| ()).expect_err("must fail");
        let sql = walbust::postgres::connect_sql(&info).await.map(|_| ()).expect_err("must fail");
        for err in [replication, sql] {
            let text = walbust::errors::causes::error_chain(&err);
            assert!(text.contains("password authentication failed"), "{text}");
            assert!(text.contains(origin), "{text}");
            assert!(text.contains(&format!("role {SCRAM_USER}'s current password")), "{text}");
        }
    }
}

#[tokio::test]
async fn tls_verify_full_with_the_right_ca_encrypts_the_session() {
    let (_dir, ca) = pem_file(&support::shared().certs.ca_pem);
    let port = support::shared().pg.port();
    let mut conn = replication(&format!(
        "host=localhost port={port} user=postgres dbname=postgres sslmode=verify-full sslrootcert={ca}"
    ))
    .await
    .expect("verify-full login");
    let rows = conn
        .simple_query("SELECT ssl::text AS ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        .await
        .expect("query");
    assert_eq!(rows[0].get("ssl"), Some("true"));
}

#[tokio::test]
async fn tls_verify_full_rejects_an_unknown_ca_and_a_wrong_host_name() {
    let certs = &support::shared().certs;
    let port = support::shared().pg.port();
    let (_d1, other) = pem_file(&certs.other_ca_pem);
    let err = replication(&format!(
        "host=localhost port={port} user=postgres dbname=postgres sslmode=verify-full sslrootcert={other}"
    ))
    .await
    .map(|_| ())
    .expect_err("unknown CA must fail");
    let text = walbust::errors::causes::error_chain(&err);
    assert!(text.to_lowercase().contains("certificate"), "{text}");
    assert!(!err.is_transient(), "{text}");

    let (_d2, ca) = pem_file(&certs.ca_pem);
    let err = replication(&format!(
        "host=127.0.0.1 port={port} user=postgres dbname=postgres sslmode=verify-full sslrootcert={ca}"
    ))
    .await
    .map(|_| ())
    .expect_err("host name not in the certificate must fail");
    let text = walbust::errors::causes::error_chain(&err);
    assert!(text.to_lowercase().contains("certificate"), "{text}");

    // verify-ca checks the chain only, so the IP address is accepted.
    replication(&format!(
        "host=127.0.0.1 port={port} user=postgres dbname=postgres sslmode=verify-ca sslrootcert={ca}"
    ))
    .await
    .expect("verify-ca ignores the host name");
}

#[tokio::test]
async fn session_settings_are_pinned() {
    let port = support::shared().pg.port();
    let mut conn = replication(&format!("host=127.0.0.1 port={port} user=postgres dbname=postgres sslmode=disable"))
        .await
        .unwrap();
    for (setting, expected) in
        [("DateStyle", "ISO, MDY"), ("TimeZone", "UTC"), ("IntervalStyle", "postgres"), ("extra_float_digits", "3")]
    {
        let rows = conn.simple_query(&format!("SELECT current_setting('{setting}') AS v")).await.unwrap();
        assert_eq!(rows[0].get("v"), Some(expected), "{setting}");
    }
}

#[tokio::test]
async fn unix_socket_connections_work() {
    let pg = &support::shared().pg;
    let mut conn =
        replication(&format!("host={} port={} user=postgres dbname=postgres", pg.socket_dir().display(), pg.port()))
            .await
            .expect("unix socket");
    let rows = conn.simple_query("SELECT 1 AS one").await.unwrap();
    assert_eq!(rows[0].get("one"), Some("1"));
}

#[tokio::test]
async fn a_role_without_replication_gets_an_error_naming_the_fix() {
    let port = support::shared().pg.port();
    let err = replication(&format!("host=127.0.0.1 port={port} user=no_replication dbname=postgres sslmode=disable"))
        .await
        .map(|_| ())
        .expect_err("must fail");
    let text = walbust::errors::causes::error_chain(&err);
    assert!(text.contains("REPLICATION"), "{text}");
}

#[tokio::test]
async fn several_hosts_are_tried_in_order_and_target_session_attrs_picks_the_server() {
    let port = support::shared().pg.port();
    // Nothing listens on the first port: a free one, taken and let go.
    let dead = support::free_port();
    let hosts = format!("host=127.0.0.1,localhost port={dead},{port} user=postgres dbname=postgres sslmode=disable");
    for attrs in ["any", "read-write", "primary", "prefer-standby"] {
        let info = conninfo(&format!("{hosts} target_session_attrs={attrs}"));
        let conn = ReplicationConn::connect(&info, true).await.unwrap_or_else(|e| panic!("{attrs}: {e}"));
        assert_eq!(conn.endpoint(), format!("localhost:{port}"), "{attrs}");
        let client = walbust::postgres::connect_sql(&info).await.unwrap_or_else(|e| panic!("{attrs}: {e}"));
        assert_eq!(client.query_one("SELECT 1", &[]).await.expect("query").get::<_, i32>(0), 1);
    }
    let url = format!("postgres://postgres@127.0.0.1:{dead},localhost:{port}/postgres?sslmode=disable");
    let conn = replication(&url).await.expect("the url form");
    assert_eq!(conn.endpoint(), format!("localhost:{port}"));

    // The only server is a primary: a standby is asked for in vain, by both kinds of connection.
    let info = conninfo(&format!("{hosts} target_session_attrs=standby"));
    let err = ReplicationConn::connect(&info, true).await.expect_err("no standby");
    assert!(matches!(err, SourceError::SessionAttrs { .. }), "{err:?}");
    assert_eq!(
        err.to_string(),
        format!(
            "server at localhost:{port} is a primary (read-write), and no host of the connection string is the server target_session_attrs=standby asks for"
        )
    );
    assert!(err.is_transient(), "a promotion may be under way");
    let err = walbust::postgres::connect_sql(&info).await.expect_err("no standby");
    assert!(matches!(err, SourceError::SessionAttrs { .. }), "{err:?}");
}
