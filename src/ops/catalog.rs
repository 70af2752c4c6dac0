//! The rules checked against the live catalog: tables, columns, the publication and the
//! replica identity, each problem pinned to the rule's `file:line:col`.
//!
//! [`read_catalog`] reads what the rules depend on in one pass (three queries): the
//! relations of the schemas they name with their columns, replica identity and identity
//! index; the publication's flags; and the tables it publishes, with their column lists
//! (Postgres 15 and later). The checks themselves are pure functions of that snapshot
//! ([`check_catalog`], [`column_diagnostics`]), so they are unit-tested without a server.
//!
//! - [`check_online`] is `walbust check --online`: every table exists and is a table,
//!   it is published, every column a rule names exists (and is in the publication's column
//!   list), the publication publishes every op a rule fires on, and the replica identity
//!   sends the old-row columns that UPDATE and DELETE rules read (otherwise those keys are
//!   widened to pattern deletes, and the warning says which and gives the SQL).
//! - [`validate_startup`] is the start-up and reload gate of `walbust run`: unknown columns
//!   are errors, and so are a missing publication and an existing table the publication
//!   leaves out (its changes would never be invalidated); a missing table is only a
//!   warning, since it may be created later. [`validate_columns`] checks the columns alone.
//! - [`read_server`] reads the server settings walbust needs, checked by
//!   [`crate::daemon::slot::requirements`].

use crate::daemon::fix;
use crate::daemon::slot::ServerSettings;
use crate::domain::config::Config;
use crate::domain::diagnostic::{Diagnostic, Diagnostics, Severity, did_you_mean};
use crate::domain::rules::template::{Image, Template};
use crate::domain::rules::{Op, OpSet, Rule, RuleSet, TableName};
use crate::postgres::is_transient_sqlstate;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use tokio_postgres::GenericClient;

/// Why the catalog could not be read.
#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    /// A catalog query failed.
    #[error("{doing} failed; check that the role may read pg_catalog and that the server is up")]
    Query {
        /// What was being read.
        doing: &'static str,
        /// The error.
        #[source]
        source: tokio_postgres::Error,
    },
    /// A catalog value did not have the expected shape.
    #[error("unexpected {what} from the catalog: `{value}`; is this a PostgreSQL server?")]
    Unexpected {
        /// What was being read.
        what: &'static str,
        /// The value received.
        value: String,
    },
}

impl CatalogError {
    /// True when reading again later may succeed: the connection broke, or the server is
    /// shutting down or starting.
    pub fn is_transient(&self) -> bool {
        match self {
            CatalogError::Query { source, .. } => {
                source.is_closed()
                    || source.code().is_some_and(|c| is_transient_sqlstate(c.code()))
                    || std::error::Error::source(source).is_some_and(|s| s.is::<std::io::Error>())
            }
            CatalogError::Unexpected { .. } => false,
        }
    }
}

/// What kind of relation a name refers to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelKind {
    /// An ordinary table.
    Table,
    /// A partitioned table.
    Partitioned,
    /// A view.
    View,
    /// A materialized view.
    MaterializedView,
    /// A foreign table.
    Foreign,
}

impl RelKind {
    fn from_relkind(k: &str) -> Option<RelKind> {
        Some(match k {
            "r" => RelKind::Table,
            "p" => RelKind::Partitioned,
            "v" => RelKind::View,
            "m" => RelKind::MaterializedView,
            "f" => RelKind::Foreign,
            _ => return None,
        })
    }

    /// True for the kinds logical replication streams.
    pub fn is_replicated(self) -> bool {
        matches!(self, RelKind::Table | RelKind::Partitioned)
    }

    fn noun(self) -> &'static str {
        match self {
            RelKind::Table => "table",
            RelKind::Partitioned => "partitioned table",
            RelKind::View => "view",
            RelKind::MaterializedView => "materialized view",
            RelKind::Foreign => "foreign table",
        }
    }
}

/// A table's replica identity: which old-row columns UPDATE and DELETE carry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Identity {
    /// `REPLICA IDENTITY DEFAULT`: the primary key's columns, when there is one.
    Default {
        /// The primary key index, `None` without a primary key.
        index: Option<String>,
        /// Its columns.
        columns: Vec<String>,
    },
    /// `REPLICA IDENTITY USING INDEX`: that index's columns.
    Index {
        /// The index, `None` when it was dropped.
        index: Option<String>,
        /// Its columns.
        columns: Vec<String>,
    },
    /// `REPLICA IDENTITY FULL`: every column.
    Full,
    /// `REPLICA IDENTITY NOTHING`: no old row at all.
    Nothing,
}

impl Identity {
    fn from_catalog(relreplident: &str, index: Option<String>, columns: Vec<String>) -> Option<Identity> {
        Some(match relreplident {
            "d" => Identity::Default { index, columns },
            "i" => Identity::Index { index, columns },
            "f" => Identity::Full,
            "n" => Identity::Nothing,
            _ => return None,
        })
    }

    /// The old-row columns UPDATE and DELETE carry; `None` means all of them.
    pub fn sent(&self) -> Option<&[String]> {
        match self {
            Identity::Full => None,
            Identity::Default { index: Some(_), columns } | Identity::Index { index: Some(_), columns } => {
                Some(columns)
            }
            _ => Some(&[]),
        }
    }

    /// True when UPDATE and DELETE carry no old row at all; Postgres then rejects both on
    /// a table whose publication publishes them.
    pub fn is_missing(&self) -> bool {
        matches!(self, Identity::Nothing | Identity::Default { index: None, .. } | Identity::Index { index: None, .. })
    }

