//! `walbust setup`: the SQL a superuser runs once so walbust can stream, generated from the
//! config and rules, and optionally applied.
//!
//! The script creates a login role with `REPLICATION` and nothing else (pgoutput reads rows
//! through the publication, so the role needs no `SELECT` on the tables), a publication over
//! the tables the rules name with TRUNCATE published, keeps `pg_logical_emit_message` (the
//! manual invalidation channel) to the named application roles, and sets `REPLICA IDENTITY
//! FULL` where rules read old-row columns the table's replica identity leaves out. The
//! last part needs the live catalog: [`read_live`] reads it (and the publication as it is,
//! so an existing one gets the tables it lacks added instead of created again), and
//! [`setup_sql_with`] includes its statements. [`apply`] does all of it in one transaction,
//! skipping what already exists. It also installs `walbust.wait()`, which an application
//! calls after its COMMIT to wait until walbust has applied that commit's invalidations.
//! Every statement comes from [`crate::daemon::fix`], as `check --online`'s and `run`'s
//! advice does.

use crate::daemon::fix;
use crate::domain::config::Config;
use crate::domain::rules::{Op, RuleSet, TableName};
use crate::errors::exit;
use crate::ops::catalog::{CatalogError, Publication, read_publication};
use crate::postgres::quote::{quote_ident, quote_literal};
use crate::postgres::{ConnInfo, SourceError, connect_sql};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use tokio_postgres::GenericClient;

/// Why setup could not be checked or applied.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// The admin connection failed.
    #[error("cannot connect to the database to set it up; check the admin connection and that the server is up")]
    Connect(#[source] SourceError),
    /// A statement or catalog query failed; the transaction was rolled back.
    #[error("{doing} failed; nothing was changed")]
    Query {
        /// What was being done.
        doing: String,
        /// Why.
        #[source]
        source: tokio_postgres::Error,
    },
    /// A catalog value did not have the expected shape.
    #[error("{0}; nothing was changed")]
    Catalog(#[source] CatalogError),
    /// Tables the rules name do not exist.
    #[error(
        "{}",
        missing("table", tables, &format!("named by the rules in database `{database}`"), ["fix the rules' `table`"; 2])
    )]
    MissingTables {
        /// The missing tables.
        tables: Vec<String>,
        /// The database connected to.
        database: String,
    },
    /// Application roles to grant to do not exist.
    #[error("{}", missing("application role", roles, "", ["leave it out", "leave them out"]))]
    MissingRoles {
        /// The missing roles.
        roles: Vec<String>,
    },
    /// The admin connection reached another database than the one walbust streams from.
    #[error(
        "connected to database `{connected}`, but the config streams from `{configured}`; connect to `{configured}`"
    )]
    WrongDatabase {
        /// Where the admin connection landed.
        connected: String,
        /// `[source] url`'s database.
        configured: String,
    },
}

impl From<CatalogError> for ApplyError {
    fn from(e: CatalogError) -> Self {
        match e {
            CatalogError::Query { doing, source } => ApplyError::Query { doing: doing.to_string(), source },
            other => ApplyError::Catalog(other),
        }
    }
}

impl ApplyError {
    /// The exit code for `walbust setup`: [`exit::USAGE`] when the server cannot be
    /// reached, else [`exit::FAILED`].
    pub fn exit_code(&self) -> u8 {
        match self {
            ApplyError::Connect(_) => exit::USAGE,
            _ => exit::FAILED,
        }
    }
}

fn plural(n: usize) -> &'static str {
    if n == 1 { "" } else { "s" }
}

/// "table `a` ... does not exist; create it or ...", in the singular or the plural.
fn missing(kind: &str, items: &[String], place: &str, or: [&str; 2]) -> String {
    let names = items.iter().map(|t| format!("`{t}`")).collect::<Vec<_>>().join(", ");
    let place = if place.is_empty() { String::new() } else { format!(" {place}") };
    match items.len() {
        1 => format!("{kind} {names}{place} does not exist; create it or {}", or[0]),
        _ => format!("{kind}s {names}{place} do not exist; create them or {}", or[1]),
    }
}

/// A table whose replica identity leaves out columns rules read from the old row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaIdentityAdvice {
    /// The table.
    pub table: TableName,
    /// Its replica identity now, e.g. `DEFAULT (primary key users_pkey: id)`.
    pub identity: String,
    /// The columns rules read from old rows that the identity does not send.
    pub columns: Vec<String>,
    /// The rules reading them.
    pub rules: Vec<String>,
}

