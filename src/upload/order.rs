//! The order in which one batch's paths are prepared and uploaded, as pure bookkeeping without I/O.
//!
//! The engine tells an [`Order`] what finished; the order says what may start next. Its rules:
//! - a path's narinfo is published only once every reference it has in the batch is published, so the cache never
//!   holds a narinfo whose references it lacks; its NAR may go up before that (a NAR without a narinfo is
//!   invisible to Nix), so a chain's NARs travel side by side and only the small narinfo writes queue up;
//! - a path whose reference failed fails too, without its narinfo being written;
//! - at most `workers` preparations and `workers` NAR uploads run at once, lowest topological index first;
//! - at most `2 × workers` prepared NARs wait on disk (ready, or stored and waiting to be published), except that
//!   a path whose references are all published may always start: the lowest unfinished path has that property,
//!   so the batch cannot deadlock;
//! - after shutdown nothing new is prepared, and what never started is reported as cancelled.

/// Where one path stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    Waiting,
    Preparing,
    Prepared,
    /// Its NAR is being sent.
    Uploading,
    /// Its NAR is in the cache; the narinfo waits for the references'.
    Stored,
    /// Its narinfo is being written.
    Publishing,
    Finished {
        ok: bool,
    },
}

/// What the engine should start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// Upload the prepared path at this index (its narinfo waits for [`Start::Publish`]).
    Upload(usize),
    /// Let the path at this index, whose NAR is stored, write its narinfo.
    Publish(usize),
    /// Prepare the path at this index.
    Prepare(usize),
}

/// The state of one batch: paths by index in topological order, each with its references' indices.
#[derive(Debug)]
pub struct Order {
    deps: Vec<Vec<usize>>,
    slots: Vec<Slot>,
    workers: usize,
    preparing: usize,
    uploading: usize,
}

impl Order {
    /// An order for paths whose in-batch references are `deps[i]` (indices; self-references are ignored),
    /// with `workers` preparations and uploads at once.
    pub fn new(deps: Vec<Vec<usize>>, workers: usize) -> Order {
        let deps = deps
            .into_iter()
            .enumerate()
            .map(|(i, refs)| refs.into_iter().filter(|&j| j != i).collect())
            .collect::<Vec<Vec<usize>>>();
        Order {
            slots: vec![Slot::Waiting; deps.len()],
            deps,
            workers: workers.max(1),
            preparing: 0,
            uploading: 0,
        }
    }

    /// Fails every path not yet publishing one of whose references failed. Returns `(path, failed reference)`
    /// pairs, in index order; along a chain the whole tail fails at once. (A referrer prepared or stored ahead of
    /// its reference would otherwise wait forever and end the batch reported as cancelled; the engine drops its
    /// NAR, or its gate, so its narinfo is never written.) A referrer still sending its NAR fails once stored.
    pub fn fail_dependents(&mut self) -> Vec<(usize, usize)> {
        let mut failed = Vec::new();
        for i in 0..self.slots.len() {
            if !matches!(self.slots[i], Slot::Waiting | Slot::Prepared | Slot::Stored) {
                continue;
            }
            if let Some(&j) = self.deps[i]
                .iter()
                .find(|&&j| self.slots[j] == Slot::Finished { ok: false })
            {
                self.slots[i] = Slot::Finished { ok: false };
                failed.push((i, j));
            }
        }
        failed
    }

    fn references_done(&self, i: usize) -> bool {
        self.deps[i]
            .iter()
            .all(|&j| self.slots[j] == Slot::Finished { ok: true })
    }

    /// What may start now: narinfos of stored paths whose references are in, uploads of prepared paths, then
    /// preparations (none once `may_prepare` is false, after shutdown). The paths returned are marked as started.
    pub fn next(&mut self, may_prepare: bool) -> Vec<Start> {
        let mut starts = Vec::new();
        for i in 0..self.slots.len() {
            if self.slots[i] == Slot::Stored && self.references_done(i) {
                self.slots[i] = Slot::Publishing;
                starts.push(Start::Publish(i));
            }
        }
        for i in 0..self.slots.len() {
            if self.uploading >= self.workers {
                break;
            }
            if self.slots[i] == Slot::Prepared {
                self.slots[i] = Slot::Uploading;
                self.uploading += 1;
                starts.push(Start::Upload(i));
            }
        }
        if !may_prepare {
            return starts;
        }
        let staged_limit = 2 * self.workers;
        let staged = self
            .slots
            .iter()
            .filter(|s| matches!(s, Slot::Prepared | Slot::Preparing | Slot::Stored))
            .count();
        for i in 0..self.slots.len() {
            if self.preparing >= self.workers {
                break;
            }
            if self.slots[i] == Slot::Waiting
                && (staged + self.preparing < staged_limit || self.references_done(i))
            {
                self.slots[i] = Slot::Preparing;
                self.preparing += 1;
                starts.push(Start::Prepare(i));
            }
        }
        starts
    }

