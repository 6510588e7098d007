//! The sandbox state machine as data. Each lifecycle action has one row: the state it starts
//! from, the in-flight state recorded (with the operation, before any side effect on the host),
//! where it ends when the host step succeeds, and where it falls back when the host step fails
//! with nothing lost. `Core` reads its transitions from here ([`Core::begin`](super::Core),
//! `finish`, `fall_back`); crash recovery ([`super::recovery::plan`]) settles every in-flight
//! state into one of its row's ends, which the tests below check.
//!
//! To add an action: a row here, a variant of `cove_store::Op` if it needs one in flight, its
//! recovery in `recovery::plan`, and the method in `Core` that does the host's part.

use cove_api::sandbox::SandboxState as S;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Pause,
    Resume,
    Snapshot,
    Stop,
    Start,
}

#[derive(Debug)]
pub struct Rule {
    pub action: Action,
    /// The state the action starts from (any other is a 409 naming it).
    pub from: S,
    /// Recorded, with the operation, before the host is touched.
    pub during: S,
    /// Where the action ends when the host step succeeds.
    pub done: S,
    /// Where it falls back when the host step fails; nothing of the sandbox is lost.
    pub failed: S,
    /// Whether entering `during` counts against the organization's sandbox limit (429).
    pub counts_toward_limit: bool,
}

pub const RULES: [Rule; 5] = [
    Rule {
        action: Action::Pause,
        from: S::Running,
        during: S::Snapshotting,
        done: S::Paused,
        failed: S::Running,
        counts_toward_limit: false,
    },
    Rule {
        action: Action::Resume,
        from: S::Paused,
        during: S::Unpausing,
        done: S::Running,
        failed: S::Paused,
        counts_toward_limit: true,
    },
    // With `kill_sandbox_after` a snapshot ends by deleting the sandbox instead.
    Rule {
        action: Action::Snapshot,
        from: S::Running,
        during: S::Snapshotting,
        done: S::Running,
        failed: S::Running,
        counts_toward_limit: false,
    },
    // A stop that fails still ends the VM: the sandbox is stopped either way.
    Rule {
        action: Action::Stop,
        from: S::Running,
        during: S::Stopping,
        done: S::Stopped,
        failed: S::Stopped,
        counts_toward_limit: false,
    },
    Rule {
        action: Action::Start,
        from: S::Stopped,
        during: S::Starting,
        done: S::Running,
        failed: S::Stopped,
        counts_toward_limit: true,
    },
];

pub fn rule(action: Action) -> &'static Rule {
    RULES.iter().find(|r| r.action == action).expect("every action has a rule")
}

/// A settled state: no operation in flight, nothing for recovery to do (but for a running
/// sandbox whose VM is gone).
#[cfg(test)]
pub fn settled(s: S) -> bool {
    matches!(s, S::Running | S::Paused | S::Stopped | S::Deleted)
}

#[cfg(test)]
mod tests {
    use super::super::recovery::{plan, settles, Facts};
    use super::*;
    use cove_store::Op;

    fn op_for(action: Action) -> Vec<Op> {
        match action {
            Action::Pause => vec![Op::Pause { image: "p".into() }],
            Action::Resume => vec![Op::Resume { image: "p".into() }],
            Action::Snapshot => [false, true]
                .map(|kill_after| Op::Snapshot { snapshot_id: "s".into(), image: "i".into(), kill_after })
                .to_vec(),
            Action::Stop => vec![Op::Stop],
            Action::Start => vec![Op::Start],
        }
    }

    #[test]
    fn rows_start_and_end_settled_and_pass_through_a_transient_state() {
        for r in &RULES {
            assert!(settled(r.from) && settled(r.done) && settled(r.failed), "{r:?}");
            assert!(!settled(r.during), "{r:?}");
            assert_eq!(RULES.iter().filter(|o| o.action == r.action).count(), 1, "{r:?}");
        }
    }

    /// Recovery settles a crash in the middle of any action into that action's done or failed
    /// state (or deletes the sandbox, for a snapshot with `kill_sandbox_after`), whatever the
    /// host reports.
    #[test]
    fn recovery_ends_every_action_where_the_table_says() {
        for r in &RULES {
            for op in op_for(r.action) {
                for bits in 0..8u8 {
                    let facts = Facts {
                        vm_alive: bits & 1 != 0,
                        image_complete: bits & 2 != 0,
                        vm_answers: bits & 4 != 0,
                    };
                    let steps = plan(r.during, Some(&op), Some("p"), facts);
                    // Gone counts as deleted; a capture's RunOnOrStop counts as running on.
                    let last = settles(r.during, &steps).unwrap_or(S::Deleted);
                    let kill_after = matches!(op, Op::Snapshot { kill_after: true, .. });
                    assert!(
                        last == r.done || last == r.failed || (kill_after && last == S::Deleted),
                        "{r:?} {op:?} {facts:?}: recovery ends in {last:?} ({steps:?})"
                    );
                }
            }
        }
    }
}