impl ReplicaIdentityAdvice {
    /// The `ALTER TABLE ... REPLICA IDENTITY FULL` statement, preceded by a comment saying why.
    pub fn sql(&self) -> String {
        format!(
            "-- {}: rule{} {} read{} {} from old rows, which REPLICA IDENTITY {} leaves out of UPDATE and\n\
             -- DELETE; without FULL walbust widens those keys to pattern deletes.\n\
             {}\n",
            comment_safe(&self.table.to_string()),
            plural(self.rules.len()),
            self.rules.iter().map(|r| format!("\"{}\"", comment_safe(r))).collect::<Vec<_>>().join(", "),
            if self.rules.len() == 1 { "s" } else { "" },
            comment_safe(&self.columns.join(", ")),
            comment_safe(&self.identity),
            fix::replica_identity_full(&self.table),
        )
    }
}

/// Text safe inside a `--` comment: control characters (a newline would end it) become spaces.
fn comment_safe(s: &str) -> String {
    s.chars().map(|c| if c.is_control() { ' ' } else { c }).collect()
}

// Direct grants of EXECUTE on every overload; grantee 0 is PUBLIC. Superusers can always
// execute it, so grants to them (the owner's default) say nothing.
const EMIT_GRANTEES_QUERY: &str = "\
SELECT DISTINCT CASE WHEN a.grantee = 0 THEN NULL ELSE r.rolname::text END
FROM pg_proc p
CROSS JOIN LATERAL aclexplode(coalesce(p.proacl, acldefault('f', p.proowner))) a
LEFT JOIN pg_roles r ON r.oid = a.grantee
WHERE p.proname = 'pg_logical_emit_message' AND p.pronamespace = 'pg_catalog'::regnamespace
  AND a.privilege_type = 'EXECUTE' AND (a.grantee = 0 OR NOT r.rolsuper)";

/// Who may send manual invalidations beyond walbust's role and the application roles: the
/// direct grants of `pg_logical_emit_message` found in the catalog.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExtraEmitters {
    /// PUBLIC may execute it: every role that can connect.
    pub public: bool,
    /// Other roles granted it directly, sorted.
    pub roles: Vec<String>,
}

impl ExtraEmitters {
    /// True when nobody beyond the allowed roles (and superusers) may execute it.
    pub fn is_empty(&self) -> bool {
        !self.public && self.roles.is_empty()
    }

    /// What is wrong, for `walbust check --online`.
    pub fn message(&self) -> String {
        let mut who = Vec::new();
        if self.public {
            who.push("PUBLIC (every role that can connect)".to_string());
        }
        who.extend(self.roles.iter().map(|r| format!("role `{r}`")));
        format!(
            "{} can execute pg_logical_emit_message, so {} can make walbust invalidate any cache key with a \
             manual message; only walbust's role and the --app-role roles should",
            who.join(", "),
            if who.len() == 1 { "it" } else { "they" }
        )
    }

    /// The statement that leaves it to walbust's `role` and `app_roles` only.
    pub fn fix_sql(&self, role: &str, app_roles: &[String]) -> String {
        fix::emit_message_grants(&fix::emitters(role, app_roles), &self.roles)
    }
}

/// Reads who may execute `pg_logical_emit_message` besides superusers, walbust's `role`
/// and `app_roles`.
pub async fn extra_emitters(
    client: &impl GenericClient,
    role: &str,
    app_roles: &[String],
) -> Result<ExtraEmitters, tokio_postgres::Error> {
    let allowed = fix::emitters(role, app_roles);
    let mut extra = ExtraEmitters::default();
    for row in client.query(EMIT_GRANTEES_QUERY, &[]).await? {
        match row.get::<_, Option<String>>(0) {
            None => extra.public = true,
            Some(r) if !allowed.contains(&r) => extra.roles.push(r),
            Some(_) => {}
        }
    }
    extra.roles.sort();
    extra.roles.dedup();
    Ok(extra)
}

/// What setup reads from the live catalog (see [`read_live`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Live {
    /// The tables whose replica identity leaves out old-row columns the rules read.
    pub replica_identity: Vec<ReplicaIdentityAdvice>,
    /// The config's publication as it is; `None` when it does not exist.
    pub publication: Option<Publication>,
}

/// Reads what the script and [`apply`] need from the catalog: the replica identity advice
/// (failing when a table the rules name does not exist) and `publication` as it is.
pub async fn read_live<C: GenericClient + Sync>(
    client: &C,
    publication: &str,
    rules: &RuleSet,
) -> Result<Live, ApplyError> {
    let replica_identity = replica_identity_advice(client, rules).await?;
    let publication = read_publication(client, publication).await?;
    Ok(Live { replica_identity, publication })
}

/// What the publication needs for `tables`: created when it does not exist; otherwise the
/// tables it lacks added, and whether it publishes every op walbust routes.
struct PublicationNeeds<'a> {
    exists: bool,
    lacking: Vec<&'a TableName>,
    every_op: bool,
}