    /// How a message names it, saying what the old row carries.
    fn describe(&self) -> String {
        match self {
            Identity::Default { index: Some(_), columns } => {
                format!("REPLICA IDENTITY DEFAULT, whose old row carries only the primary key ({})", ticked(columns))
            }
            Identity::Default { index: None, .. } => {
                "REPLICA IDENTITY DEFAULT but no primary key, so updates and deletes carry no old row at all".into()
            }
            Identity::Index { index: Some(ix), columns } => {
                format!("REPLICA IDENTITY USING INDEX {ix}, whose old row carries only {}", ticked(columns))
            }
            Identity::Index { index: None, .. } => {
                "REPLICA IDENTITY USING INDEX with the index gone, so updates and deletes carry no old row at all"
                    .into()
            }
            Identity::Nothing => "REPLICA IDENTITY NOTHING, so updates and deletes carry no old row at all".into(),
            Identity::Full => "REPLICA IDENTITY FULL".into(),
        }
    }
}

/// A relation a rule names, as the catalog describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relation {
    /// Table, view, ...
    pub kind: RelKind,
    /// Its columns, in order.
    pub columns: Vec<String>,
    /// Its replica identity.
    pub identity: Identity,
}

/// A publication's settings and tables.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publication {
    /// `FOR ALL TABLES`.
    pub all_tables: bool,
    /// The ops it publishes (`publish = '...'`).
    pub publishes: OpSet,
    /// `publish_via_partition_root`.
    pub via_root: bool,
    /// The tables it publishes, each with its column list (`None`: every column, or a
    /// server before Postgres 15).
    pub tables: BTreeMap<TableName, Option<Vec<String>>>,
}

impl Publication {
    /// True when changes of `table` reach the publication's subscribers.
    pub fn includes(&self, table: &TableName) -> bool {
        self.all_tables || self.tables.contains_key(table)
    }
}

/// What [`read_catalog`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Catalog {
    /// The database connected to.
    pub database: String,
    /// The relations the rules name that exist.
    pub relations: BTreeMap<TableName, Relation>,
    /// Every user relation of the database, for "did you mean".
    pub names: Vec<TableName>,
    /// The publication; `None` when it does not exist or was not asked for.
    pub publication: Option<Publication>,
    /// The names of every publication of the database, for "did you mean".
    pub publications: Vec<String>,
}

const RELATIONS_QUERY: &str = "\
SELECT n.nspname::text, c.relname::text, c.relkind::text, c.relreplident::text, w.wanted,
       CASE WHEN w.wanted THEN ARRAY(SELECT a.attname::text FROM pg_attribute a
            WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum) END,
       (SELECT i.indexrelid::regclass::text FROM pg_index i
        WHERE w.wanted AND i.indrelid = c.oid
          AND CASE c.relreplident WHEN 'd' THEN i.indisprimary WHEN 'i' THEN i.indisreplident ELSE false END
        LIMIT 1),
       ARRAY(SELECT a.attname::text FROM pg_index i
             JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey)
             WHERE w.wanted AND i.indrelid = c.oid
               AND CASE c.relreplident WHEN 'd' THEN i.indisprimary WHEN 'i' THEN i.indisreplident ELSE false END
             ORDER BY a.attnum)
FROM pg_class c
JOIN pg_namespace n ON n.oid = c.relnamespace
CROSS JOIN LATERAL (SELECT (n.nspname::text, c.relname::text) IN
    (SELECT s, t FROM unnest($1::text[], $2::text[]) AS u (s, t)) AS wanted) w
WHERE c.relkind IN ('r', 'p', 'v', 'm', 'f')
  AND (w.wanted OR (n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname !~ '^pg_(toast|temp_)'))";

// Whole rows as JSON, so columns that older servers lack (pubtruncate before 11,
// pubviaroot before 13, attnames before 15) read as absent instead of failing the query.
const PUBLICATION_QUERY: &str = "SELECT to_jsonb(p)::text FROM pg_publication p WHERE p.pubname = $1";
const PUBLICATION_TABLES_QUERY: &str = "SELECT to_jsonb(t)::text FROM pg_publication_tables t WHERE t.pubname = $1";

/// Reads the relations the rules name (and the names of all others), and `publication`
/// with its tables when given.
pub async fn read_catalog(
    client: &tokio_postgres::Client,
    publication: Option<&str>,
    rules: &RuleSet,
) -> Result<Catalog, CatalogError> {
    let query = |doing: &'static str| move |source| CatalogError::Query { doing, source };
    let tables = rules.tables();
    let schemas: Vec<String> = tables.iter().map(|t| t.schema.clone()).collect();
    let names: Vec<String> = tables.iter().map(|t| t.table.clone()).collect();
    let database: String = client
        .query_one("SELECT current_database()::text", &[])
        .await
        .map_err(query("reading the database name"))?
        .get(0);
    let rows = client
        .query(RELATIONS_QUERY, &[&schemas, &names])
        .await
        .map_err(query("reading the tables the rules name from pg_class"))?;
    let mut catalog = Catalog { database, ..Catalog::default() };
    for row in rows {
        let name = TableName { schema: row.get(0), table: row.get(1) };
        let relkind: String = row.get(2);
        let Some(kind) = RelKind::from_relkind(&relkind) else {
            return Err(CatalogError::Unexpected { what: "relkind", value: relkind });
        };
        let wanted: bool = row.get(4);
        if wanted {
            let relreplident: String = row.get(3);
            let Some(identity) = Identity::from_catalog(&relreplident, row.get(6), row.get(7)) else {
                return Err(CatalogError::Unexpected { what: "relreplident", value: relreplident });
            };
            let columns: Option<Vec<String>> = row.get(5);
            catalog.relations.insert(name.clone(), Relation { kind, columns: columns.unwrap_or_default(), identity });
        }
        catalog.names.push(name);
    }
    catalog.names.sort();
    let Some(publication) = publication else { return Ok(catalog) };
    catalog.publications = client
        .query("SELECT pubname::text FROM pg_publication ORDER BY 1", &[])
        .await
        .map_err(query("listing the publications in pg_publication"))?
        .iter()
        .map(|r| r.get(0))
        .collect();
    catalog.publication = read_publication(client, publication).await?;
    Ok(catalog)
}

