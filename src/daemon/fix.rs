//! The statements walbust shows users to fix their database, and runs in `walbust setup
//! --apply`: the publication (create it, add tables, publish every op), replica identity,
//! the role, the `pg_logical_emit_message` grants and the `walbust.wait()` function.
//!
//! `walbust run` (its start-up gate and its slot checks), `walbust check --online` and
//! `walbust setup` all take their statements from here, so the same problem gets the same
//! advice from each. Names are written as a person would ([`sql_ident`]: bare when plain),
//! except roles and databases, which are always quoted. Quoting itself is
//! [`crate::postgres::quote`].

use crate::domain::rules::TableName;
use crate::postgres::quote::{quote_ident, quote_literal, sql_ident};
use std::fmt::Write as _;

/// The ops a publication must publish for walbust.
pub const PUBLISH: &str = "insert, update, delete, truncate";

/// `schema.table` as SQL.
pub fn sql_table(t: &TableName) -> String {
    format!("{}.{}", sql_ident(&t.schema), sql_ident(&t.table))
}

/// `CREATE PUBLICATION` over `tables` (every table when there are none), publishing every
/// op walbust routes.
pub fn create_publication(publication: &str, tables: &[&TableName]) -> String {
    let target = if tables.is_empty() {
        "ALL TABLES".to_string()
    } else {
        format!("TABLE {}", tables.iter().map(|t| sql_table(t)).collect::<Vec<_>>().join(", "))
    };
    format!("CREATE PUBLICATION {} FOR {target} WITH (publish = {});", sql_ident(publication), quote_literal(PUBLISH))
}

/// [`create_publication`] for a script that may run again: the publication is created only
/// when none of that name exists (an existing one is left as it is; `walbust check
/// --online` says what it lacks).
pub fn create_publication_if_missing(publication: &str, tables: &[&TableName]) -> String {
    let exists = format!("SELECT FROM pg_publication WHERE pubname = {}", quote_literal(publication));
    unless_exists(&exists, &create_publication(publication, tables))
}

/// `ALTER PUBLICATION ... ADD TABLE` for `tables` the publication lacks.
pub fn add_tables(publication: &str, tables: &[&TableName]) -> String {
    let names: Vec<String> = tables.iter().map(|t| sql_table(t)).collect();
    format!("ALTER PUBLICATION {} ADD TABLE {};", sql_ident(publication), names.join(", "))
}

/// `ALTER PUBLICATION ... SET (publish = ...)` with every op walbust routes, as
/// [`create_publication`] makes it.
pub fn publish_every_op(publication: &str) -> String {
    format!("ALTER PUBLICATION {} SET (publish = {});", sql_ident(publication), quote_literal(PUBLISH))
}

/// `ALTER PUBLICATION ... SET (publish_via_partition_root = true)`, so a partitioned
/// table's changes carry its own name.
pub fn publish_via_root(publication: &str) -> String {
    format!("ALTER PUBLICATION {} SET (publish_via_partition_root = true);", sql_ident(publication))
}

/// `ALTER PUBLICATION ... SET TABLE ...;`, the start of the statement that drops a
/// table's column list (the person fills in the tables).
pub fn set_tables_outline(publication: &str) -> String {
    format!("ALTER PUBLICATION {} SET TABLE ...;", sql_ident(publication))
}

/// `ALTER TABLE ... REPLICA IDENTITY FULL`, so updates and deletes carry the whole old row.
pub fn replica_identity_full(table: &TableName) -> String {
    format!("ALTER TABLE {} REPLICA IDENTITY FULL;", sql_table(table))
}

/// The statements that create walbust's login role: `REPLICATION` and nothing else, and
/// `CONNECT` on `database`.
pub fn create_role(role: &str, database: &str) -> String {
    format!(
        "CREATE ROLE {r} LOGIN REPLICATION NOSUPERUSER NOCREATEDB NOCREATEROLE;\n\
         GRANT CONNECT ON DATABASE {d} TO {r};\n",
        r = quote_ident(role),
        d = quote_ident(database),
    )
}

/// [`create_role`] for a script that may run again: the role is created only when no role
/// of that name exists (an existing one is left as it is).
pub fn create_role_if_missing(role: &str, database: &str) -> String {
    let create = format!("CREATE ROLE {} LOGIN REPLICATION NOSUPERUSER NOCREATEDB NOCREATEROLE;", quote_ident(role));
    let exists = format!("SELECT FROM pg_roles WHERE rolname = {}", quote_literal(role));
    format!(
        "{}GRANT CONNECT ON DATABASE {} TO {};\n",
        unless_exists(&exists, &create),
        quote_ident(database),
        quote_ident(role)
    )
}