impl<'a> PublicationNeeds<'a> {
    fn of(found: Option<&Publication>, tables: &[&'a TableName]) -> Self {
        match found {
            None => PublicationNeeds { exists: false, lacking: tables.to_vec(), every_op: true },
            Some(p) => PublicationNeeds {
                exists: true,
                lacking: tables.iter().copied().filter(|t| !p.includes(t)).collect(),
                every_op: Op::ALL.into_iter().all(|op| p.publishes.contains(op)),
            },
        }
    }
}

/// The warning for a publication that does not publish every op, with its fix.
fn publish_warning(publication: &str) -> String {
    format!(
        "publication {} does not publish every op walbust routes; run {}",
        quote_ident(publication),
        fix::publish_every_op(publication)
    )
}

/// The setup script for `config` and `rules`, without replica identity statements (those
/// need the live catalog: see [`setup_sql_with`] and [`read_live`]).
pub fn setup_sql(config: &Config, rules: &RuleSet, app_roles: &[String]) -> String {
    setup_sql_with(config, rules, app_roles, Err("no database connection was made"))
}

/// The setup script, with what the catalog says when it was read: the replica identity
/// statements (none says every table's identity was checked and is enough), and for an
/// existing publication the tables it lacks instead of `CREATE PUBLICATION`. When it was
/// not read (`Err`), the script says why, so the reader knows what to check by hand.
pub fn setup_sql_with(config: &Config, rules: &RuleSet, app_roles: &[String], live: Result<&Live, &str>) -> String {
    let source = &config.source;
    let role = &source.conninfo.user;
    let database = &source.conninfo.dbname;
    let mut out = String::new();
    let _ = write!(
        out,
        "-- walbust setup for database {db}, generated from {config}.\n\
         -- Run as a superuser connected to {db}, e.g. psql -d {db} -f setup.sql\n\
         -- postgresql.conf needs wal_level = logical, and max_replication_slots and\n\
         -- max_wal_senders of at least 1 each for walbust (changing wal_level needs a restart).\n\n\
         BEGIN;\n\n",
        db = comment_safe(database),
        config = comment_safe(&config.path.display().to_string()),
    );
    let _ = write!(
        out,
        "-- The role walbust logs in as: LOGIN and REPLICATION, no superuser; created unless a role\n\
         -- of that name exists, which is left as it is. pgoutput sends rows through the\n\
         -- publication, so it needs no SELECT on the tables. Give it a password with\n\
         -- \\password {} (or another method in pg_hba.conf); keep it out of config.toml.\n{}\n",
        comment_safe(&quote_ident(role)),
        fix::create_role_if_missing(role, database),
    );
    let publication = &source.publication;
    let tables = rules.tables();
    let needs = PublicationNeeds::of(live.ok().and_then(|l| l.publication.as_ref()), &tables);
    if !needs.exists {
        let _ = write!(
            out,
            "-- The publication: the tables the rules name, with TRUNCATE published; created unless a\n\
             -- publication of that name exists, which is left as it is.\n{}\n",
            fix::create_publication_if_missing(publication, &tables),
        );
    } else if needs.lacking.is_empty() {
        out.push_str("-- The publication exists and publishes every table the rules name.\n");
    } else {
        let _ = write!(
            out,
            "-- The publication exists: the tables the rules name that it lacks.\n{}\n",
            fix::add_tables(publication, &needs.lacking),
        );
    }
    if needs.exists {
        if !needs.every_op {
            let _ = writeln!(out, "-- Warning: {}", comment_safe(&publish_warning(publication)));
        }
        out.push('\n');
    }
    let granted = if app_roles.is_empty() {
        "none named (superusers always can)".to_string()
    } else {
        app_roles.iter().map(|r| comment_safe(&quote_ident(r))).collect::<Vec<_>>().join(", ")
    };
    let _ = write!(
        out,
        "-- Manual invalidations ride pg_logical_emit_message(true, {prefix}, ...), so only the\n\
         -- application roles that send them keep it: {granted}. walbust's role keeps it\n\
         -- for its heartbeats. Revokes EXECUTE from PUBLIC on every overload ((boolean, text, text)\n\
         -- and (boolean, text, bytea), each with a flush argument on Postgres 17 and later).\n{sql}\n",
        prefix = comment_safe(&quote_literal(&source.message_prefix)),
        sql = fix::emit_message_grants(&fix::emitters(role, app_roles), &[]),
    );
    let _ = write!(
        out,
        "-- Read-your-writes: after its own COMMIT, an application calls SELECT walbust.wait();\n\
         -- it returns true once walbust has applied the invalidations up to that commit in Redis,\n\
         -- false after the timeout (2s unless given).\n{}\n",
        fix::wait_function(&source.slot),
    );
    match live.map(|l| l.replica_identity.as_slice()) {
        Err(why) => {
            let _ = write!(
                out,
                "-- Replica identity: not checked: {}.\n\
                 -- Where rules read old-row columns outside the primary key, run\n\
                 -- ALTER TABLE ... REPLICA IDENTITY FULL; walbust setup checks the catalog when it can\n\
                 -- connect (as --admin-url, or else as [source] url).\n\n",
                comment_safe(why)
            );
        }
        Ok([]) => {
            out.push_str("-- Replica identity: every table already sends the old-row columns the rules read.\n\n")
        }
        Ok(advice) => {
            out.push_str("-- Replica identity: old-row columns the rules read.\n");
            for a in advice {
                out.push_str(&a.sql());
            }
            out.push('\n');
        }
    }
    out.push_str("COMMIT;\n");
    if source.failover {
        out.push('\n');
        out.push_str(&fix::failover_settings("walbust_standby", database));
    }
    out
}

const IDENTITY_QUERY: &str = "\
SELECT c.relreplident::text,
       ARRAY(SELECT a.attname::text FROM pg_attribute a
             WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum),
       (SELECT i.indexrelid::regclass::text FROM pg_index i
        WHERE i.indrelid = c.oid
          AND CASE c.relreplident WHEN 'd' THEN i.indisprimary WHEN 'i' THEN i.indisreplident ELSE false END
        LIMIT 1),
       ARRAY(SELECT a.attname::text FROM pg_index i
             JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey)
             WHERE i.indrelid = c.oid
               AND CASE c.relreplident WHEN 'd' THEN i.indisprimary WHEN 'i' THEN i.indisreplident ELSE false END
             ORDER BY a.attnum)
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind IN ('r', 'p')";