    /// Path `i` has its NAR ready.
    pub fn prepared(&mut self, i: usize) {
        if self.slots[i] == Slot::Preparing {
            self.preparing -= 1;
            self.slots[i] = Slot::Prepared;
        }
    }

    /// Path `i` has its NAR in the cache; its narinfo waits for [`Start::Publish`].
    pub fn stored(&mut self, i: usize) {
        if self.slots[i] == Slot::Uploading {
            self.uploading -= 1;
            self.slots[i] = Slot::Stored;
        }
    }

    /// Path `i` is in the cache, narinfo and all.
    pub fn uploaded(&mut self, i: usize) {
        match self.slots[i] {
            Slot::Uploading => self.uploading -= 1,
            Slot::Stored | Slot::Publishing => {}
            Slot::Waiting | Slot::Preparing | Slot::Prepared | Slot::Finished { .. } => return,
        }
        self.slots[i] = Slot::Finished { ok: true };
    }

    /// Preparing or uploading path `i` failed.
    pub fn failed(&mut self, i: usize) {
        match self.slots[i] {
            Slot::Uploading => self.uploading -= 1,
            Slot::Preparing => self.preparing -= 1,
            Slot::Waiting
            | Slot::Prepared
            | Slot::Stored
            | Slot::Publishing
            | Slot::Finished { .. } => {}
        }
        self.slots[i] = Slot::Finished { ok: false };
    }

    /// Whether path `i` has its result already (an upload that ends after that, e.g. because its gate was
    /// dropped, has nothing more to report).
    pub fn is_finished(&self, i: usize) -> bool {
        matches!(self.slots[i], Slot::Finished { .. })
    }

    /// Fails every path that has not started, waits with a prepared NAR, or waits to publish (the credentials
    /// were refused, so nothing else can succeed). Returns their indices; the engine drops their prepared NARs
    /// and gates.
    pub fn fail_pending(&mut self) -> Vec<usize> {
        let mut failed = Vec::new();
        for (i, slot) in self.slots.iter_mut().enumerate() {
            if matches!(slot, Slot::Waiting | Slot::Prepared | Slot::Stored) {
                *slot = Slot::Finished { ok: false };
                failed.push(i);
            }
        }
        failed
    }

    /// Whether nothing is being prepared, uploaded or published.
    pub fn is_idle(&self) -> bool {
        self.preparing == 0
            && self.uploading == 0
            && !self
                .slots
                .iter()
                .any(|s| matches!(s, Slot::Stored | Slot::Publishing))
    }