/// `ALTER ROLE ... LOGIN REPLICATION`, for an existing role that lacks either.
pub fn role_login_replication(role: &str) -> String {
    format!("ALTER ROLE {} LOGIN REPLICATION;", quote_ident(role))
}

/// The roles that keep `pg_logical_emit_message`: walbust's own (it writes heartbeats with
/// it), then the application roles, without repeats.
pub fn emitters(role: &str, app_roles: &[String]) -> Vec<String> {
    let mut all = vec![role.to_string()];
    for r in app_roles {
        if !all.contains(r) {
            all.push(r.clone());
        }
    }
    all
}

/// A `DO` block revoking every overload of `pg_logical_emit_message` from PUBLIC and from
/// `revoke`, and granting it to `roles`. Overloads are looked up at run time: Postgres 13
/// to 16 have `(boolean, text, text)` and `(boolean, text, bytea)`; 17 adds a `flush`
/// argument to both.
pub fn emit_message_grants(roles: &[String], revoke: &[String]) -> String {
    let mut body = String::from(
        "DECLARE f regprocedure;\nBEGIN\n  FOR f IN SELECT p.oid::regprocedure FROM pg_proc p\n           \
         WHERE p.proname = 'pg_logical_emit_message' AND p.pronamespace = 'pg_catalog'::regnamespace\n  LOOP\n    \
         EXECUTE format('REVOKE EXECUTE ON FUNCTION %s FROM PUBLIC', f);\n",
    );
    if !revoke.is_empty() {
        let revoke: Vec<String> = revoke.iter().map(|r| quote_ident(r)).collect();
        let _ = writeln!(
            body,
            "    EXECUTE format('REVOKE EXECUTE ON FUNCTION %s FROM %s', f, {});",
            quote_literal(&revoke.join(", "))
        );
    }
    if !roles.is_empty() {
        let roles: Vec<String> = roles.iter().map(|r| quote_ident(r)).collect();
        let _ = writeln!(
            body,
            "    EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO %s', f, {});",
            quote_literal(&roles.join(", "))
        );
    }
    body.push_str("  END LOOP;\nEND\n");
    do_block(&body)
}

/// A `DO` block that runs `statement` only when the query `exists` returns no row.
fn unless_exists(exists: &str, statement: &str) -> String {
    do_block(&format!("BEGIN\n  IF NOT EXISTS ({exists}) THEN\n    {statement}\n  END IF;\nEND\n"))
}

/// `body` as a `DO` block, in a dollar-quote tag that the body (role names included)
/// cannot end early.
fn do_block(body: &str) -> String {
    let mut tag = String::from("walbust");
    while body.contains(&format!("${tag}$")) {
        tag.push('_');
    }
    format!("DO ${tag}$\n{body}${tag}$;\n")
}

/// `ALTER SYSTEM SET name = 'value'; SELECT pg_reload_conf();`, for a setting a reload applies.
pub fn set_and_reload(name: &str, value: &str) -> String {
    format!("ALTER SYSTEM SET {name} = {}; SELECT pg_reload_conf();", quote_literal(value))
}

/// `SELECT pg_create_physical_replication_slot('name');`, the slot a standby streams from
/// (its `primary_slot_name`).
pub fn create_physical_slot(name: &str) -> String {
    format!("SELECT pg_create_physical_replication_slot({});", quote_literal(name))
}

/// `dbname=...` as a standby's `primary_conninfo` needs it for slot synchronization.
pub fn primary_conninfo_dbname(database: &str) -> String {
    if database.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        format!("dbname={database}")
    } else {
        format!("dbname='{}'", database.replace('\\', "\\\\").replace('\'', "\\'"))
    }
}

/// What a primary and its standbys need for walbust's failover slot to survive a
/// promotion (PostgreSQL 17 and later), as SQL comments for `walbust setup`: each
/// statement runs on a different server. `standby_slot` names the standby's physical slot.
pub fn failover_settings(standby_slot: &str, database: &str) -> String {
    let mut out = String::from(
        "-- Failover (failover = true, PostgreSQL 17 and later): walbust creates its slot with FAILOVER;\n\
         -- each standby keeps it in step, so that after a promotion walbust resumes from it and loses nothing.\n\
         -- On the primary: a physical slot per standby, and no change sent to walbust before the standbys have it:\n",
    );
    for line in [create_physical_slot(standby_slot), set_and_reload("synchronized_standby_slots", standby_slot)] {
        let _ = writeln!(out, "--   {line}");
    }
    out.push_str("-- On each standby (its own slot name in primary_slot_name):\n");
    for (name, value) in
        [("sync_replication_slots", "on"), ("hot_standby_feedback", "on"), ("primary_slot_name", standby_slot)]
    {
        let _ = writeln!(out, "--   {}", set_and_reload(name, value));
    }
    let _ = writeln!(out, "--   and {} in its primary_conninfo", primary_conninfo_dbname(database));
    out.push_str(
        "-- List the standbys in [source] url with target_session_attrs=primary (host=primary,standby), so that\n\
         -- walbust finds the new primary, and `walbust check --online` checks each standby's settings.\n",
    );
    out
}