/// Reads `publication`'s settings and tables; `None` when it does not exist. The one
/// reader of a publication for `check --online`, `run`'s start-up gate and `setup`.
pub async fn read_publication(
    client: &impl GenericClient,
    publication: &str,
) -> Result<Option<Publication>, CatalogError> {
    let query = |doing: &'static str| move |source| CatalogError::Query { doing, source };
    let row = client
        .query_opt(PUBLICATION_QUERY, &[&publication])
        .await
        .map_err(query("reading the publication from pg_publication"))?;
    let Some(row) = row else { return Ok(None) };
    let json = parse_json(row.get(0), "pg_publication row")?;
    let flag = |name: &str| json.get(name).and_then(serde_json::Value::as_bool).unwrap_or(false);
    let mut publishes = OpSet::NONE;
    for (op, column) in [(Op::Insert, "pubinsert"), (Op::Update, "pubupdate"), (Op::Delete, "pubdelete")] {
        if flag(column) {
            publishes = publishes.with(op);
        }
    }
    // Before Postgres 11 there is no pubtruncate, and truncate is never published.
    if flag("pubtruncate") {
        publishes = publishes.with(Op::Truncate);
    }
    let mut found = Publication {
        all_tables: flag("puballtables"),
        publishes,
        via_root: flag("pubviaroot"),
        tables: BTreeMap::new(),
    };
    let rows = client
        .query(PUBLICATION_TABLES_QUERY, &[&publication])
        .await
        .map_err(query("reading the published tables from pg_publication_tables"))?;
    for row in rows {
        let json = parse_json(row.get(0), "pg_publication_tables row")?;
        let text = |name: &str| json.get(name).and_then(serde_json::Value::as_str).map(str::to_string);
        let (Some(schema), Some(table)) = (text("schemaname"), text("tablename")) else {
            return Err(CatalogError::Unexpected { what: "pg_publication_tables row", value: json.to_string() });
        };
        let columns = json
            .get("attnames")
            .and_then(serde_json::Value::as_array)
            .map(|names| names.iter().filter_map(serde_json::Value::as_str).map(str::to_string).collect::<Vec<_>>());
        found.tables.insert(TableName { schema, table }, columns);
    }
    Ok(Some(found))
}

fn parse_json(text: String, what: &'static str) -> Result<serde_json::Value, CatalogError> {
    serde_json::from_str(&text).map_err(|_| CatalogError::Unexpected { what, value: text })
}

/// `walbust check --online`: reads the catalog once and checks the rules against it and
/// against the config's publication (see [`check_catalog`]).
pub async fn check_online(
    client: &tokio_postgres::Client,
    config: &Config,
    rules: &RuleSet,
) -> Result<Diagnostics, CatalogError> {
    let catalog = read_catalog(client, Some(&config.source.publication), rules).await?;
    Ok(check_catalog(&catalog, config, rules))
}

/// The columns alone: errors for columns the rules name that their (existing) tables
/// lack, warnings for tables that do not exist yet.
pub async fn validate_columns(client: &tokio_postgres::Client, rules: &RuleSet) -> Result<Diagnostics, CatalogError> {
    let catalog = read_catalog(client, None, rules).await?;
    Ok(column_diagnostics(&catalog, rules))
}

/// What the start-up gate found.
#[derive(Debug, Clone, Default)]
pub struct StartupCheck {
    /// Every problem, errors and warnings.
    pub diagnostics: Diagnostics,
    /// True when an error is the publication's: it is missing, or leaves out a table a
    /// rule names. The database needs fixing rather than the rule files.
    pub publication_unfit: bool,
    /// Server requirements only a person can meet (version, wal_level, a zero
    /// max_replication_slots or max_wal_senders), each with its fix.
    pub server: Vec<crate::daemon::slot::Unmet>,
}

/// The start-up and reload gate of `walbust run`: [`validate_columns`], plus errors for a
/// missing publication and for existing tables the publication leaves out, each with the
/// statement that fixes it (the same advice as `walbust check --online`).
pub async fn validate_startup(
    client: &tokio_postgres::Client,
    config: &Config,
    rules: &RuleSet,
) -> Result<StartupCheck, CatalogError> {
    let settings = read_server(client, &config.source.slot).await?;
    let catalog = read_catalog(client, Some(&config.source.publication), rules).await?;
    let mut found = startup_diagnostics(&catalog, config, rules);
    found.server =
        crate::daemon::slot::requirements(&settings, &config.source.slot).into_iter().filter(|u| u.lasting).collect();
    Ok(found)
}

/// Every online check of `rules` against `catalog`, whose publication was read as the
/// config's (`catalog.publication` is `None` when it does not exist).
pub fn check_catalog(catalog: &Catalog, config: &Config, rules: &RuleSet) -> Diagnostics {
    Checker::new(catalog, rules, read_file).with_config(config).check(Mode::Online).0
}

/// The checks of [`validate_startup`] over `catalog`.
pub fn startup_diagnostics(catalog: &Catalog, config: &Config, rules: &RuleSet) -> StartupCheck {
    let (diagnostics, publication_unfit) =
        Checker::new(catalog, rules, read_file).with_config(config).check(Mode::Startup);
    StartupCheck { diagnostics, publication_unfit, server: Vec::new() }
}

/// Unknown columns as errors and missing tables as warnings (see [`validate_columns`]).
pub fn column_diagnostics(catalog: &Catalog, rules: &RuleSet) -> Diagnostics {
    Checker::new(catalog, rules, read_file).check(Mode::Columns).0
}

