//! The sandbox state machine as data. Each lifecycle action has one row: the states it starts
//! from, the in-flight state recorded (with the operation, before any side effect on the host),
//! where it ends when the host step succeeds, and where it ends when the host step fails with
//! nothing lost. `Core` reads its transitions from here ([`Core::begin`](super::Core), `finish`,
//! `fall_back`, `lock_for`, the creation of records and `delete`); crash recovery
//! ([`super::recovery::plan`]) settles every in-flight state into one of its row's ends, which
//! the tests below check.
//!
//! To add an action: a row here, a variant of `cove_store::Op` if it needs one in flight, its
//! recovery in `recovery::plan`, the method in `Core` that does the host's part, and a case in
//! `tests/control.rs`, whose error and crash tests then break it at every host step.

use cove_api::sandbox::SandboxState as S;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Create,
    Restore,
    Pause,
    Resume,
    Snapshot,
    Stop,
    Start,
    Delete,
}

/// Where an action leaves a sandbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    In(S),
    /// Its record and everything of it on the host are gone.
    Gone,
}

impl End {
    /// The state, for an action that keeps the sandbox.
    pub fn state(self) -> S {
        match self {
            End::In(s) => s,
            End::Gone => panic!("the sandbox is gone at this end of its action"),
        }
    }
}

#[derive(Debug)]
pub struct Rule {
    pub action: Action,
    /// The states the action starts from (any other is a 409 naming it); none for an action
    /// that makes a new sandbox.
    pub from: &'static [S],
    /// Recorded, with the operation, before the host is touched.
    pub during: S,
    /// Where the action ends when the host step succeeds.
    pub done: End,
    /// Where it ends when the host step fails; nothing of the sandbox is lost.
    pub failed: End,
    /// Whether entering `during` counts against the organization's sandbox limit.
    pub counts_toward_limit: bool,
}

pub const RULES: [Rule; 8] = [
    // A new sandbox from a template; one that fails to start leaves nothing.
    Rule {
        action: Action::Create,
        from: &[],
        during: S::Starting,
        done: End::In(S::Running),
        failed: End::Gone,
        counts_toward_limit: true,
    },
    // A new sandbox from a snapshot.
    Rule {
        action: Action::Restore,
        from: &[],
        during: S::Starting,
        done: End::In(S::Running),
        failed: End::Gone,
        counts_toward_limit: true,
    },
    Rule {
        action: Action::Pause,
        from: &[S::Running],
        during: S::Snapshotting,
        done: End::In(S::Paused),
        failed: End::In(S::Running),
        counts_toward_limit: false,
    },
    Rule {
        action: Action::Resume,
        from: &[S::Paused],
        during: S::Unpausing,
        done: End::In(S::Running),
        failed: End::In(S::Paused),
        counts_toward_limit: true,
    },
    // With `kill_sandbox_after` a snapshot ends by deleting the sandbox instead.
    Rule {
        action: Action::Snapshot,
        from: &[S::Running],
        during: S::Snapshotting,
        done: End::In(S::Running),
        failed: End::In(S::Running),
        counts_toward_limit: false,
    },
    // A stop that fails still ends the VM: the sandbox is stopped either way.
    Rule {
        action: Action::Stop,
        from: &[S::Running],
        during: S::Stopping,
        done: End::In(S::Stopped),
        failed: End::In(S::Stopped),
        counts_toward_limit: false,
    },
    Rule {
        action: Action::Start,
        from: &[S::Stopped],
        during: S::Starting,
        done: End::In(S::Running),
        failed: End::In(S::Stopped),
        counts_toward_limit: true,
    },
    // A delete that fails on the host stays `deleting`: the client's next delete, or the next
    // server's recovery, finishes it.
    Rule {
        action: Action::Delete,
        from: &[S::Running, S::Paused, S::Stopped, S::Lost, S::Deleting],
        during: S::Deleting,
        done: End::Gone,
        failed: End::In(S::Deleting),
        counts_toward_limit: false,
    },
];

pub fn rule(action: Action) -> &'static Rule {
    RULES.iter().find(|r| r.action == action).expect("every action has a rule")
}

/// The states of `from` in words, for a 409: "running", "running, paused or stopped".
pub fn describe(from: &[S]) -> String {
    let names: Vec<&str> = from.iter().map(|s| s.as_str()).collect();
    match names.split_last() {
        None => String::new(),
        Some((last, [])) => last.to_string(),
        Some((last, rest)) => format!("{} or {last}", rest.join(", ")),
    }
}

/// A settled state: no operation in flight, nothing for recovery to do (but for a running
/// sandbox whose VM is gone).
#[cfg(test)]
pub fn settled(s: S) -> bool {
    matches!(s, S::Running | S::Paused | S::Stopped | S::Deleted | S::Lost)
}

#[cfg(test)]
mod tests {
    use super::super::recovery::{plan, settles, Facts};
    use super::*;
    use cove_store::Op;

    fn ops_for(action: Action) -> Vec<Option<Op>> {
        let ops = match action {
            Action::Create => vec![Op::Create],
            Action::Restore => vec![Op::Restore { snapshot_id: "s".into() }],
            Action::Pause => vec![Op::Pause { image: "p".into() }],
            Action::Resume => vec![Op::Resume { image: "p".into() }],
            Action::Snapshot => [false, true]
                .map(|kill_after| Op::Snapshot { snapshot_id: "s".into(), image: "i".into(), kill_after })
                .to_vec(),
            Action::Stop => vec![Op::Stop],
            Action::Start => vec![Op::Start],
            // A delete records no operation: its state says it all.
            Action::Delete => return vec![None],
        };
        ops.into_iter().map(Some).collect()
    }

    #[test]
    fn rows_start_and_end_settled_and_pass_through_a_transient_state() {
        let settled_end = |e: End| matches!(e, End::Gone) || settled(e.state());
        for r in &RULES {
            let retried = r.action == Action::Delete;
            assert!(r.from.iter().all(|s| settled(*s) || (retried && *s == r.during)), "{r:?}");
            assert!(settled_end(r.done) && (settled_end(r.failed) || retried), "{r:?}");
            assert!(!settled(r.during), "{r:?}");
            assert_eq!(RULES.iter().filter(|o| o.action == r.action).count(), 1, "{r:?}");
        }
        assert_eq!(describe(rule(Action::Delete).from), "running, paused, stopped, lost or deleting");
        assert_eq!(describe(rule(Action::Pause).from), "running");
    }

    /// Recovery settles a crash in the middle of any action into that action's done or failed
    /// end (or deletes the sandbox, for a snapshot with `kill_sandbox_after`), whatever the
    /// host reports.
    #[test]
    fn recovery_ends_every_action_where_the_table_says() {
        for r in &RULES {
            for op in ops_for(r.action) {
                for bits in 0..8u8 {
                    let facts = Facts {
                        vm_alive: bits & 1 != 0,
                        image_complete: bits & 2 != 0,
                        vm_answers: bits & 4 != 0,
                    };
                    let steps = plan(r.during, op.as_ref(), Some("p"), facts);
                    // A capture's RunOnOrStop counts as running on.
                    let end = settles(r.during, &steps).map_or(End::Gone, End::In);
                    let kill_after = matches!(op, Some(Op::Snapshot { kill_after: true, .. }));
                    assert!(
                        end == r.done || end == r.failed || (kill_after && end == End::Gone),
                        "{r:?} {op:?} {facts:?}: recovery ends in {end:?} ({steps:?})"
                    );
                }
            }
        }
    }
}