/// Reads each table's replica identity and returns, for the tables whose identity leaves
/// out old-row columns the rules read, the advice to make it `FULL`. Columns a table lacks
/// are left to `walbust check`; missing tables are an error.
pub async fn replica_identity_advice<C: GenericClient + Sync>(
    client: &C,
    rules: &RuleSet,
) -> Result<Vec<ReplicaIdentityAdvice>, ApplyError> {
    let query = |doing: String| move |source| ApplyError::Query { doing, source };
    let mut advice = Vec::new();
    let mut missing = Vec::new();
    for table in rules.tables() {
        let row = client
            .query_opt(IDENTITY_QUERY, &[&table.schema, &table.table])
            .await
            .map_err(query(format!("reading the replica identity of {table}")))?;
        let Some(row) = row else {
            missing.push(table.to_string());
            continue;
        };
        let kind: String = row.get(0);
        let all: Vec<String> = row.get(1);
        let index: Option<String> = row.get(2);
        let index_columns: Vec<String> = row.get(3);
        let (identity, sent): (String, BTreeSet<&str>) = match (kind.as_str(), &index) {
            ("f", _) => continue,
            ("d", Some(ix)) => {
                (format!("DEFAULT (primary key {ix}: {})", index_columns.join(", ")), index_cols(&index_columns))
            }
            ("d", None) => ("DEFAULT (no primary key)".into(), BTreeSet::new()),
            ("i", Some(ix)) => (format!("USING INDEX {ix} ({})", index_columns.join(", ")), index_cols(&index_columns)),
            ("i", None) => ("USING INDEX (index missing)".into(), BTreeSet::new()),
            _ => ("NOTHING".into(), BTreeSet::new()),
        };
        let mut needed: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
        for rule in rules.for_table(table) {
            for column in crate::ops::catalog::old_row_columns(rule) {
                if all.iter().any(|c| c == column) && !sent.contains(column) {
                    needed.entry(column).or_default().insert(&*rule.name);
                }
            }
        }
        if needed.is_empty() {
            continue;
        }
        let rule_names: BTreeSet<&str> = needed.values().flatten().copied().collect();
        advice.push(ReplicaIdentityAdvice {
            table: table.clone(),
            identity,
            columns: needed.keys().map(|c| c.to_string()).collect(),
            rules: rule_names.into_iter().map(str::to_string).collect(),
        });
    }
    if !missing.is_empty() {
        let database = client
            .query_one("SELECT current_database()::text", &[])
            .await
            .map_err(query("reading the database name".into()))?
            .get(0);
        return Err(ApplyError::MissingTables { tables: missing, database });
    }
    Ok(advice)
}

fn index_cols(columns: &[String]) -> BTreeSet<&str> {
    columns.iter().map(String::as_str).collect()
}

/// What [`apply`] did, one line per step, for the operator.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Applied {
    /// Statements run.
    pub done: Vec<String>,
    /// Steps skipped because their object already exists.
    pub skipped: Vec<String>,
    /// Things that exist but look wrong, with what to do.
    pub warnings: Vec<String>,
    /// Server settings only a person can change (they need a restart), each with its fix:
    /// the database is set up, but walbust cannot stream until they are met.
    pub server_unready: Vec<String>,
}

