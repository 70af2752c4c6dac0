//! The routing step: one change, or one manual invalidation message, into a batch.
//!
//! `walbust run` (changes from the replication stream), `walbust replay` (changes from a
//! recording) and `walbust test` (changes from a test file) all turn a change into actions
//! here: the production [`Router`] routes it and every action goes into the caller's
//! [`Batch`], which deduplicates. A manual message's body is parsed, checked against the
//! manual policy when the caller has one, and its actions go into the batch the same way;
//! a malformed body is skipped. What each caller counts, logs or shows is its own: it
//! watches through a [`Tally`], called before the actions go into the batch, with static
//! dispatch and no allocation of its own on the way.

use std::sync::Arc;

use crate::domain::action::Action;
use crate::domain::batch::{Batch, Origin};
use crate::domain::rules::manual::{self, ManualError, ManualPolicy, Refusal};
use crate::domain::rules::router::MissingColumn;
use crate::domain::rules::{Change, Routed, Router, RuleSet};
use crate::postgres::lsn::Lsn;
use crate::postgres::pgoutput::Relation;

/// The rule name that actions of manual invalidation messages carry as their origin.
pub const MANUAL_RULE: &str = "(manual message)";

/// What a caller keeps track of while routing. Every method does nothing unless the
/// caller overrides it.
pub trait Tally {
    /// `change` was routed to `routed`, which go into `batch` next.
    fn routed(&mut self, change: &Change<'_>, routed: &[Routed], batch: &mut Batch) {
        let _ = (change, routed, batch);
    }

    /// A manual message asked for `actions` (those the policy allows), which go into
    /// `batch` next.
    fn manual(&mut self, actions: &[Action], batch: &mut Batch) {
        let _ = (actions, batch);
    }

    /// The manual policy refused `action` of a manual message; it is left out.
    fn refused(&mut self, action: &Action, refusal: Refusal) {
        let _ = (action, refusal);
    }

    /// A manual message's body is malformed; the message is skipped.
    fn malformed(&mut self, error: &ManualError) {
        let _ = error;
    }
}

/// A [`Tally`] that keeps nothing.
impl Tally for () {}

/// The router and its scratch space, shared by every caller that routes changes.
#[derive(Debug)]
pub struct Routing {
    router: Router,
    /// The actions of the change being routed; keeps its capacity from change to change.
    routed: Vec<Routed>,
    manual_rule: Arc<str>,
}

impl Routing {
    /// Routing with `rules`, no relation bound yet.
    pub fn new(rules: Arc<RuleSet>) -> Self {
        Routing { router: Router::new(rules), routed: Vec::new(), manual_rule: Arc::from(MANUAL_RULE) }
    }

    /// The rule set in use.
    pub fn rules(&self) -> &Arc<RuleSet> {
        self.router.rules()
    }

    /// Swaps in a new rule set; relations must be bound again.
    pub fn replace_rules(&mut self, rules: Arc<RuleSet>) {
        self.router.replace_rules(rules);
    }

    /// Forgets every bound relation, as at the start of a new replication session.
    pub fn clear(&mut self) {
        self.router.clear();
    }

    /// Binds the rules for `relation` (new, or changed by DDL); returns the columns rules
    /// name that the table lacks, whose actions will be widened.
    pub fn bind(&mut self, relation: &Relation) -> Vec<MissingColumn> {
        self.router.bind(relation)
    }

    /// Routes `change`, at `lsn`, into `batch`.
    pub fn change(&mut self, change: &Change<'_>, lsn: Lsn, batch: &mut Batch, tally: &mut impl Tally) {
        self.routed.clear();
        self.router.route(change, &mut self.routed);
        tally.routed(change, &self.routed, batch);
        // The routed actions move into the batch; the buffer keeps its capacity.
        for r in self.routed.drain(..) {
            batch.push_from(r.action, Some(Origin { rule: r.rule, lsn }));
        }
    }

    /// Applies the manual invalidation message `body`, at `lsn`, to `batch`: each action
    /// `policy` allows, or none when the body is malformed.
    pub fn message(&mut self, body: &[u8], policy: &ManualPolicy, lsn: Lsn, batch: &mut Batch, tally: &mut impl Tally) {
        let mut actions = match manual::actions(body) {
            Ok(actions) => actions,
            Err(e) => {
                tally.malformed(&e);
                return;
            }
        };
        actions.retain(|a| match policy.check(a) {
            Ok(()) => true,
            Err(refusal) => {
                tally.refused(a, refusal);
                false
            }
        });
        tally.manual(&actions, batch);
        for a in actions {
            batch.push_from(a, Some(Origin { rule: self.manual_rule.clone(), lsn }));
        }
    }
}
