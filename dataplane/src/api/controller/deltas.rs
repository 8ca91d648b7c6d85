//! Numbered deltas ([`strom_api::Delta`]): each writer's last applied delta and its answer,
//! so that a writer's deltas are applied once each and in order. A delta sent again (its
//! answer was lost) is answered as it was; an older one is refused.

use hashbrown::HashMap;
use strom_api::{Delta, Response, DELTA_WRITERS};

/// What to do with a numbered delta.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Newer than the writer's last: apply it, then [`Deltas::record`] it.
    Apply,
    /// The writer's last delta again: its answer, without applying it again.
    Answered(Response),
    /// Older than the writer's last (numbered so): not applied.
    OutOfOrder(u64),
}

#[derive(Debug)]
struct Last {
    seq: u64,
    answer: Response,
    /// When the writer was last heard of (a count of the calls here), for forgetting the
    /// least recently heard when there are too many.
    heard: u64,
}

/// The last delta of up to [`DELTA_WRITERS`] writers.
#[derive(Debug, Default)]
pub struct Deltas {
    last: HashMap<u64, Last>,
    clock: u64,
}

impl Deltas {
    /// What to do with delta `d`.
    pub fn check(&mut self, d: &Delta) -> Verdict {
        self.clock += 1;
        let Some(last) = self.last.get_mut(&d.writer) else {
            return Verdict::Apply;
        };
        last.heard = self.clock;
        match d.seq.cmp(&last.seq) {
            std::cmp::Ordering::Greater => Verdict::Apply,
            std::cmp::Ordering::Equal => Verdict::Answered(last.answer.clone()),
            std::cmp::Ordering::Less => Verdict::OutOfOrder(last.seq),
        }
    }

    /// Delta `d` was applied (or refused: that answer stands too) with `answer`.
    pub fn record(&mut self, d: Delta, answer: &Response) {
        self.clock += 1;
        if !self.last.contains_key(&d.writer) && self.last.len() >= DELTA_WRITERS {
            if let Some(&oldest) = self
                .last
                .iter()
                .min_by_key(|(_, l)| l.heard)
                .map(|(w, _)| w)
            {
                self.last.remove(&oldest);
            }
        }
        self.last.insert(
            d.writer,
            Last {
                seq: d.seq,
                answer: answer.clone(),
                heard: self.clock,
            },
        );
    }

    /// The number of `writer`'s last applied delta, if any.
    pub fn applied(&mut self, writer: u64) -> Option<u64> {
        self.clock += 1;
        let last = self.last.get_mut(&writer)?;
        last.heard = self.clock;
        Some(last.seq)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn applied(seq: u64) -> Response {
        Response::Applied {
            refused: vec![],
            delta: Some(seq),
        }
    }

    #[test]
    fn a_writers_deltas_apply_once_each_in_order() {
        let mut d = Deltas::default();
        let (w, other) = (0xa, 0xb);
        let at = |seq| Delta { writer: w, seq };
        assert_eq!(d.applied(w), None);
        assert_eq!(d.check(&at(1)), Verdict::Apply);
        d.record(at(1), &applied(1));
        assert_eq!(d.check(&at(1)), Verdict::Answered(applied(1)), "sent again");
        // A gap is fine (a delta refused by the socket before it reached here).
        assert_eq!(d.check(&at(3)), Verdict::Apply);
        d.record(at(3), &applied(3));
        assert_eq!(d.check(&at(2)), Verdict::OutOfOrder(3));
        assert_eq!(d.applied(w), Some(3));
        // Writers are numbered apart.
        assert_eq!(
            d.check(&Delta {
                writer: other,
                seq: 1
            }),
            Verdict::Apply
        );
    }

    #[test]
    fn the_least_recently_heard_writer_is_forgotten_first() {
        let mut d = Deltas::default();
        for w in 0..DELTA_WRITERS as u64 {
            d.record(Delta { writer: w, seq: 5 }, &applied(5));
        }
        // Writer 0 is heard of again: writer 1 is now the one heard of longest ago.
        assert_eq!(d.applied(0), Some(5));
        d.record(Delta { writer: 99, seq: 1 }, &applied(1));
        assert_eq!(d.last.len(), DELTA_WRITERS);
        assert_eq!(d.applied(1), None);
        assert_eq!(d.applied(0), Some(5));
        assert_eq!(d.applied(99), Some(1));
    }
}