/// The schema holding `walbust.wait()` and its counters.
pub const WAIT_SCHEMA: &str = "walbust";

/// The statements that install `walbust.wait(timeout interval DEFAULT '2s') RETURNS boolean`:
/// after its own COMMIT, an application calls it to wait until walbust has applied the
/// first deletes of every change up to that commit (the write position walbust reports
/// for `slot` in `pg_stat_replication`). It returns false when `timeout` passes first.
///
/// The target is the caller's WAL insert position, which covers its last commit even under
/// `synchronous_commit = off`; a position just past a page header is taken back to the
/// page's start, where the server's own positions end. `SECURITY DEFINER`, owned by the
/// role running setup, so that application roles can read the walsender's positions. Calls
/// are counted in two sequences (skipped in a read-only transaction), which walbust reads
/// into `walbust_wait_calls_total`. Idempotent.
pub fn wait_function(slot: &str) -> String {
    format!(
        "CREATE SCHEMA IF NOT EXISTS {schema};\n\
         CREATE SEQUENCE IF NOT EXISTS {schema}.wait_answered;\n\
         CREATE SEQUENCE IF NOT EXISTS {schema}.wait_timed_out;\n\
         CREATE OR REPLACE FUNCTION {schema}.wait(timeout interval DEFAULT '2s') RETURNS boolean\n\
         LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $wait$\n\
         DECLARE\n  \
           target pg_lsn := pg_current_wal_insert_lsn();\n  \
           page_offset bigint := (target - '0/0'::pg_lsn)::numeric % current_setting('wal_block_size')::numeric;\n  \
           segment_offset bigint := (SELECT file_offset FROM pg_walfile_name_offset(target));\n  \
           deadline timestamptz := clock_timestamp() + timeout;\n  \
           pause float8 := 0.0002;\n  \
           done boolean;\n\
         BEGIN\n  \
           IF segment_offset = 40 THEN target := target - 40;\n  \
           ELSIF page_offset = 24 THEN target := target - 24;\n  \
           END IF;\n  \
           LOOP\n    \
             done := EXISTS (SELECT 1 FROM pg_replication_slots s JOIN pg_stat_replication r ON r.pid = s.active_pid\n                    \
                             WHERE s.slot_name = {slot} AND r.write_lsn >= target);\n    \
             EXIT WHEN done OR clock_timestamp() >= deadline;\n    \
             PERFORM pg_sleep(pause);\n    \
             pause := least(pause * 2, 0.005);\n  \
           END LOOP;\n  \
           BEGIN\n    \
             PERFORM nextval(CASE WHEN done THEN '{schema}.wait_answered' ELSE '{schema}.wait_timed_out' END::regclass);\n  \
           EXCEPTION WHEN read_only_sql_transaction THEN NULL;\n  \
           END;\n  \
           RETURN done;\n\
         END\n$wait$;\n\
         GRANT USAGE ON SCHEMA {schema} TO PUBLIC;\n",
        schema = WAIT_SCHEMA,
        slot = quote_literal(slot),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(schema: &str, table: &str) -> TableName {
        TableName { schema: schema.into(), table: table.into() }
    }

    #[test]
    fn publication_statements_quote_only_what_needs_it() {
        let (a, b) = (t("public", "users"), t("App", "order"));
        assert_eq!(
            create_publication("walbust", &[&a, &b]),
            "CREATE PUBLICATION walbust FOR TABLE public.users, \"App\".\"order\" WITH (publish = 'insert, update, delete, truncate');"
        );
        assert_eq!(
            create_publication("Pub", &[]),
            "CREATE PUBLICATION \"Pub\" FOR ALL TABLES WITH (publish = 'insert, update, delete, truncate');"
        );
        assert_eq!(add_tables("walbust", &[&a]), "ALTER PUBLICATION walbust ADD TABLE public.users;");
        assert_eq!(
            publish_every_op("user"),
            "ALTER PUBLICATION \"user\" SET (publish = 'insert, update, delete, truncate');"
        );
        assert_eq!(replica_identity_full(&b), "ALTER TABLE \"App\".\"order\" REPLICA IDENTITY FULL;");
    }

    #[test]
    fn failover_settings_name_each_server_and_setting() {
        assert_eq!(
            set_and_reload("primary_slot_name", "stand'by"),
            "ALTER SYSTEM SET primary_slot_name = 'stand''by'; SELECT pg_reload_conf();"
        );
        let text = failover_settings("standby1", "app");
        assert!(text.contains("--   SELECT pg_create_physical_replication_slot('standby1');\n"), "{text}");
        assert!(text.contains("--   ALTER SYSTEM SET synchronized_standby_slots = 'standby1';"), "{text}");
        assert!(text.contains("--   ALTER SYSTEM SET sync_replication_slots = 'on';"), "{text}");
        assert!(text.contains("--   ALTER SYSTEM SET hot_standby_feedback = 'on';"), "{text}");
        assert!(text.contains("dbname=app in its primary_conninfo"), "{text}");
        assert!(text.lines().all(|l| l.starts_with("--")), "comments only: each line is for another server\n{text}");
    }

    #[test]
    fn roles_are_always_quoted() {
        assert_eq!(
            create_role("walbust", "app"),
            "CREATE ROLE \"walbust\" LOGIN REPLICATION NOSUPERUSER NOCREATEDB NOCREATEROLE;\n\
             GRANT CONNECT ON DATABASE \"app\" TO \"walbust\";\n"
        );
        assert_eq!(role_login_replication("walbust"), "ALTER ROLE \"walbust\" LOGIN REPLICATION;");
        assert_eq!(emitters("walbust", &["app".into(), "walbust".into()]), ["walbust", "app"]);
    }

    #[test]
    fn emit_message_is_revoked_from_public_on_every_overload_and_granted_to_app_roles() {
        let sql = emit_message_grants(&["app".into(), "Jobs \"runner\"".into()], &[]);
        assert!(sql.starts_with("DO $walbust$\n") && sql.ends_with("$walbust$;\n"), "{sql}");
        assert!(sql.contains("proname = 'pg_logical_emit_message'"), "{sql}");
        assert!(sql.contains("REVOKE EXECUTE ON FUNCTION %s FROM PUBLIC"), "{sql}");
        assert!(sql.contains(r#"GRANT EXECUTE ON FUNCTION %s TO %s', f, '"app", "Jobs ""runner"""');"#), "{sql}");
        let none = emit_message_grants(&[], &[]);
        assert!(!none.contains("GRANT"), "{none}");
        let revoking = emit_message_grants(&["walbust".into()], &["reporting".into()]);
        assert!(revoking.contains(r#"REVOKE EXECUTE ON FUNCTION %s FROM %s', f, '"reporting"');"#), "{revoking}");
    }

    #[test]
    fn the_scripts_role_is_created_only_when_missing() {
        assert_eq!(
            create_role_if_missing("walbust", "app"),
            "DO $walbust$\nBEGIN\n  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'walbust') THEN\n    \
             CREATE ROLE \"walbust\" LOGIN REPLICATION NOSUPERUSER NOCREATEDB NOCREATEROLE;\n  END IF;\nEND\n$walbust$;\n\
             GRANT CONNECT ON DATABASE \"app\" TO \"walbust\";\n"
        );
        let odd = create_role_if_missing("o'$walbust$", "app");
        assert!(odd.starts_with("DO $walbust_$\n") && odd.contains("rolname = 'o''$walbust$'"), "{odd}");
    }

    #[test]
    fn the_scripts_publication_is_created_only_when_missing() {
        assert_eq!(
            create_publication_if_missing("walbust", &[&t("public", "users")]),
            "DO $walbust$\nBEGIN\n  IF NOT EXISTS (SELECT FROM pg_publication WHERE pubname = 'walbust') THEN\n    \
             CREATE PUBLICATION walbust FOR TABLE public.users WITH (publish = 'insert, update, delete, truncate');\n  \
             END IF;\nEND\n$walbust$;\n"
        );
        let odd = create_publication_if_missing("p$walbust$'", &[]);
        assert!(odd.starts_with("DO $walbust_$\n") && odd.contains("pubname = 'p$walbust$'''"), "{odd}");
    }

    #[test]
    fn a_role_name_cannot_end_the_dollar_quote_or_the_literal() {
        let sql = emit_message_grants(&["x$walbust$'; DROP TABLE t; --".into()], &[]);
        assert!(sql.starts_with("DO $walbust_$\n") && sql.ends_with("$walbust_$;\n"), "{sql}");
        assert!(sql.contains(r#"'"x$walbust$''; DROP TABLE t; --"'"#), "{sql}");
    }
}
