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
//! and the oldest request moves at least once every few steps (nothing starves). A request that has had the
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
    /// The step that last ran rows of this request.
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
    /// Steps formed so far.
    steps: u64,
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
                steps: 0,
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
        st.steps += 1;
        let step_no = st.steps;
        let oldest = st.entries.iter().map(|e| e.id).min();
        // Least attained service first; ties by arrival.
        st.entries.sort_by_key(|e| (e.served, e.id));
        let mut parts: Vec<Part<P>> = Vec::new();
        let mut tokens = 0;
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
                e.moved = step_no;
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
        // The oldest request moves at least once in as many steps as requests wait, however
        // many newer ones are served first (more often would add one of its rows to each
        // small request's step).
        if let Some(old) = oldest {
            if !parts.iter().any(|p| p.id == old) {
                if let Some(e) = st
                    .entries
                    .iter_mut()
                    .find(|e| e.id == old && e.moved + (waiting as u64) < step_no)
                {
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
        let now = st.steps;
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
    fn small_requests_batch_together_and_close_drains() {
        let q: Arc<Queue<u8>> = Queue::new(64);
        // A large request and 40 one-row ones, all unserved: the large one (first to arrive)
        // gets a row, the small ones go whole, all in one step.
        let rows = (0..100).map(|i| (row(i), 60)).collect();
        q.reserve().unwrap().submit(Kind::Embed, rows, 0);
        for k in 1..=40 {
            q.reserve()
                .unwrap()
                .submit(Kind::Classify, vec![(row(k), 20)], k as u8);
        }
        let s = q.next_step(budget(), false).unwrap();
        assert_eq!(s.parts.len(), 41);
        assert_eq!(s.tokens, 40 * 20 + 60);
        q.close();
        let mut last = None;
        while let Some(s) = q.next_step(budget(), false) {
            last = s.parts.iter().find_map(|p| p.last);
        }
        assert_eq!(last, Some(0), "the large one finishes too");
    }
}
