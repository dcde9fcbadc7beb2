//! The fair queue of [`crate::control::LocalControl`]: a global concurrency limit, per-user running and queued limits, and
//! round-robin between users.
//!
//! Users take turns: the scheduler walks the users in turn order and starts the first
//! queued build of the first user who is below the per-user running limit and whose
//! build's workspace is free (two builds never run over one workspace at once); that
//! user then goes to the back of the turn order. So user A with ten queued builds and
//! user B with one alternate: B's build starts before A's third.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Mutex;

use kiln_telemetry::TraceParent;

use crate::config::QueueConfig;
use crate::metrics::BuildMetrics;

/// A queued build, as the scheduler sees it.
#[derive(Debug, Clone)]
pub struct Entry {
    pub build_id: String,
    pub owner: String,
    pub workspace_id: String,
    /// The trace of the StartBuild call that queued it: its run is a span of that trace
    /// although it starts later, in another task.
    pub trace: TraceParent,
    /// Open while the build waits; ended when the scheduler hands it out.
    pub queue_wait: tracing::Span,
    /// When it was queued (or re-queued at start-up), for the queue-wait metric.
    pub queued_at: std::time::Instant,
}

impl Entry {
    /// A build queued now, in the current span's trace (the StartBuild call's).
    pub fn new(build_id: String, owner: String, workspace_id: String) -> Self {
        let queue_wait = tracing::info_span!("build.queue_wait", build_id = %build_id);
        Self {
            build_id,
            owner,
            workspace_id,
            trace: TraceParent::current(),
            queued_at: std::time::Instant::now(),
            queue_wait,
        }
    }

    /// Ends the queue-wait span: the build leaves the queue.
    pub fn end_queue_wait(&mut self) {
        self.queue_wait = tracing::Span::none();
    }
}

#[derive(Debug, Default)]
struct State {
    queued: HashMap<String, VecDeque<Entry>>,
    turns: VecDeque<String>,
    running: usize,
    running_per_user: HashMap<String, usize>,
    busy_workspaces: HashSet<String>,
    /// Slots promised to StartBuild calls between their limit check and their insert.
    reserved: HashMap<String, usize>,
    closed: bool,
}

/// The queue. All methods are quick and never block on I/O.
#[derive(Debug)]
pub struct Queue {
    config: QueueConfig,
    state: Mutex<State>,
    pub wake: tokio::sync::Notify,
    /// The service's metrics; the queue keeps depth, wait and running up to date.
    metrics: BuildMetrics,
}

