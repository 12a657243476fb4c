//! The service's work queue: requests waiting for the model, and the rule that picks the rows
//! of each model step.
//!
//! A request is admitted by a [`Ticket`] (taken before anything else about it is recorded, so a
//! full queue refuses it without a trace), then queued whole. The compute thread asks for
//! [`Step`]s: rows from the waiting requests, the request that has been served the fewest
//! tokens first (least attained service), up to a token budget of about `fair_step` of model
//! time. So a one-row request that arrives while a large one runs waits at most about one step,
//! and large requests share the model between them. Small requests not yet served are taken
//! whole beyond the budget (many clients with one conversation each still batch together),
//! and the oldest request moves at least once a round of the others (nothing starves). A request that has had the
//! model to itself for a second gets larger steps (`alone`, faster per row); the first
//! newcomer after such a quiet spell waits for one of them, and the steps shrink.
//!
//! This module never runs the model and never answers a request; it only orders rows.

use crate::conversation::Row;
use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// What a request wants done with its rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Classify,
    Embed,
}

struct Entry<P> {
    id: u64,
    kind: Kind,
    rows: VecDeque<(Row, usize)>,
    served: usize,
    /// Tokens handed out to all requests (`State::given`) when this one last moved or arrived.
    moved: u64,
    /// Handed over with the entry's last rows.
    payload: Option<P>,
}

struct State<P> {
    entries: Vec<Entry<P>>,
    reserved: usize,
    closed: bool,
    next_id: u64,
    /// When two requests last waited at once.
    contended: Option<Instant>,
    /// Tokens handed out in steps so far.
    given: u64,
}

/// The queue; shared between the request side and the compute thread.
pub struct Queue<P> {
    state: Mutex<State<P>>,
    wake: Condvar,
    capacity: usize,
}

/// Why a request was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// `capacity` requests are queued or admitted.
    Full(usize),
    /// The queue is closed (shutting down).
    Closed,
}

/// An admitted place in the queue; dropped unused, the place is given back.
pub struct Ticket<P> {
    queue: Arc<Queue<P>>,
    used: bool,
}

/// Part of one request in a step.
pub struct Part<P> {
    pub id: u64,
    pub kind: Kind,
    pub rows: Vec<Row>,
    /// The request's payload when these are its last rows.
    pub last: Option<P>,
}

/// Rows for one model run.
pub struct Step<P> {
    pub parts: Vec<Part<P>>,
    pub tokens: usize,
    /// Requests waiting when the step was formed (the queue-depth gauge).
    pub waiting: usize,
}

/// How large a step may be.
#[derive(Debug, Clone, Copy)]
pub struct Budget {
    /// Tokens per step: about `fair_step` of model time, so a request that arrives while a
    /// step runs waits little for it.
    pub step: usize,
    /// Tokens per step while one request has had the model to itself for `quiet` (large
    /// steps run faster; a newcomer after a quiet spell waits one such step, then the steps
    /// shrink).
    pub alone: usize,
    pub quiet: Duration,
    /// A request not yet served and at most this large is taken whole whatever the step's
    /// size, so many small requests still batch together (up to `max`).
    pub whole: usize,
    /// Tokens per step at most, whatever else.
    pub max: usize,
    /// When the last step held several requests and this one is not full, wait this long for
    /// more to arrive (continuous batching under concurrency).
    pub linger: Duration,
}