const SERVER_QUERY: &str = "\
SELECT current_setting('server_version'), current_setting('server_version_num')::int,
       current_setting('wal_level'), current_setting('max_replication_slots')::int,
       ARRAY(SELECT slot_name::text FROM pg_replication_slots ORDER BY 1),
       current_setting('max_wal_senders')::int,
       (SELECT count(*)::int FROM pg_stat_replication),
       EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = $1),
       EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = $1 AND active)";

/// Reads the settings [`crate::daemon::slot::requirements`] checks, for slot `slot`.
pub async fn read_server(client: &tokio_postgres::Client, slot: &str) -> Result<ServerSettings, CatalogError> {
    let row = client
        .query_one(SERVER_QUERY, &[&slot])
        .await
        .map_err(|source| CatalogError::Query { doing: "reading the server's replication settings", source })?;
    let count = |i: usize| u32::try_from(row.get::<_, i32>(i)).unwrap_or(0);
    Ok(ServerSettings {
        version: row.get(0),
        version_num: count(1),
        wal_level: row.get(2),
        max_replication_slots: count(3),
        slots: row.get(4),
        max_wal_senders: count(5),
        wal_senders: count(6),
        slot_exists: row.get(7),
        slot_active: row.get(8),
    })
}

fn read_file(path: &Path) -> Option<String> {
    crate::input::user_file::read_to_string(path, crate::input::user_file::Kind::Rules).ok()
}

fn ticked(items: &[impl AsRef<str>]) -> String {
    items.iter().map(|i| format!("`{}`", i.as_ref())).collect::<Vec<_>>().join(", ")
}

/// `a`, `a and b`, `a, b and c`.
fn and_list(items: &[String]) -> String {
    match items {
        [] => String::new(),
        [one] => one.clone(),
        [init @ .., last] => format!("{} and {last}", init.join(", ")),
    }
}

fn ops_text(ops: &[Op]) -> String {
    and_list(&ops.iter().map(|o| o.as_str().to_string()).collect::<Vec<_>>())
}

/// Which checks a [`Checker`] runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// `check --online`: everything; a missing table is an error.
    Online,
    /// `run`'s gate: columns, and the publication's existence and tables.
    Startup,
    /// Columns only.
    Columns,
}

/// The config's publication and where the config names it.
struct Named<'a> {
    publication: &'a str,
    config: &'a Path,
}

/// Runs the checks over one catalog snapshot, locating keys in the rule files it reads.
struct Checker<'a, F> {
    catalog: &'a Catalog,
    rules: &'a RuleSet,
    read: F,
    named: Option<Named<'a>>,
    files: HashMap<PathBuf, Option<String>>,
    out: Vec<Diagnostic>,
    publication_unfit: bool,
}

impl<'a, F: Fn(&Path) -> Option<String>> Checker<'a, F> {
    fn new(catalog: &'a Catalog, rules: &'a RuleSet, read: F) -> Self {
        Checker { catalog, rules, read, named: None, files: HashMap::new(), out: Vec::new(), publication_unfit: false }
    }

    fn with_config(self, config: &'a Config) -> Self {
        self.with_named(&config.source.publication, &config.path)
    }

    fn with_named(mut self, publication: &'a str, config: &'a Path) -> Self {
        self.named = Some(Named { publication, config });
        self
    }

    /// The checks of `mode`; those of the publication only when the config is known. Also
    /// says whether an error is the publication's.
    fn check(mut self, mode: Mode) -> (Diagnostics, bool) {
        let publication = self.named.as_ref().map(|n| n.publication).filter(|_| mode != Mode::Columns);
        if publication.is_some() && self.catalog.publication.is_none() && !self.rules.rules().is_empty() {
            self.missing_publication();
        }
        let mut identity_reported: BTreeSet<&TableName> = BTreeSet::new();
        for rule in self.rules.rules() {
            let Some(relation) = self.table(rule, mode == Mode::Online) else { continue };
            self.columns(rule, relation, publication);
            if let (Some(name), Some(p)) = (publication, &self.catalog.publication) {
                self.membership(rule, relation, name, p);
                if mode == Mode::Online {
                    self.ops(rule, name, p);
                    if p.includes(&rule.table) && identity_reported.insert(&rule.table) {
                        self.rejected_writes(rule, relation, name, p);
                    }
                }
            }
            if mode == Mode::Online {
                self.identity(rule, relation);
            }
        }
        // Reading order: the config, then files as loaded, then line and column.
        let config = self.named.as_ref().map(|n| n.config);
        let files: Vec<&Path> = config.into_iter().chain(self.rules.rules().iter().map(|r| r.file.as_path())).collect();
        let file_index = |f: &Path| files.iter().position(|g| *g == f).unwrap_or(usize::MAX);
        self.out.sort_by_key(|d| (file_index(&d.file), d.line, d.col));
        (Diagnostics(self.out), self.publication_unfit)
    }

    fn push(&mut self, severity: Severity, rule: &Rule, at: (usize, usize), message: String, hint: String) {
        self.out.push(Diagnostic {
            severity,
            file: rule.file.clone(),
            line: at.0.max(1),
            col: at.1.max(1),
            message,
            hint: Some(hint),
        });
    }

    /// Where `key = ...` of `rule` is written (its value's first character); the rule's
    /// header when the file cannot be read or the key is not written on a line of its own.
    fn position(&mut self, rule: &Rule, key: &str) -> (usize, usize) {
        let read = &self.read;
        let text = self.files.entry(rule.file.clone()).or_insert_with(|| read(&rule.file));
        text.as_deref().and_then(|t| key_position(t, rule.line, key)).unwrap_or((rule.line, 1))
    }