    /// The paths that did not finish, in index order.
    pub fn unfinished(&self) -> Vec<usize> {
        (0..self.slots.len())
            .filter(|&i| !matches!(self.slots[i], Slot::Finished { .. }))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs an order to the end the way the engine does, finishing one started task at a time (oldest first).
    /// `fails(i)` says whether path `i`'s preparation fails; `cancel_after` stops new preparations once that many
    /// events were handled. Returns the uploads in order, the failed paths and the unfinished ones.
    fn run(
        deps: Vec<Vec<usize>>,
        workers: usize,
        fails: impl Fn(usize) -> bool,
        cancel_after: Option<usize>,
    ) -> (Vec<usize>, Vec<usize>, Vec<usize>) {
        let mut order = Order::new(deps.clone(), workers);
        let mut running: std::collections::VecDeque<Start> = Default::default();
        let (mut uploaded, mut failed) = (Vec::new(), Vec::new());
        let mut events = 0;
        loop {
            failed.extend(order.fail_dependents().into_iter().map(|(i, _)| i));
            let cancelled = cancel_after.is_some_and(|n| events >= n);
            for start in order.next(!cancelled) {
                running.push_back(start);
                // Never more than `workers` preparations, nor `workers` NAR uploads, at once.
                if !matches!(start, Start::Publish(_)) {
                    let same = running
                        .iter()
                        .filter(|s| std::mem::discriminant(*s) == std::mem::discriminant(&start))
                        .count();
                    assert!(same <= workers, "{same} running at once");
                }
                if let Start::Publish(i) = start {
                    for &j in &deps[i] {
                        assert!(
                            uploaded.contains(&j) || j == i,
                            "{i} before its reference {j}"
                        );
                    }
                }
            }
            let Some(event) = running.pop_front() else {
                break;
            };
            events += 1;
            match event {
                Start::Prepare(i) if fails(i) => {
                    order.failed(i);
                    failed.push(i);
                }
                Start::Prepare(i) => order.prepared(i),
                Start::Upload(i) => order.stored(i),
                Start::Publish(i) => {
                    order.uploaded(i);
                    uploaded.push(i);
                }
            }
            if cancelled && order.is_idle() {
                break;
            }
        }
        failed.sort_unstable();
        (uploaded, failed, order.unfinished())
    }

    #[test]
    fn a_chain_goes_up_one_link_at_a_time() {
        let deps = vec![vec![], vec![0], vec![1], vec![2]];
        let (uploaded, failed, unfinished) = run(deps, 2, |_| false, None);
        assert_eq!(uploaded, [0, 1, 2, 3]);
        assert!(failed.is_empty() && unfinished.is_empty());
    }

    #[test]
    fn a_diamond_uploads_the_top_last() {
        // 0 ← 1, 0 ← 2, {1, 2} ← 3
        let deps = vec![vec![], vec![0], vec![0], vec![1, 2]];
        let (uploaded, failed, _) = run(deps, 4, |_| false, None);
        assert_eq!(uploaded.first(), Some(&0));
        assert_eq!(uploaded.last(), Some(&3));
        assert_eq!(uploaded.len(), 4);
        assert!(failed.is_empty());
    }

    #[test]
    fn self_references_do_not_block() {
        let (uploaded, _, _) = run(vec![vec![0], vec![0, 1]], 1, |_| false, None);
        assert_eq!(uploaded, [0, 1]);
    }

    #[test]
    fn a_failure_in_the_middle_holds_back_what_needs_it_and_nothing_else() {
        // A chain 0 ← 1 ← 2 ← 3 beside an independent 4; 1 fails.
        let deps = vec![vec![], vec![0], vec![1], vec![2], vec![]];
        let (uploaded, failed, unfinished) = run(deps, 1, |i| i == 1, None);
        assert_eq!(failed, [1, 2, 3]);
        assert!(uploaded.contains(&0) && uploaded.contains(&4));
        assert!(!uploaded.contains(&2) && !uploaded.contains(&3));
        assert!(unfinished.is_empty());
    }

    // See: #15
    #[test]
    fn a_referrer_prepared_before_its_reference_failed_fails_too() {
        let mut order = Order::new(vec![vec![], vec![0]], 2);
        assert_eq!(order.next(true), [Start::Prepare(0), Start::Prepare(1)]);
        order.prepared(1);
        order.failed(0);
        assert_eq!(order.fail_dependents(), [(1, 0)]);
        assert!(order.unfinished().is_empty());
        assert!(order.is_idle());
    }

    #[test]
    fn dependents_name_the_reference_that_failed() {
        let mut order = Order::new(vec![vec![], vec![0], vec![0, 1]], 1);
        assert_eq!(order.next(true), [Start::Prepare(0)]);
        order.failed(0);
        assert_eq!(order.fail_dependents(), [(1, 0), (2, 0)]);
        assert!(order.next(true).is_empty());
        assert!(order.unfinished().is_empty());
    }

    #[test]
    fn prepared_nars_waiting_on_disk_are_bounded() {
        // Nine paths on top of path 0, whose upload never finishes: preparation stops at 2 × workers staged.
        let mut deps = vec![vec![0]; 10];
        deps[0].clear();
        let mut order = Order::new(deps, 2);
        let mut prepared = 0;
        loop {
            let starts = order.next(true);
            let prepares: Vec<usize> = starts
                .iter()
                .filter_map(|s| match s {
                    Start::Prepare(i) => Some(*i),
                    Start::Upload(_) | Start::Publish(_) => None,
                })
                .collect();
            if prepares.is_empty() {
                break;
            }
            for i in prepares {
                order.prepared(i);
                prepared += 1;
            }
        }
        // Paths 0 and 1 sending their NARs (which never arrive), four staged on disk.
        assert_eq!(prepared, 2 + 4);
        assert_eq!(order.unfinished().len(), 10);
    }

    #[test]
    fn a_path_whose_references_are_in_may_always_start() {
        // 1..=4 wait on 5, whose only reference is 0: once two of them are stored and waiting to be published
        // (the staging limit, 2), 3 and 4 may not be prepared, but 5 may.
        let deps = vec![vec![], vec![5], vec![5], vec![5], vec![5], vec![0]];
        let mut order = Order::new(deps, 1);
        assert_eq!(order.next(true), [Start::Prepare(0)]);
        order.prepared(0);
        assert_eq!(order.next(true), [Start::Upload(0), Start::Prepare(1)]);
        order.stored(0);
        assert_eq!(order.next(true), [Start::Publish(0)]);
        order.uploaded(0);
        order.prepared(1);
        assert_eq!(order.next(true), [Start::Upload(1), Start::Prepare(2)]);
        order.stored(1);
        order.prepared(2);
        assert_eq!(order.next(true), [Start::Upload(2), Start::Prepare(3)]);
        order.stored(2);
        order.prepared(3);
        assert_eq!(order.next(true), [Start::Upload(3), Start::Prepare(5)]);
    }

    /// Three paths, two workers, past the point where 0 and 1 send their NARs and 2 is being prepared.
    fn sending_two(deps: Vec<Vec<usize>>) -> Order {
        let mut order = Order::new(deps, 2);
        assert_eq!(order.next(true), [Start::Prepare(0), Start::Prepare(1)]);
        order.prepared(0);
        order.prepared(1);
        assert_eq!(
            order.next(true),
            [Start::Upload(0), Start::Upload(1), Start::Prepare(2)]
        );
        order
    }

    #[test]
    fn a_chain_sends_its_nars_side_by_side_and_publishes_in_order() {
        let mut order = sending_two(vec![vec![], vec![0], vec![1]]);
        // 1's NAR arrives first: its narinfo still waits for 0's.
        order.stored(1);
        assert!(order.next(true).is_empty());
        order.stored(0);
        assert_eq!(order.next(true), [Start::Publish(0)]);
        order.prepared(2);
        assert_eq!(order.next(true), [Start::Upload(2)]);
        order.uploaded(0);
        assert_eq!(order.next(true), [Start::Publish(1)]);
        order.stored(2);
        assert!(order.next(true).is_empty());
        order.uploaded(1);
        assert_eq!(order.next(true), [Start::Publish(2)]);
        order.uploaded(2);
        assert!(order.is_idle() && order.unfinished().is_empty());
    }

    #[test]
    fn a_stored_referrer_of_a_failed_path_is_never_published() {
        let mut order = sending_two(vec![vec![], vec![0], vec![0]]);
        order.stored(1);
        order.prepared(2);
        assert_eq!(order.next(true), [Start::Upload(2)]);
        // 2 is still sending its NAR when 0 fails: it fails once its NAR is stored.
        order.failed(0);
        assert_eq!(order.fail_dependents(), [(1, 0)]);
        assert!(order.is_finished(1) && !order.is_idle());
        order.stored(2);
        assert_eq!(order.fail_dependents(), [(2, 0)]);
        assert!(order.next(true).is_empty());
        assert!(order.is_idle() && order.unfinished().is_empty());
    }

    #[test]
    fn cancellation_lets_running_work_finish_and_starts_nothing_new() {
        let deps = vec![vec![], vec![0], vec![1], vec![], vec![]];
        let (uploaded, failed, unfinished) = run(deps, 1, |_| false, Some(1));
        // Path 0 was being prepared when shutdown came; nothing after it started.
        assert!(uploaded.is_empty() || uploaded == [0], "{uploaded:?}");
        assert!(failed.is_empty());
        assert!(unfinished.contains(&4) && unfinished.contains(&2));
    }

    #[test]
    fn refused_credentials_fail_everything_not_running() {
        let mut order = Order::new(vec![vec![], vec![], vec![], vec![]], 2);
        assert_eq!(order.next(true), [Start::Prepare(0), Start::Prepare(1)]);
        order.prepared(0);
        assert_eq!(order.next(true), [Start::Upload(0), Start::Prepare(2)]);
        order.failed(0);
        // 1 and 2 are still preparing; 3 waits.
        assert_eq!(order.fail_pending(), [3]);
        order.prepared(1);
        assert_eq!(order.fail_pending(), [1]);
        assert_eq!(order.unfinished(), [2]);
        assert!(!order.is_idle());
    }
}