impl Queue {
    pub fn new(config: QueueConfig, metrics: BuildMetrics) -> Self {
        Self {
            config,
            state: Mutex::new(State::default()),
            wake: tokio::sync::Notify::new(),
            metrics,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn config(&self) -> QueueConfig {
        self.config
    }

    /// Reserves a queue slot for `owner`, or says how many builds it has queued already.
    pub fn reserve(&self, owner: &str) -> Result<(), usize> {
        let mut s = self.lock();
        let queued = s.queued.get(owner).map_or(0, VecDeque::len)
            + s.reserved.get(owner).copied().unwrap_or(0);
        if queued >= self.config.max_queued_per_user {
            return Err(queued);
        }
        *s.reserved.entry(owner.to_owned()).or_default() += 1;
        Ok(())
    }

    /// Gives back a reservation that did not become a build.
    pub fn release(&self, owner: &str) {
        let mut s = self.lock();
        if let Some(n) = s.reserved.get_mut(owner) {
            *n = n.saturating_sub(1);
        }
    }

    /// Queues a build (turning a reservation into it, if `reserved`) and returns its
    /// position (1: next to run).
    pub fn push(&self, entry: Entry, reserved: bool) -> u32 {
        let position = {
            let mut s = self.lock();
            if reserved && let Some(n) = s.reserved.get_mut(&entry.owner) {
                *n = n.saturating_sub(1);
            }
            if !s.turns.contains(&entry.owner) {
                s.turns.push_back(entry.owner.clone());
            }
            let owner = entry.owner.clone();
            let id = entry.build_id.clone();
            s.queued.entry(owner.clone()).or_default().push_back(entry);
            position_of(&s, &owner, &id).unwrap_or(1)
        };
        self.metrics.queued();
        self.wake.notify_one();
        position
    }

    /// Removes a queued build (cancel). False when it is not queued (any more).
    pub fn remove(&self, owner: &str, build_id: &str) -> bool {
        let mut s = self.lock();
        let Some(q) = s.queued.get_mut(owner) else {
            return false;
        };
        let before = q.len();
        q.retain(|e| e.build_id != build_id);
        let removed = before != q.len();
        if removed {
            self.metrics.dequeued();
        }
        removed
    }

    /// The position a build of `owner` would get if queued now.
    pub fn peek_position(&self, owner: &str) -> u32 {
        let s = self.lock();
        let index = s.queued.get(owner).map_or(0, VecDeque::len);
        let turn = s
            .turns
            .iter()
            .position(|u| u == owner)
            .unwrap_or(s.turns.len());
        estimate(&s, owner, index, turn)
    }

    /// The current position of a queued build.
    pub fn position(&self, owner: &str, build_id: &str) -> Option<u32> {
        position_of(&self.lock(), owner, build_id)
    }

    /// The next build to start, marking it running; `None` when nothing may start now.
    /// `claim` is asked for each candidate in turn order and may refuse it (`None`, e.g.
    /// its workspace is held); a refused build stays queued in place and counts nowhere.
    pub fn next<G>(&self, mut claim: impl FnMut(&Entry) -> Option<G>) -> Option<(Entry, G)> {
        let mut s = self.lock();
        if s.closed || s.running >= self.config.max_running {
            return None;
        }
        for turn in 0..s.turns.len() {
            let user = s.turns[turn].clone();
            if s.running_per_user.get(&user).copied().unwrap_or(0)
                >= self.config.max_running_per_user
            {
                continue;
            }
            let busy = &s.busy_workspaces;
            let Some((index, claimed)) = s.queued.get(&user).and_then(|q| {
                q.iter()
                    .enumerate()
                    .filter(|(_, e)| !busy.contains(&e.workspace_id))
                    .find_map(|(i, e)| claim(e).map(|c| (i, c)))
            }) else {
                continue;
            };
            let entry = s.queued.get_mut(&user).and_then(|q| q.remove(index))?;
            // The user goes to the back of the turn order; it stays there while it has
            // builds running, so that its next build waits for the others' turns.
            s.turns.remove(turn);
            s.turns.push_back(user.clone());
            if s.queued.get(&user).is_some_and(VecDeque::is_empty) {
                s.queued.remove(&user);
            }
            s.running += 1;
            *s.running_per_user.entry(user).or_default() += 1;
            s.busy_workspaces.insert(entry.workspace_id.clone());
            self.metrics.started(entry.queued_at.elapsed());
            return Some((entry, claimed));
        }
        None
    }

    /// A running build ended: frees its slots and wakes the scheduler.
    pub fn finished(&self, entry: &Entry) {
        {
            let mut s = self.lock();
            s.running = s.running.saturating_sub(1);
            if let Some(n) = s.running_per_user.get_mut(&entry.owner) {
                *n = n.saturating_sub(1);
            }
            s.busy_workspaces.remove(&entry.workspace_id);
            self.metrics.finished();
            // Users with nothing queued and nothing running leave the turn order.
            let owner = entry.owner.clone();
            let idle = !s.queued.contains_key(&owner)
                && s.running_per_user.get(&owner).copied().unwrap_or(0) == 0;
            if idle {
                s.turns.retain(|u| *u != owner);
                s.running_per_user.remove(&owner);
            }
        }
        self.wake.notify_one();
    }

    /// Whether a build of the workspace is running now.
    pub fn workspace_busy(&self, workspace_id: &str) -> bool {
        self.lock().busy_workspaces.contains(workspace_id)
    }

    /// Stops starting builds (shutdown).
    pub fn close(&self) {
        self.lock().closed = true;
        self.wake.notify_one();
    }

    pub fn is_closed(&self) -> bool {
        self.lock().closed
    }
}

/// Where a queued build would start if users took turns one build per round in the
/// current turn order (an estimate: per-user running limits and busy workspaces can
/// reorder it).
fn position_of(s: &State, owner: &str, build_id: &str) -> Option<u32> {
    let index = s
        .queued
        .get(owner)?
        .iter()
        .position(|e| e.build_id == build_id)?;
    let owner_turn = s.turns.iter().position(|u| u == owner)?;
    Some(estimate(s, owner, index, owner_turn))
}

/// Builds ahead of the `index`-th build of `owner` whose turn is `owner_turn`, plus one.
fn estimate(s: &State, owner: &str, index: usize, owner_turn: usize) -> u32 {
    let turns: Vec<&str> = s.turns.iter().map(String::as_str).collect();
    estimate_position(
        &turns,
        |user| s.queued.get(user).map_or(0, VecDeque::len),
        owner,
        index,
        owner_turn,
    )
}

/// Where the `index`-th queued build of `owner` would start if users took turns one
/// build per round: `turns` is the turn order, `owner_turn` the owner's place in it (its
/// length when the owner has no turn yet), `queued` each user's queued builds.
pub(crate) fn estimate_position(
    turns: &[&str],
    queued: impl Fn(&str) -> usize,
    owner: &str,
    index: usize,
    owner_turn: usize,
) -> u32 {
    let ahead: usize = turns
        .iter()
        .enumerate()
        .filter(|(_, user)| **user != owner)
        .map(|(t, user)| {
            let len = queued(user);
            match t.cmp(&owner_turn) {
                std::cmp::Ordering::Less => len.min(index + 1),
                _ => len.min(index),
            }
        })
        .sum();
    u32::try_from(ahead + index + 1).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(build: &str, owner: &str, ws: &str) -> Entry {
        Entry::new(build.into(), owner.into(), ws.into())
    }

    #[test]
    fn a_build_whose_workspace_cannot_be_claimed_waits_without_taking_a_slot() {
        let queue = Queue::new(
            QueueConfig {
                max_running: 1,
                ..QueueConfig::default()
            },
            BuildMetrics::default(),
        );
        queue.push(entry("a1", "alice", "held"), false);
        queue.push(entry("a2", "alice", "free"), false);
        queue.push(entry("b1", "bob", "free-b"), false);
        let claim_free = |e: &Entry| (e.workspace_id != "held").then_some(());
        let (first, ()) = queue.next(claim_free).expect("a claimable build starts");
        assert_eq!(first.build_id, "a2", "alice's next build that can start");
        assert!(queue.next(claim_free).is_none(), "the one slot is taken");
        queue.finished(&first);
        let (second, ()) = queue.next(claim_free).expect("bob's turn");
        assert_eq!(second.build_id, "b1");
        queue.finished(&second);
        assert!(
            queue.next(claim_free).is_none(),
            "a1 stays queued while its workspace is held"
        );
        assert_eq!(
            queue.position("alice", "a1"),
            Some(1),
            "and keeps its place"
        );
        let (third, ()) = queue.next(|_| Some(())).expect("released");
        assert_eq!(third.build_id, "a1");
    }
}