    /// The rule's relation, when it exists and is a table; reports it otherwise.
    fn table(&mut self, rule: &'a Rule, strict: bool) -> Option<&'a Relation> {
        let catalog = self.catalog;
        let at = self.position(rule, "table");
        let t = &rule.table;
        match catalog.relations.get(t) {
            Some(r) if r.kind.is_replicated() => Some(r),
            Some(r) => {
                self.push(
                    Severity::Error,
                    rule,
                    at,
                    format!(
                        "`{t}` of rule `{}` is a {}, which logical replication does not stream",
                        rule.name,
                        r.kind.noun()
                    ),
                    "name the table the data is written to".into(),
                );
                None
            }
            None => {
                let hint = match self.suggest_table(t) {
                    Some(s) => format!("did you mean `{s}`?"),
                    None => "create the table, or fix `table` (a bare name means schema public)".into(),
                };
                let (severity, message) = if strict {
                    (
                        Severity::Error,
                        format!(
                            "table `{t}` of rule `{}` does not exist in database `{}`",
                            rule.name, catalog.database
                        ),
                    )
                } else {
                    (
                        Severity::Warning,
                        format!(
                            "table `{t}` of rule `{}` does not exist in database `{}` yet; the rule fires once it is created and published",
                            rule.name, catalog.database
                        ),
                    )
                };
                self.push(severity, rule, at, message, hint);
                None
            }
        }
    }

    /// The closest existing name: a table of the same schema, else the same table name
    /// in another schema.
    fn suggest_table(&self, t: &TableName) -> Option<TableName> {
        let same_schema = self.catalog.names.iter().filter(|n| n.schema == t.schema);
        if let Some(m) = did_you_mean(&t.table, same_schema.map(|n| n.table.as_str())) {
            return Some(TableName { schema: t.schema.clone(), table: m.to_string() });
        }
        self.catalog.names.iter().find(|n| n.table == t.table).cloned()
    }

    fn columns(&mut self, rule: &Rule, relation: &Relation, publication: Option<&str>) {
        let listed = publication.and_then(|name| {
            let list = self.catalog.publication.as_ref()?.tables.get(&rule.table)?.as_ref()?;
            // Postgres 15 lists every column when there is no column list.
            (list.len() < relation.columns.len()).then_some((name, list))
        });
        for c in &rule.columns {
            if !relation.columns.contains(&c.name) {
                let hint = match did_you_mean(&c.name, relation.columns.iter().map(String::as_str)) {
                    Some(m) => format!("did you mean `{m}`?"),
                    None if relation.columns.len() <= 30 => {
                        format!("`{}` has columns {}", rule.table, ticked(&relation.columns))
                    }
                    None => format!("see \\d {} in psql for its columns", fix::sql_table(&rule.table)),
                };
                self.push(
                    Severity::Error,
                    rule,
                    (c.line, c.col),
                    format!(
                        "unknown column `{}` in rule `{}`: table `{}` has no such column",
                        c.name, rule.name, rule.table
                    ),
                    hint,
                );
            } else if let Some((name, list)) = listed.filter(|(_, list)| !list.contains(&c.name)) {
                self.push(
                    Severity::Error,
                    rule,
                    (c.line, c.col),
                    format!(
                        "column `{}` of rule `{}` is left out of publication `{name}`'s column list for `{}`, so walbust never sees it",
                        c.name, rule.name, rule.table
                    ),
                    format!(
                        "add it to the list (published now: {}), or drop the column list: {}",
                        ticked(list),
                        fix::set_tables_outline(name)
                    ),
                );
            }
        }
    }

    /// The publication does not exist: reported against the config's `publication`, with a
    /// close existing name when there is one, and the statement that creates it.
    fn missing_publication(&mut self) {
        let Some(Named { publication: name, config }) = self.named else { return };
        let read = &self.read;
        let text = self.files.entry(config.to_path_buf()).or_insert_with(|| read(config));
        let at = text.as_deref().and_then(|t| {
            let source = t.lines().position(|l| l.trim() == "[source]")? + 1;
            key_position(t, source, "publication").or(Some((source, 1)))
        });
        let create = format!("create it with: {}", fix::create_publication(name, &self.rules.tables()));
        let hint = match did_you_mean(name, self.catalog.publications.iter().map(String::as_str)) {
            Some(m) => format!("did you mean `{m}`? Otherwise {create}"),
            None => create,
        };
        self.publication_unfit = true;
        self.out.push(Diagnostic {
            severity: Severity::Error,
            file: config.to_path_buf(),
            line: at.map_or(1, |a| a.0),
            col: at.map_or(1, |a| a.1),
            message: format!(
                "publication `{name}` does not exist in database `{}`, so no change reaches walbust",
                self.catalog.database
            ),
            hint: Some(hint),
        });
    }

    fn membership(&mut self, rule: &Rule, relation: &Relation, name: &str, p: &Publication) {
        let at = self.position(rule, "table");
        let t = &rule.table;
        if relation.kind == RelKind::Partitioned && !p.via_root {
            // The stream then names each partition, never the partitioned table the rule names.
            self.push(
                Severity::Warning,
                rule,
                at,
                format!(
                    "`{t}` of rule `{}` is partitioned, and publication `{name}` publishes changes under each partition's name, which the rule does not match",
                    rule.name
                ),
                format!("run {} and make sure it includes {}", fix::publish_via_root(name), fix::sql_table(t)),
            );
            return;
        }
        if !p.includes(t) {
            self.publication_unfit = true;
            self.push(
                Severity::Error,
                rule,
                at,
                format!(
                    "table `{t}` of rule `{}` is not in publication `{name}`, so its changes never reach walbust",
                    rule.name
                ),
                format!("run {}", fix::add_tables(name, &[t])),
            );
        }
    }

    fn ops(&mut self, rule: &Rule, name: &str, p: &Publication) {
        let missing: Vec<Op> =
            Op::ALL.into_iter().filter(|&op| rule.on.contains(op) && !p.publishes.contains(op)).collect();
        if missing.is_empty() {
            return;
        }
        let at = self.position(rule, "on");
        let ops = ops_text(&missing);
        self.push(
            Severity::Warning,
            rule,
            at,
            format!(
                "publication `{name}` does not publish {ops}, but rule `{}` fires on {ops}; those changes never reach walbust",
                rule.name
            ),
            format!("run {}", fix::publish_every_op(name)),
        );
    }

    /// Postgres refuses UPDATE and DELETE on a published table without a replica identity.
    fn rejected_writes(&mut self, rule: &Rule, relation: &Relation, name: &str, p: &Publication) {
        let refused: Vec<Op> = [Op::Update, Op::Delete].into_iter().filter(|&op| p.publishes.contains(op)).collect();
        if !relation.identity.is_missing() || refused.is_empty() {
            return;
        }
        let at = self.position(rule, "table");
        let t = &rule.table;
        let verbs = and_list(&refused.iter().map(|o| o.as_str().to_uppercase()).collect::<Vec<_>>());
        self.push(
            Severity::Error,
            rule,
            at,
            format!(
                "`{t}` has {}; while publication `{name}` publishes it, Postgres rejects every {verbs} on it",
                relation.identity.describe()
            ),
            format!("run {} (or give it a primary key)", fix::replica_identity_full(t)),
        );
    }

    /// Warns when UPDATE or DELETE lack old-row values the rule reads, saying what widens.
    fn identity(&mut self, rule: &Rule, relation: &Relation) {
        let Some(sent) = relation.identity.sent() else { return };
        let lacking = |c: &str| relation.columns.iter().any(|k| k == c) && !sent.iter().any(|k| k == c);
        let mut columns: Vec<&str> = Vec::new();
        let mut widened: Vec<String> = Vec::new();
        let mut starred: Vec<String> = Vec::new();
        let mut ops: Vec<Op> = Vec::new();
        for op in [Op::Update, Op::Delete] {
            if !rule.on.contains(op) {
                continue;
            }
            let mut affected = false;
            for (list, template, row_counts) in old_row_templates(rule, op) {
                let missing: Vec<&str> = template
                    .columns_with_image()
                    .filter(|&(image, c)| (image == Image::Old || (row_counts && image == Image::Row)) && lacking(c))
                    .map(|(_, c)| c)
                    .collect();
                if missing.is_empty() {
                    continue;
                }
                affected = true;
                let entry = format!("{list} `{template}`");
                let target = if list == "publish message" { &mut starred } else { &mut widened };
                if !target.contains(&entry) {
                    target.push(entry);
                }
                for c in missing {
                    if !columns.contains(&c) {
                        columns.push(c);
                    }
                }
            }
            if affected {
                ops.push(op);
            }
        }
        let untestable_when: Vec<&str> = if rule.on.contains(Op::Delete) {
            rule.when.iter().map(|c| c.column.as_str()).filter(|c| lacking(c)).collect()
        } else {
            Vec::new()
        };
        // One listed column that cannot be told is enough for `changed` to hold.
        let untestable_changed: Vec<&str> = if rule.on.contains(Op::Update) {
            rule.changed.iter().map(String::as_str).filter(|c| lacking(c)).collect()
        } else {
            Vec::new()
        };
        if widened.is_empty() && starred.is_empty() && untestable_when.is_empty() && untestable_changed.is_empty() {
            return;
        }
        let t = &rule.table;
        let mut consequences = Vec::new();
        if !widened.is_empty() {
            consequences.push(format!(
                "these will be widened to patterns (SCAN and delete every match) on {}: {}",
                ops_text(&ops),
                widened.join(", ")
            ));
        }
        if !starred.is_empty() {
            consequences.push(format!("{} will carry `*` in place of those values", starred.join(", ")));
        }
        if !untestable_when.is_empty() {
            consequences.push(format!(
                "`when` on {} cannot be tested on delete, so the rule fires on every delete",
                ticked(&untestable_when)
            ));
        }
        if !untestable_changed.is_empty() {
            consequences.push(format!(
                "`changed` cannot tell whether {} changed, so the rule fires on every update",
                ticked(&untestable_changed)
            ));
        }
        for c in untestable_when.iter().chain(&untestable_changed) {
            if !columns.contains(c) {
                columns.push(c);
            }
        }
        let reads = ticked(&columns);
        // At the first mention of a column the old row lacks.
        let mention = rule.columns.iter().find(|m| m.image != Image::New && columns.contains(&m.name.as_str()));
        let at = match mention {
            Some(m) => (m.line, m.col),
            None => self.position(rule, "table"),
        };
        self.push(
            Severity::Warning,
            rule,
            at,
            format!(
                "rule `{}` reads {reads} from the old row, but `{t}` has {}; {}",
                rule.name,
                relation.identity.describe(),
                consequences.join("; ")
            ),
            format!("run {} so updates and deletes carry the whole old row", fix::replica_identity_full(t)),
        );
    }
}

/// The columns `rule` reads from the old row of an update or a delete: those of its
/// templates rendered from the old row, its `when` columns on delete and its `changed`
/// columns on update. A write-through's own columns come from the new row, so a table
/// only some of whose columns feed a `refresh` needs no `REPLICA IDENTITY FULL` for them.
/// `walbust setup` and `check --online` both go by this list.
pub fn old_row_columns(rule: &Rule) -> Vec<&str> {
    let mut out: Vec<&str> = Vec::new();
    for op in [Op::Update, Op::Delete] {
        if !rule.on.contains(op) {
            continue;
        }
        for (_, template, row_counts) in old_row_templates(rule, op) {
            for (image, c) in template.columns_with_image() {
                if (image == Image::Old || (row_counts && image == Image::Row)) && !out.contains(&c) {
                    out.push(c);
                }
            }
        }
    }
    let conditions = rule
        .when
        .iter()
        .map(|c| c.column.as_str())
        .filter(|_| rule.on.contains(Op::Delete))
        .chain(rule.changed.iter().map(String::as_str).filter(|_| rule.on.contains(Op::Update)));
    for c in conditions {
        if !out.contains(&c) {
            out.push(c);
        }
    }
    out
}

/// The templates rendered from the old row on `op` (an update or a delete), with the list
/// each is in and whether `{column}` (not only `{old.column}`) reads the old row there.
fn old_row_templates(rule: &Rule, op: Op) -> Vec<(&'static str, &Template, bool)> {
    let mut out = Vec::new();
    let lists: [(&'static str, &Vec<Template>); 4] =
        [("keys", &rule.keys), ("patterns", &rule.patterns), ("tags", &rule.tags), ("bump", &rule.bump)];
    for (list, templates) in lists {
        out.extend(templates.iter().map(|t| (list, t, true)));
    }
    // An update unlinks the old refresh key; a delete unlinks the key of the old row.
    out.extend(rule.refresh.iter().map(|r| ("refresh key", &r.key, true)));
    // A message is rendered from the new row on update, from the old on delete.
    out.extend(
        rule.publish.iter().filter_map(|p| p.message.as_ref()).map(|m| ("publish message", m, op == Op::Delete)),
    );
    out
}

/// The line and column of the value of `key = ...` in the rule whose `[[rule]]` header is
/// on line `header` of `text`.
fn key_position(text: &str, header: usize, key: &str) -> Option<(usize, usize)> {
    for (i, line) in text.lines().enumerate().skip(header) {
        let trimmed = line.trim_start();
        if trimmed.starts_with('[') && !trimmed.starts_with("[[rule.") {
            return None;
        }
        let Some(rest) = trimmed.strip_prefix(key) else { continue };
        let Some(value) = rest.trim_start().strip_prefix('=') else { continue };
        let value = value.trim_start();
        let col = line.chars().count() - value.chars().count() + 1;
        return Some((i + 1, col));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const RULES: &str = r#"[[rule]]
name = "user profile"
table = "users"
on = ["insert", "update", "delete"]
keys = ["user:{id}", "org:{org_id}:users"]
patterns = ["profile_{emial}_*"]

[[rule]]
name = "plans"
table = "plans"
on = ["truncate"]
keys = ["plans"]
"#;

    fn rules(text: &str) -> RuleSet {
        RuleSet::from_sources(&[(PathBuf::from("rules/users.toml"), text.to_string())])
            .unwrap_or_else(|d| panic!("{d}"))
            .rules
    }

    fn table(name: &str) -> TableName {
        TableName { schema: "public".into(), table: name.into() }
    }

    fn users(identity: Identity) -> Relation {
        Relation { kind: RelKind::Table, columns: vec!["id".into(), "org_id".into(), "email".into()], identity }
    }

    fn pk() -> Identity {
        Identity::Default { index: Some("users_pkey".into()), columns: vec!["id".into()] }
    }

    fn catalog(identity: Identity, publication: Option<Publication>) -> Catalog {
        let mut relations = BTreeMap::new();
        relations.insert(table("users"), users(identity));
        relations.insert(table("plans"), Relation { kind: RelKind::Table, columns: vec!["id".into()], identity: pk() });
        Catalog {
            database: "app".into(),
            relations,
            names: vec![table("plans"), table("users")],
            publications: publication.iter().map(|_| "walbust".to_string()).chain(["wallbust".into()]).collect(),
            publication,
        }
    }

    const CONFIG: &str =
        "rules = [\"rules/*.toml\"]\n\n[source]\nurl = \"postgres://db/app\"\npublication = \"walbust\"\n";

    fn all_tables(publishes: OpSet) -> Publication {
        Publication { all_tables: true, publishes, via_root: false, tables: BTreeMap::new() }
    }

    fn check(catalog: &Catalog, text: &str) -> Vec<String> {
        let rules = rules(text);
        let read = |p: &Path| Some(if p == Path::new("config.toml") { CONFIG.to_string() } else { text.to_string() });
        let d =
            Checker::new(catalog, &rules, read).with_named("walbust", Path::new("config.toml")).check(Mode::Online).0;
        d.0.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn unknown_column_is_an_error_at_its_mention_with_a_suggestion() {
        let got = check(&catalog(Identity::Full, Some(all_tables(OpSet::ALL))), RULES);
        assert_eq!(got.len(), 1, "{got:#?}");
        assert_eq!(
            got[0],
            "error: rules/users.toml:6:23: unknown column `emial` in rule `user profile`: table `public.users` has no such column\n  hint: did you mean `email`?"
        );
    }

    #[test]
    fn default_identity_widens_old_row_keys_and_says_how_to_fix_it() {
        let text = RULES.replace("{emial}", "{email}");
        let got = check(&catalog(pk(), Some(all_tables(OpSet::ALL))), &text);
        assert_eq!(got.len(), 1, "{got:#?}");
        let w = &got[0];
        assert!(
            w.starts_with(
                "warning: rules/users.toml:5:28: rule `user profile` reads `org_id`, `email` from the old row"
            ),
            "{w}"
        );
        assert!(w.contains("REPLICA IDENTITY DEFAULT, whose old row carries only the primary key (`id`)"), "{w}");
        assert!(w.contains("on update and delete: keys `org:{org_id}:users`, patterns `profile_{email}_*`"), "{w}");
        assert!(!w.contains("`user:{id}`"), "key columns are sent: {w}");
        assert!(w.ends_with("hint: run ALTER TABLE public.users REPLICA IDENTITY FULL; so updates and deletes carry the whole old row"), "{w}");
    }

    #[test]
    fn identity_nothing_says_there_is_no_old_row_and_that_writes_are_refused() {
        let text = RULES.replace("{emial}", "{email}");
        let got = check(&catalog(Identity::Nothing, Some(all_tables(OpSet::ALL))), &text);
        assert_eq!(got.len(), 2, "{got:#?}");
        assert!(
            got[0].starts_with("error: rules/users.toml:3:9: `public.users` has REPLICA IDENTITY NOTHING"),
            "{}",
            got[0]
        );
        assert!(got[0].contains("Postgres rejects every UPDATE and DELETE on it"), "{}", got[0]);
        assert!(got[1].contains("carry no old row at all"), "{}", got[1]);
        assert!(got[1].contains("keys `user:{id}`, keys `org:{org_id}:users`"), "{}", got[1]);
    }

    #[test]
    fn missing_table_suggests_a_close_name_and_is_only_a_warning_for_validation() {
        let text = RULES.replace("table = \"users\"", "table = \"userz\"");
        let got = check(&catalog(Identity::Full, Some(all_tables(OpSet::ALL))), &text);
        assert_eq!(
            got,
            [
                "error: rules/users.toml:3:9: table `public.userz` of rule `user profile` does not exist in database `app`\n  hint: did you mean `public.users`?"
            ]
        );
        let rules = rules(&text);
        let d = Checker::new(&catalog(Identity::Full, None), &rules, |_: &Path| None).check(Mode::Columns).0;
        assert!(!d.has_errors(), "{d}");
        assert!(d.0[0].message.contains("does not exist in database `app` yet"), "{d}");
    }

    #[test]
    fn table_outside_the_publication_and_unpublished_ops() {
        let mut tables = BTreeMap::new();
        tables.insert(table("users"), None);
        let p = Publication {
            all_tables: false,
            publishes: OpSet::NONE.with(Op::Insert).with(Op::Update).with(Op::Delete),
            via_root: false,
            tables,
        };
        let text = RULES.replace("{emial}", "{id}");
        let got = check(&catalog(Identity::Full, Some(p)), &text);
        assert_eq!(got.len(), 2, "{got:#?}");
        assert_eq!(
            got[0],
            "error: rules/users.toml:10:9: table `public.plans` of rule `plans` is not in publication `walbust`, so its changes never reach walbust\n  hint: run ALTER PUBLICATION walbust ADD TABLE public.plans;"
        );
        assert_eq!(
            got[1],
            "warning: rules/users.toml:11:6: publication `walbust` does not publish truncate, but rule `plans` fires on truncate; those changes never reach walbust\n  hint: run ALTER PUBLICATION walbust SET (publish = 'insert, update, delete, truncate');"
        );
    }

    #[test]
    fn misspelt_publication_is_reported_at_the_config_with_did_you_mean() {
        let text = RULES.replace("{emial}", "{id}");
        let got = check(&catalog(Identity::Full, None), &text);
        assert_eq!(
            got,
            [
                "error: config.toml:5:15: publication `walbust` does not exist in database `app`, so no change reaches walbust\n  hint: did you mean `wallbust`? Otherwise create it with: CREATE PUBLICATION walbust FOR TABLE public.plans, public.users WITH (publish = 'insert, update, delete, truncate');"
            ]
        );
    }

    fn startup(catalog: &Catalog, text: &str) -> (Vec<String>, bool) {
        let rules = rules(text);
        let read = |p: &Path| Some(if p == Path::new("config.toml") { CONFIG.to_string() } else { text.to_string() });
        let (d, unfit) =
            Checker::new(catalog, &rules, read).with_named("walbust", Path::new("config.toml")).check(Mode::Startup);
        (d.0.iter().map(ToString::to_string).collect(), unfit)
    }

    #[test]
    fn run_refuses_a_rule_table_left_out_of_the_publication_with_the_alter_publication_fix() {
        let mut tables = BTreeMap::new();
        tables.insert(table("users"), None);
        let p = Publication { all_tables: false, publishes: OpSet::ALL, via_root: false, tables };
        let text = RULES.replace("{emial}", "{id}");
        let (got, unfit) = startup(&catalog(pk(), Some(p)), &text);
        // The same error and fix as `check --online`; identity warnings are check's alone.
        assert_eq!(
            got,
            [
                "error: rules/users.toml:10:9: table `public.plans` of rule `plans` is not in publication `walbust`, so its changes never reach walbust\n  hint: run ALTER PUBLICATION walbust ADD TABLE public.plans;"
            ]
        );
        assert!(unfit);
        let (got, unfit) = startup(&catalog(pk(), Some(all_tables(OpSet::ALL))), &text);
        assert_eq!(got, Vec::<String>::new());
        assert!(!unfit);
    }

    #[test]
    fn conditions_that_need_the_old_row_are_named() {
        let text = "[[rule]]\nname = \"org\"\ntable = \"users\"\nwhen = { email = \"x\" }\nchanged = [\"org_id\"]\nkeys = [\"user:{id}\"]\n";
        let got = check(&catalog(pk(), Some(all_tables(OpSet::ALL))), text);
        assert_eq!(got.len(), 1, "{got:#?}");
        let w = &got[0];
        assert!(
            w.starts_with("warning: rules/users.toml:4:10: rule `org` reads `email`, `org_id` from the old row"),
            "{w}"
        );
        assert!(w.contains("`when` on `email` cannot be tested on delete, so the rule fires on every delete"), "{w}");
        assert!(w.contains("`changed` cannot tell whether `org_id` changed, so the rule fires on every update"), "{w}");
        assert!(!w.contains("widened"), "{w}");
    }

    #[test]
    fn key_positions_stay_inside_their_rule() {
        let text = "[[rule]]\nname = \"a\"\ntable =  \"t\"\n\n[[rule]]\nname = \"b\"\non = []\n";
        assert_eq!(key_position(text, 1, "table"), Some((3, 10)));
        assert_eq!(key_position(text, 1, "on"), None);
        assert_eq!(key_position(text, 5, "on"), Some((7, 6)));
    }
}