impl<P> Queue<P> {
    pub fn new(capacity: usize) -> Arc<Queue<P>> {
        Arc::new(Queue {
            state: Mutex::new(State {
                entries: Vec::new(),
                reserved: 0,
                closed: false,
                next_id: 0,
                contended: None,
                given: 0,
            }),
            wake: Condvar::new(),
            capacity: capacity.max(1),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State<P>> {
        // A panic while holding this lock cannot leave it half-updated (every update is a
        // few field assignments); keep serving.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Admits one request, or says why not.
    pub fn reserve(self: &Arc<Self>) -> Result<Ticket<P>, Refused> {
        let mut st = self.lock();
        if st.closed {
            return Err(Refused::Closed);
        }
        if st.entries.len() + st.reserved >= self.capacity {
            return Err(Refused::Full(self.capacity));
        }
        st.reserved += 1;
        Ok(Ticket {
            queue: self.clone(),
            used: false,
        })
    }

    /// Requests queued or admitted.
    pub fn depth(&self) -> usize {
        let st = self.lock();
        st.entries.len() + st.reserved
    }

    /// No new admissions; what is queued or admitted is still served.
    pub fn close(&self) {
        self.lock().closed = true;
        self.wake.notify_all();
    }

    /// The next step (blocking until there is work); `None` once the queue is closed and
    /// drained. `concurrent`: the previous step held several requests.
    pub fn next_step(&self, budget: Budget, concurrent: bool) -> Option<Step<P>> {
        let mut st = self.lock();
        loop {
            if !st.entries.is_empty() {
                break;
            }
            if st.closed && st.reserved == 0 {
                return None;
            }
            st = self.wake.wait(st).unwrap_or_else(|e| e.into_inner());
        }
        if st.entries.len() > 1 {
            st.contended = Some(Instant::now());
        }
        let quiet = st.contended.is_none_or(|t| t.elapsed() >= budget.quiet);
        let limit = if st.entries.len() == 1 && quiet {
            budget.alone
        } else {
            budget.step
        }
        .max(1);
        // Under concurrency, give a small batch a moment to fill.
        if concurrent && !budget.linger.is_zero() {
            let until = Instant::now() + budget.linger;
            loop {
                let queued: usize = st
                    .entries
                    .iter()
                    .flat_map(|e| e.rows.iter().map(|r| r.1))
                    .sum();
                let left = until.saturating_duration_since(Instant::now());
                if queued >= limit || left.is_zero() {
                    break;
                }
                st = self
                    .wake
                    .wait_timeout(st, left)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
        }
        let waiting = st.entries.len();
        let given = st.given;
        let oldest = st.entries.iter().map(|e| e.id).min();
        // Least attained service first; among equals (requests not served yet) the one with
        // less left, so a new one-row request goes before a new large one; then by arrival.
        st.entries
            .sort_by_cached_key(|e| (e.served, e.rows.iter().map(|r| r.1).sum::<usize>(), e.id));
        let mut parts: Vec<Part<P>> = Vec::new();
        let mut tokens = 0;
        // Whether the step holds a request taken whole (small, not served before).
        let mut fresh = false;
        let take = |e: &mut Entry<P>, tokens: &mut usize, whole: bool| {
            let mut rows = Vec::new();
            while let Some(&(_, t)) = e.rows.front() {
                let room = if whole { budget.max } else { limit };
                // Always at least one row per step, whatever its size.
                if *tokens > 0 && *tokens + t > room {
                    break;
                }
                let (r, t) = e.rows.pop_front().expect("checked");
                *tokens += t;
                e.served += t;
                e.moved = given;
                rows.push(r);
            }
            rows
        };
        for e in st.entries.iter_mut() {
            let left: usize = e.rows.iter().map(|r| r.1).sum();
            let whole = e.served == 0 && left <= budget.whole;
            if tokens >= limit && !whole {
                continue;
            }
            let rows = take(e, &mut tokens, whole);
            if rows.is_empty() {
                continue;
            }
            fresh |= whole;
            let last = if e.rows.is_empty() {
                e.payload.take()
            } else {
                None
            };
            parts.push(Part {
                id: e.id,
                kind: e.kind,
                rows,
                last,
            });
        }
        // The oldest request moves at least once a round: when the others have been handed
        // more than a fair share each (`waiting` × a step, or × its next row if larger) since
        // it last moved, it gets a row in this step. Not in a step that holds a small new
        // request, though, unless it is four rounds late: its row would make that request wait
        // a long row's time (measured: it doubled the p99 of one-row requests beside large
        // ones); the next step takes it instead.
        if let Some(old) = oldest {
            if !parts.iter().any(|p| p.id == old) {
                if let Some(e) = st.entries.iter_mut().find(|e| {
                    let next = e.rows.front().map_or(0, |r| r.1);
                    let round = (waiting * limit.max(next)) as u64;
                    let skipped = given.saturating_sub(e.moved);
                    e.id == old && skipped > round && (!fresh || skipped > 4 * round)
                }) {
                    let mut none = 0;
                    let rows = take(e, &mut none, false);
                    tokens += none;
                    let last = if e.rows.is_empty() {
                        e.payload.take()
                    } else {
                        None
                    };
                    parts.push(Part {
                        id: e.id,
                        kind: e.kind,
                        rows,
                        last,
                    });
                }
            }
        }
        st.entries.retain(|e| !e.rows.is_empty());
        st.given += tokens as u64;
        Some(Step {
            parts,
            tokens,
            waiting,
        })
    }

    /// Requests not served yet and at most `limit` tokens each, taken whole (least first, then
    /// by arrival) up to `limit` tokens in all: what may run at a pause point of a long step.
    /// `None` at once when there are none; never waits.
    pub fn next_express(&self, limit: usize) -> Option<Step<P>> {
        let mut st = self.lock();
        let given = st.given;
        let mut picks: Vec<(usize, usize)> = st
            .entries
            .iter()
            .enumerate()
            .filter(|(_, e)| e.served == 0)
            .map(|(i, e)| (i, e.rows.iter().map(|r| r.1).sum::<usize>()))
            .filter(|&(_, left)| left <= limit)
            .collect();
        picks.sort_by_key(|&(i, left)| (left, st.entries[i].id));
        let mut tokens = 0;
        picks.retain(|&(_, left)| {
            let fits = tokens == 0 || tokens + left <= limit;
            tokens += if fits { left } else { 0 };
            fits
        });
        if picks.is_empty() {
            return None;
        }
        let waiting = st.entries.len();
        let mut taken: Vec<usize> = picks.iter().map(|p| p.0).collect();
        taken.sort_unstable();
        let mut parts = Vec::with_capacity(taken.len());
        for &i in taken.iter().rev() {
            let mut e = st.entries.remove(i);
            e.moved = given;
            parts.push(Part {
                id: e.id,
                kind: e.kind,
                rows: e.rows.into_iter().map(|r| r.0).collect(),
                last: e.payload.take(),
            });
        }
        parts.reverse();
        st.given += tokens as u64;
        Some(Step {
            parts,
            tokens,
            waiting,
        })
    }

    /// Removes a request that has rows left (a step of it failed); returns its payload.
    pub fn cancel(&self, id: u64) -> Option<P> {
        let mut st = self.lock();
        let i = st.entries.iter().position(|e| e.id == id)?;
        st.entries.remove(i).payload
    }
}

impl<P> Ticket<P> {
    /// Queues the request: rows with their estimated tokens. Never refused: the place was
    /// taken by the ticket. An empty request is handed back at once as a step of no rows.
    pub fn submit(mut self, kind: Kind, rows: Vec<(Row, usize)>, payload: P) -> u64 {
        self.used = true;
        let q = self.queue.clone();
        let mut st = q.lock();
        st.reserved -= 1;
        let id = st.next_id;
        st.next_id += 1;
        let now = st.given;
        st.entries.push(Entry {
            id,
            kind,
            rows: rows.into(),
            served: 0,
            moved: now,
            payload: Some(payload),
        });
        drop(st);
        q.wake.notify_all();
        id
    }
}

impl<P> Drop for Ticket<P> {
    fn drop(&mut self) {
        if !self.used {
            let mut st = self.queue.lock();
            st.reserved -= 1;
            drop(st);
            self.queue.wake.notify_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conversation::{Content, Row};

    fn row(i: usize) -> Row {
        Row {
            index: i as u64,
            id: i.to_string(),
            content: Ok(Content::Text("x".into())),
            label: None,
            passthrough: Vec::new(),
        }
    }

    fn budget() -> Budget {
        Budget {
            step: 100,
            alone: 1000,
            quiet: Duration::from_secs(3600),
            whole: 50,
            max: 1000,
            linger: Duration::ZERO,
        }
    }

    #[test]
    fn a_full_queue_refuses_and_an_unused_ticket_gives_its_place_back() {
        let q: Arc<Queue<()>> = Queue::new(2);
        let a = q.reserve().unwrap();
        let _b = q.reserve().unwrap();
        assert_eq!(q.reserve().err(), Some(Refused::Full(2)));
        drop(a);
        assert!(q.reserve().is_ok());
        q.close();
        assert_eq!(q.reserve().err(), Some(Refused::Closed));
    }

    #[test]
    fn a_small_request_goes_ahead_of_large_ones() {
        let q: Arc<Queue<&str>> = Queue::new(8);
        // Two large requests: 50 rows of 60 tokens each.
        for name in ["big1", "big2"] {
            let rows = (0..50).map(|i| (row(i), 60)).collect();
            q.reserve().unwrap().submit(Kind::Classify, rows, name);
        }
        let mut rows = 0;
        let mut done = Vec::new();
        let take = |s: Step<&'static str>, rows: &mut usize, done: &mut Vec<&str>| {
            for p in s.parts {
                *rows += p.rows.len();
                done.extend(p.last);
            }
        };
        // While both wait, steps stay within the shared budget (one row may exceed it).
        let s = q.next_step(budget(), false).unwrap();
        assert!(s.tokens <= 120, "{}", s.tokens);
        take(s, &mut rows, &mut done);
        let s = q.next_step(budget(), false).unwrap();
        take(s, &mut rows, &mut done);
        // A one-row request arrives: it is in the very next step, and first.
        q.reserve()
            .unwrap()
            .submit(Kind::Classify, vec![(row(0), 10)], "small");
        let s = q.next_step(budget(), false).unwrap();
        assert_eq!(s.parts[0].last, Some("small"));
        take(s, &mut rows, &mut done);
        // Everything is served once, each request's payload with its last rows.
        while q.depth() > 0 {
            let s = q.next_step(budget(), false).unwrap();
            take(s, &mut rows, &mut done);
        }
        done.sort();
        assert_eq!(done, vec!["big1", "big2", "small"]);
        assert_eq!(rows, 101);
    }

    #[test]
    fn alone_after_a_quiet_spell_a_request_gets_large_steps() {
        let q: Arc<Queue<u8>> = Queue::new(8);
        let quiet = Budget {
            quiet: Duration::ZERO,
            ..budget()
        };
        let rows = (0..100).map(|i| (row(i), 20)).collect();
        q.reserve().unwrap().submit(Kind::Embed, rows, 7);
        assert_eq!(q.next_step(quiet, false).unwrap().tokens, 1000);
        // Another request arrives: steps shrink while contention is recent.
        q.reserve()
            .unwrap()
            .submit(Kind::Classify, vec![(row(0), 20)], 8);
        let s = q.next_step(budget(), false).unwrap();
        assert!(s.tokens <= 100, "{}", s.tokens);
        assert!(q.next_step(budget(), false).unwrap().tokens <= 100);
    }

    #[test]
    fn one_row_requests_beside_long_rows_never_wait_for_two_and_nothing_starves() {
        let q: Arc<Queue<u32>> = Queue::new(16);
        // Three large requests of rows longer than a step (one row per step at most).
        for k in 0..3 {
            let rows = (0..400).map(|i| (row(i), 256)).collect();
            q.reserve().unwrap().submit(Kind::Classify, rows, k);
        }
        let has_long = |s: &Step<u32>| s.parts.iter().any(|p| p.id < 3);
        // A closed-loop client of one-row requests: each arrives while a long row runs and
        // is in the next step, alone.
        let mut mixed = 0;
        for k in 0..200 {
            let s = q.next_step(budget(), false).unwrap();
            assert!(
                s.parts.len() == 1 && s.parts[0].rows.len() == 1,
                "one long row a step"
            );
            q.reserve()
                .unwrap()
                .submit(Kind::Classify, vec![(row(0), 10)], 100 + k);
            let s = q.next_step(budget(), false).unwrap();
            assert_eq!(s.parts[0].last, Some(100 + k));
            mixed += has_long(&s) as usize;
        }
        assert_eq!(mixed, 0, "a one-row request waited for a long row");
        // A flood of one-row requests, one a step: the oldest large request still moves.
        let mut moved = 0;
        for k in 0..2_000 {
            q.reserve()
                .unwrap()
                .submit(Kind::Classify, vec![(row(0), 10)], 1_000 + k);
            let s = q.next_step(budget(), false).unwrap();
            moved += s.parts.iter().filter(|p| p.id == 0).count();
        }
        assert!(
            moved >= 2,
            "the oldest request starved: {moved} rows in 2,000 steps"
        );
    }

    #[test]
    fn small_requests_batch_together_and_close_drains() {
        let q: Arc<Queue<u8>> = Queue::new(64);
        // A large request and 40 one-row ones, all unserved: the small ones go whole, all in
        // one step beyond the step budget; the large one (first to arrive) is next.
        let rows = (0..100).map(|i| (row(i), 60)).collect();
        q.reserve().unwrap().submit(Kind::Embed, rows, 0);
        for k in 1..=40 {
            q.reserve()
                .unwrap()
                .submit(Kind::Classify, vec![(row(k), 20)], k as u8);
        }
        let s = q.next_step(budget(), false).unwrap();
        assert_eq!(s.parts.len(), 40);
        assert_eq!(s.tokens, 40 * 20);
        let s = q.next_step(budget(), false).unwrap();
        assert_eq!((s.parts.len(), s.parts[0].id), (1, 0));
        q.close();
        let mut last = None;
        while let Some(s) = q.next_step(budget(), false) {
            last = s.parts.iter().find_map(|p| p.last);
        }
        assert_eq!(last, Some(0), "the large one finishes too");
    }
}
