//! Running: each test's changes through the routing step and a batch, and the actions compared.

use super::*;

/// Where an actual action came from, shown next to unexpected lines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// A rule, and the reason when it was widened to a pattern.
    Rule {
        /// The rule's name.
        name: Arc<str>,
        /// Set when an exact action was widened.
        widened: Option<Widening>,
    },
    /// A manual invalidation message.
    Message,
}

/// One transaction's outcome.
#[derive(Debug, Clone)]
pub struct TxResult {
    /// 1-based position of the transaction in its test.
    pub index: usize,
    /// The line its `changes` start on.
    pub line: usize,
    /// The expected actions.
    pub expected: BTreeSet<Action>,
    /// The actions the batch holds after the transaction, with where each came from.
    pub actual: Vec<(Action, Origin)>,
    /// Things worth knowing when it fails, such as skipped malformed messages.
    pub notes: Vec<String>,
}

impl TxResult {
    /// True when the actual actions are exactly the expected ones.
    pub fn passed(&self) -> bool {
        self.actual.len() == self.expected.len() && self.actual.iter().all(|(a, _)| self.expected.contains(a))
    }
}

/// One test's outcome.
#[derive(Debug, Clone)]
pub struct CaseResult {
    /// The test's name.
    pub name: String,
    /// The line of its `[[test]]` header.
    pub line: usize,
    /// Problems that fail the test whatever its actions, such as a rule naming a column
    /// the declared table lacks.
    pub problems: Vec<String>,
    /// Each transaction's outcome.
    pub txs: Vec<TxResult>,
    /// How long it took.
    pub duration: Duration,
}

impl CaseResult {
    /// True when the test passed.
    pub fn passed(&self) -> bool {
        self.problems.is_empty() && self.txs.iter().all(TxResult::passed)
    }
}

impl Case {
    /// Runs the test: binds its tables, routes each transaction's changes through the
    /// production router, deduplicates through a batch per transaction, and compares.
    pub fn run(&self) -> CaseResult {
        self.run_with_policy(&ManualPolicy::default())
    }

    /// [`Case::run`] with the manual-message policy of a config.
    pub fn run_with_policy(&self, policy: &ManualPolicy) -> CaseResult {
        let started = Instant::now();
        if let Some(r) = &self.recording {
            let problems = r.run(self.rules.clone(), policy);
            return CaseResult {
                name: self.name.clone(),
                line: self.line,
                problems,
                txs: Vec::new(),
                duration: started.elapsed(),
            };
        }
        let mut routing = Routing::new(self.rules.clone());
        let mut problems = Vec::new();
        for t in &self.tables {
            for m in routing.bind(&t.relation) {
                if t.declared {
                    problems.push(format!(
                        "rule `{}` names column `{}`, which the declared columns of `{}` lack; its keys are widened to patterns",
                        m.rule, m.column, m.table
                    ));
                }
            }
        }
        let txs = self
            .txs
            .iter()
            .enumerate()
            .map(|(i, tx)| {
                let mut batch = Batch::new();
                let mut tally = CaseTally { origins: HashMap::new(), notes: Vec::new(), line: 0 };
                for step in &tx.steps {
                    match step {
                        Step::Row { table, op, old, new } => {
                            let change = Change {
                                relation: &self.tables[*table].relation,
                                op: *op,
                                old: old.as_ref(),
                                new: new.as_ref(),
                            };
                            routing.change(&change, Lsn::ZERO, &mut batch, &mut tally);
                        }
                        Step::Message { line, body } => {
                            tally.line = *line;
                            routing.message(body, policy, Lsn::ZERO, &mut batch, &mut tally);
                        }
                    }
                }
                let CaseTally { origins, notes, .. } = tally;
                let actual =
                    batch.actions().map(|a| (a.clone(), origins.get(a).cloned().unwrap_or(Origin::Message))).collect();
                TxResult { index: i + 1, line: tx.line, expected: tx.expect.iter().cloned().collect(), actual, notes }
            })
            .collect();
        CaseResult { name: self.name.clone(), line: self.line, problems, txs, duration: started.elapsed() }
    }
}

#[cfg(test)]
impl Case {
    /// A test of `tables` (taken as inferred, so a column a rule names may be missing)
    /// whose transactions are `txs`, expecting no action.
    pub(crate) fn from_steps(rules: Arc<RuleSet>, tables: Vec<Relation>, txs: Vec<Vec<Step>>) -> Case {
        Case {
            name: "from steps".into(),
            line: 1,
            rules,
            tables: tables.into_iter().map(|relation| TestTable { relation, declared: false }).collect(),
            txs: txs.into_iter().map(|steps| Tx { line: 1, steps, expect: Vec::new() }).collect(),
            recording: None,
        }
    }
}

/// Where each action of a test's transaction came from, and what is worth knowing.
pub(super) struct CaseTally {
    origins: HashMap<Action, Origin>,
    notes: Vec<String>,
    /// The line of the message being applied.
    line: usize,
}

impl Tally for CaseTally {
    fn routed(&mut self, _: &Change<'_>, routed: &[Routed], _: &mut Batch) {
        for r in routed {
            if !self.origins.contains_key(&r.action) {
                self.origins.insert(r.action.clone(), Origin::Rule { name: r.rule.clone(), widened: r.widened });
            }
        }
    }

    fn manual(&mut self, actions: &[Action], _: &mut Batch) {
        for a in actions {
            self.origins.entry(a.clone()).or_insert(Origin::Message);
        }
    }

    fn malformed(&mut self, error: &ManualError) {
        self.notes.push(format!("the message on line {} was skipped, as walbust run skips it: {error}", self.line));
    }

    fn refused(&mut self, action: &Action, refusal: Refusal) {
        self.notes.push(format!(
            "the message on line {} asks for {action}, which walbust run leaves out: {}",
            self.line,
            refusal.describe()
        ));
    }
}

/// One test file's outcomes.
#[derive(Debug, Clone)]
pub struct SuiteResult {
    /// The test file.
    pub file: PathBuf,
    /// The outcomes of the tests that ran.
    pub cases: Vec<CaseResult>,
}

impl SuiteResult {
    /// Number of failed tests.
    pub fn failures(&self) -> usize {
        self.cases.iter().filter(|c| !c.passed()).count()
    }
}

/// Runs every test of `suites` whose name `selected` accepts, applying manual messages as
/// `policy` (a config's `manual_prefixes` and `manual_match_all`, or the default) says.
pub fn run(suites: &[Suite], policy: &ManualPolicy, selected: impl Fn(&str) -> bool) -> Vec<SuiteResult> {
    suites
        .iter()
        .map(|s| SuiteResult {
            file: s.file.clone(),
            cases: s.cases.iter().filter(|c| selected(&c.name)).map(|c| c.run_with_policy(policy)).collect(),
        })
        .collect()
}