/// Connects as `admin` (a superuser, or a role allowed to create roles and publications)
/// and sets the database up for `config` and `rules` in one transaction: the role and the
/// publication unless they exist (adding tables an existing publication lacks), the
/// `pg_logical_emit_message` grants, and `REPLICA IDENTITY FULL` where needed. Nothing
/// is changed when any step fails.
pub async fn apply(
    admin: &ConnInfo,
    config: &Config,
    rules: &RuleSet,
    app_roles: &[String],
) -> Result<Applied, ApplyError> {
    let mut client = connect_sql(admin).await.map_err(ApplyError::Connect)?;
    let query = |doing: &str| {
        let doing = doing.to_string();
        move |source| ApplyError::Query { doing, source }
    };
    // The same requirements `check --online` and `run` hold the server to: those only a
    // person can meet stop setup with their fix, the passing ones (slots or walsenders in
    // use right now) are warnings.
    let (mut server_unready, mut server_warnings) = (Vec::new(), Vec::new());
    match crate::ops::catalog::read_server(&client, &config.source.slot).await {
        Ok(settings) => {
            for unmet in crate::daemon::slot::requirements(&settings, &config.source.slot) {
                let list = if unmet.lasting { &mut server_unready } else { &mut server_warnings };
                list.push(unmet.to_string());
            }
        }
        Err(e) => server_warnings.push(format!("cannot read the server's replication settings: {e}")),
    }
    let tx = client.transaction().await.map_err(query("starting a transaction"))?;
    let source = &config.source;
    let mut applied = Applied { server_unready, warnings: server_warnings, ..Applied::default() };

    let database: String =
        tx.query_one("SELECT current_database()::text", &[]).await.map_err(query("reading the database name"))?.get(0);
    if database != source.conninfo.dbname {
        return Err(ApplyError::WrongDatabase { connected: database, configured: source.conninfo.dbname.clone() });
    }
    let mut missing_roles = Vec::new();
    for role in app_roles {
        let found = tx
            .query_opt("SELECT 1 FROM pg_roles WHERE rolname = $1", &[role])
            .await
            .map_err(query("looking up application roles"))?;
        if found.is_none() {
            missing_roles.push(role.clone());
        }
    }
    if !missing_roles.is_empty() {
        return Err(ApplyError::MissingRoles { roles: missing_roles });
    }
    // Checks every table first, so a missing one is named before anything runs.
    let publication = &source.publication;
    let live = read_live(&tx, publication, rules).await?;

    let role = &source.conninfo.user;
    let existing = tx
        .query_opt("SELECT rolcanlogin, rolreplication, rolsuper FROM pg_roles WHERE rolname = $1", &[role])
        .await
        .map_err(query("looking up the walbust role"))?;
    match existing {
        None => {
            let sql = fix::create_role(role, &database);
            tx.batch_execute(&sql).await.map_err(query(&format!("creating role {role}")))?;
            applied.done.push(format!("created role {} with LOGIN REPLICATION", quote_ident(role)));
        }
        Some(r) => {
            let (login, replication, superuser): (bool, bool, bool) = (r.get(0), r.get(1), r.get(2));
            applied.skipped.push(format!("role {} exists", quote_ident(role)));
            if superuser {
                applied.warnings.push(format!(
                    "role {0} is a superuser; walbust needs only LOGIN REPLICATION: \
                     set `[source] url` to a role created by walbust setup",
                    quote_ident(role)
                ));
            } else if !(login && replication) {
                applied.warnings.push(format!(
                    "role {} lacks LOGIN or REPLICATION; run {}",
                    quote_ident(role),
                    fix::role_login_replication(role)
                ));
            }
        }
    }

    let tables = rules.tables();
    let needs = PublicationNeeds::of(live.publication.as_ref(), &tables);
    if !needs.exists {
        tx.batch_execute(&fix::create_publication(publication, &tables))
            .await
            .map_err(query(&format!("creating publication {publication}")))?;
        applied.done.push(format!(
            "created publication {} over {}",
            quote_ident(publication),
            crate::domain::diagnostic::plural(tables.len() as u64, "table", "tables")
        ));
    } else {
        applied.skipped.push(format!("publication {} exists", quote_ident(publication)));
        if !needs.every_op {
            applied.warnings.push(publish_warning(publication));
        }
        if !needs.lacking.is_empty() {
            tx.batch_execute(&fix::add_tables(publication, &needs.lacking))
                .await
                .map_err(query(&format!("adding tables to publication {publication}")))?;
            let names: Vec<String> = needs.lacking.iter().map(|t| fix::sql_table(t)).collect();
            applied.done.push(format!("added {} to publication {}", names.join(", "), quote_ident(publication)));
        }
    }

    let emitters = fix::emitters(role, app_roles);
    tx.batch_execute(&fix::emit_message_grants(&emitters, &[]))
        .await
        .map_err(query("restricting pg_logical_emit_message"))?;
    let names: Vec<String> = emitters.iter().map(|r| quote_ident(r)).collect();
    applied.done.push(format!("revoked pg_logical_emit_message from PUBLIC, granted it to {}", names.join(", ")));

    tx.batch_execute(&fix::wait_function(&source.slot)).await.map_err(query("installing walbust.wait()"))?;
    applied.done.push(format!("installed walbust.wait() for slot {}", quote_ident(&source.slot)));

    for a in &live.replica_identity {
        tx.batch_execute(&a.sql()).await.map_err(query(&format!("setting the replica identity of {}", a.table)))?;
        applied.done.push(format!("set REPLICA IDENTITY FULL on {} (rules read {})", a.table, a.columns.join(", ")));
    }
    tx.commit().await.map_err(query("committing the setup"))?;
    Ok(applied)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::rules::OpSet;
    use crate::ops::catalog::{Catalog, Identity, RelKind, Relation, check_catalog, startup_diagnostics};
    use std::path::{Path, PathBuf};

    fn config(user: &str, publication: &str) -> Config {
        let text = format!(
            "rules = [\"rules/*.toml\"]\n[source]\nurl = \"postgres://{user}@db:5432/app\"\n\
             publication = \"{publication}\"\n[redis]\nurl = \"redis://127.0.0.1:6379/0\"\n"
        );
        Config::parse(Path::new("/etc/walbust/config.toml"), &text, &|_| None).expect("test config parses")
    }

    fn rules(text: &str) -> RuleSet {
        RuleSet::from_sources(&[(PathBuf::from("rules/test.toml"), text.to_string())]).expect("test rules parse").rules
    }

    const RULES: &str = r#"
[[rule]]
name = "user settings"
table = "public.user_settings"
keys = ["user:{user_id}:settings"]

[[rule]]
name = "odd"
table = "we\"ird.Ta ble"
keys = ["odd:{id}"]
"#;

    #[test]
    fn with_failover_the_script_ends_with_the_settings_of_primary_and_standbys() {
        let mut config = config("walbust", "walbust");
        let without = setup_sql(&config, &rules(RULES), &[]);
        assert!(!without.contains("Failover"), "{without}");
        config.source.failover = true;
        let sql = setup_sql(&config, &rules(RULES), &[]);
        let tail = sql.split_once("COMMIT;\n").expect("the transaction").1;
        assert!(tail.starts_with("\n-- Failover (failover = true, PostgreSQL 17 and later)"), "{sql}");
        assert!(
            tail.contains("--   ALTER SYSTEM SET sync_replication_slots = 'on'; SELECT pg_reload_conf();\n"),
            "{sql}"
        );
        assert!(tail.contains("--   and dbname=app in its primary_conninfo\n"), "{sql}");
        assert!(
            tail.lines().all(|l| l.is_empty() || l.starts_with("--")),
            "outside the transaction, comments only: {sql}"
        );
    }

    #[test]
    fn the_script_creates_a_least_privilege_role_and_the_publication() {
        let sql = setup_sql(&config("walbust", "walbust"), &rules(RULES), &["app".into()]);
        assert!(
            sql.contains("    CREATE ROLE \"walbust\" LOGIN REPLICATION NOSUPERUSER NOCREATEDB NOCREATEROLE;\n"),
            "{sql}"
        );
        assert!(sql.contains("GRANT CONNECT ON DATABASE \"app\" TO \"walbust\";\n"), "{sql}");
        assert!(
            sql.contains(
                "CREATE PUBLICATION walbust FOR TABLE public.user_settings, \"we\"\"ird\".\"Ta ble\" \
                 WITH (publish = 'insert, update, delete, truncate');\n"
            ),
            "{sql}"
        );
        assert!(!sql.contains("SUPERUSER;"), "{sql}");
        assert!(!sql.contains("GRANT SELECT"), "pgoutput needs no SELECT: {sql}");
        assert!(sql.starts_with("-- walbust setup for database app"));
        assert!(sql.contains("\nBEGIN;\n") && sql.ends_with("COMMIT;\n"), "{sql}");
        assert!(sql.contains("Replica identity: not checked: no database connection was made.\n"), "{sql}");
        assert!(
            sql.contains(r#"GRANT EXECUTE ON FUNCTION %s TO %s', f, '"walbust", "app"');"#),
            "walbust keeps it for heartbeats: {sql}"
        );
        let twice = setup_sql(&config("walbust", "walbust"), &rules(RULES), &["walbust".into()]);
        assert!(twice.contains(r#"TO %s', f, '"walbust"');"#), "{twice}");
    }

    #[test]
    fn extra_emitters_name_public_and_roles_and_the_fix_revokes_from_them() {
        let extra = ExtraEmitters { public: true, roles: vec!["reporting".into()] };
        assert_eq!(
            extra.message(),
            "PUBLIC (every role that can connect), role `reporting` can execute pg_logical_emit_message, so they \
             can make walbust invalidate any cache key with a manual message; only walbust's role and the \
             --app-role roles should"
        );
        let sql = extra.fix_sql("walbust", &["app".into()]);
        assert!(sql.contains("REVOKE EXECUTE ON FUNCTION %s FROM PUBLIC"), "{sql}");
        assert!(sql.contains(r#"REVOKE EXECUTE ON FUNCTION %s FROM %s', f, '"reporting"');"#), "{sql}");
        assert!(sql.contains(r#"GRANT EXECUTE ON FUNCTION %s TO %s', f, '"walbust", "app"');"#), "{sql}");
        assert!(ExtraEmitters::default().is_empty());
    }

    #[test]
    fn names_with_newlines_cannot_escape_comments() {
        let a = ReplicaIdentityAdvice {
            table: TableName { schema: "public".into(), table: "t\nDROP TABLE x;".into() },
            identity: "DEFAULT (primary key t_pkey: id)".into(),
            columns: vec!["org_id".into()],
            rules: vec!["r\n; DROP TABLE y;".into()],
        };
        let sql = a.sql();
        let (comment, statement) = sql.split_once("ALTER TABLE ").expect("one statement");
        for line in comment.lines() {
            assert!(line.starts_with("-- "), "{line:?} in\n{sql}");
        }
        assert_eq!(statement.matches(';').count(), 2, "only the quoted name's and the statement's: {sql}");
        assert!(sql.ends_with("ALTER TABLE public.\"t\nDROP TABLE x;\" REPLICA IDENTITY FULL;\n"), "{sql}");
    }

    #[test]
    fn replica_identity_statements_are_included_when_given() {
        let advice = vec![ReplicaIdentityAdvice {
            table: TableName { schema: "public".into(), table: "user_settings".into() },
            identity: "DEFAULT (primary key user_settings_pkey: id)".into(),
            columns: vec!["user_id".into()],
            rules: vec!["user settings".into()],
        }];
        let cfg = config("walbust", "walbust");
        let live = Live { replica_identity: advice, publication: None };
        let sql = setup_sql_with(&cfg, &rules(RULES), &[], Ok(&live));
        assert!(
            sql.contains(
                "-- public.user_settings: rule \"user settings\" reads user_id from old rows, which REPLICA IDENTITY \
                 DEFAULT (primary key user_settings_pkey: id) leaves out of UPDATE and\n"
            ),
            "{sql}"
        );
        assert!(sql.contains("ALTER TABLE public.user_settings REPLICA IDENTITY FULL;\n"), "{sql}");
        let sql = setup_sql_with(&cfg, &rules(RULES), &[], Ok(&Live::default()));
        assert!(sql.contains("every table already sends"), "{sql}");
        assert!(!sql.contains("ALTER TABLE"), "{sql}");
    }

    /// The catalog of `check --online` and `run`'s start-up gate: `public.plans` and
    /// `public.users` (with `identity`), and the publication `walbust` as given.
    fn catalog(identity: Identity, publication: Option<Publication>) -> Catalog {
        let relation = |columns: &[&str], identity| Relation {
            kind: RelKind::Table,
            columns: columns.iter().map(|c| c.to_string()).collect(),
            identity,
        };
        let pk = || Identity::Default { index: Some("pkey".into()), columns: vec!["id".into()] };
        let relations = BTreeMap::from([
            (table("plans"), relation(&["id"], pk())),
            (table("users"), relation(&["id", "org_id"], identity)),
        ]);
        Catalog {
            database: "app".into(),
            relations,
            names: vec![table("plans"), table("users")],
            publications: publication.iter().map(|_| "walbust".to_string()).collect(),
            publication,
        }
    }

    fn table(name: &str) -> TableName {
        TableName { schema: "public".into(), table: name.into() }
    }

    #[test]
    fn run_check_online_and_setup_show_one_statement_for_one_publication_or_identity_problem() {
        let text = "[[rule]]\nname = \"users\"\ntable = \"users\"\nkeys = [\"org:{org_id}\"]\n\n\
                    [[rule]]\nname = \"plans\"\ntable = \"plans\"\nkeys = [\"plan:{id}\"]\n";
        let (config, rules) = (config("walbust", "walbust"), rules(text));
        let run = |c: &Catalog| -> Vec<String> {
            startup_diagnostics(c, &config, &rules).diagnostics.0.iter().map(ToString::to_string).collect()
        };
        let online = |c: &Catalog| -> Vec<String> {
            check_catalog(c, &config, &rules).0.iter().map(ToString::to_string).collect()
        };
        let script = |publication: Option<Publication>, replica_identity| {
            setup_sql_with(&config, &rules, &[], Ok(&Live { replica_identity, publication }))
        };
        let hinted = |found: &[String], statement: &str| found.iter().any(|d| d.contains(&format!("run {statement}")));

        // A rule's table left out of the publication.
        let p = Publication {
            all_tables: false,
            publishes: OpSet::ALL,
            via_root: false,
            tables: BTreeMap::from([(table("users"), None)]),
        };
        let add = fix::add_tables("walbust", &[&table("plans")]);
        let found = catalog(Identity::Full, Some(p.clone()));
        assert!(hinted(&run(&found), &add), "run: {:#?}", run(&found));
        assert!(hinted(&online(&found), &add), "check --online: {:#?}", online(&found));
        let setup = script(Some(p), Vec::new());
        assert!(setup.contains(&format!("\n{add}\n")), "setup: {setup}");
        assert!(!setup.contains("CREATE PUBLICATION"), "the publication exists: {setup}");

        // No publication at all.
        let create = fix::create_publication("walbust", &[&table("plans"), &table("users")]);
        let created = |found: &[String]| found.iter().any(|d| d.ends_with(&format!("create it with: {create}")));
        let missing = catalog(Identity::Full, None);
        assert!(created(&run(&missing)), "run: {:#?}", run(&missing));
        assert!(created(&online(&missing)), "check --online: {:#?}", online(&missing));
        assert!(script(None, Vec::new()).contains(&format!("\n    {create}\n")), "setup");

        // A replica identity that leaves out an old-row column a rule reads.
        let full = fix::replica_identity_full(&table("users"));
        let every_table =
            Publication { all_tables: true, publishes: OpSet::ALL, via_root: false, tables: BTreeMap::new() };
        let pk = Identity::Default { index: Some("users_pkey".into()), columns: vec!["id".into()] };
        let narrow = catalog(pk, Some(every_table));
        assert!(hinted(&online(&narrow), &full), "check --online: {:#?}", online(&narrow));
        let advice = ReplicaIdentityAdvice {
            table: table("users"),
            identity: "DEFAULT (primary key users_pkey: id)".into(),
            columns: vec!["org_id".into()],
            rules: vec!["users".into()],
        };
        let setup = script(None, vec![advice]);
        assert!(setup.contains(&format!("\n{full}\n")), "setup: {setup}");
    }

    #[test]
    fn old_row_columns_skip_insert_only_rules_and_new_placeholders() {
        let set = rules(
            r#"
[[rule]]
name = "inserts"
table = "public.t"
on = ["insert"]
keys = ["a:{a}"]

[[rule]]
name = "updates"
table = "public.t"
on = ["update"]
keys = ["b:{b}:{new.c}:{old.d}"]
"#,
        );
        let cols: Vec<&str> = set.rules().iter().flat_map(|r| crate::ops::catalog::old_row_columns(r)).collect();
        assert_eq!(cols, ["b", "d"]);
    }

    #[test]
    fn a_write_through_only_table_needs_the_old_row_for_its_key_alone_as_check_online_says() {
        let set = rules(
            r#"
[[rule]]
name = "profiles"
table = "public.t"
refresh = [{ key = "profile:{id}", columns = ["id", "bio", "avatar"] }]
"#,
        );
        let cols: Vec<&str> = set.rules().iter().flat_map(|r| crate::ops::catalog::old_row_columns(r)).collect();
        assert_eq!(cols, ["id"], "the row written through comes from the new image");
    }

    #[test]
    fn errors_name_the_values_and_say_what_to_do() {
        let e = ApplyError::MissingTables { tables: vec!["public.a".into()], database: "app".into() };
        assert_eq!(
            e.to_string(),
            "table `public.a` named by the rules in database `app` does not exist; create it or fix the rules' `table`"
        );
        let e =
            ApplyError::MissingTables { tables: vec!["public.a".into(), "public.b".into()], database: "app".into() };
        assert_eq!(
            e.to_string(),
            "tables `public.a`, `public.b` named by the rules in database `app` do not exist; \
             create them or fix the rules' `table`"
        );
        let e = ApplyError::MissingRoles { roles: vec!["app".into()] };
        assert_eq!(e.to_string(), "application role `app` does not exist; create it or leave it out");
        let e = ApplyError::MissingRoles { roles: vec!["a".into(), "b".into()] };
        assert_eq!(e.to_string(), "application roles `a`, `b` do not exist; create them or leave them out");
    }
}
