//! What both event loops wait on: their own events, API commands, and the clock.

use std::time::{Duration, Instant};

use crossbeam_channel::{select, Receiver};

use crate::control::Request;

/// How often a loop looks at the clock, whether or not events arrive.
pub(crate) const TICK: Duration = Duration::from_millis(50);

/// One input of an event loop.
pub(crate) enum Input<E> {
    Event(E),
    Command(Request),
    /// Time passed: phases check their deadlines.
    Tick,
}

/// The inputs of a loop and when it last ticked.
pub(crate) struct Inputs<E> {
    pub(crate) events: Receiver<E>,
    commands: Receiver<Request>,
    last_tick: Instant,
}

impl<E> Inputs<E> {
    pub(crate) fn new(events: Receiver<E>, commands: Receiver<Request>) -> Self {
        Inputs {
            events,
            commands,
            last_tick: Instant::now(),
        }
    }

    /// The next input. A tick comes at `deadline` and at least every [`TICK`] even while
    /// events keep arriving, so a chatty peer cannot starve a deadline. Commands whose
    /// requester gave up are dropped unanswered.
    pub(crate) fn next(&mut self, deadline: Option<Instant>) -> Input<E> {
        let now = Instant::now();
        let tick_at = (self.last_tick + TICK).min(deadline.unwrap_or(self.last_tick + TICK));
        if now >= tick_at {
            self.last_tick = now;
            return Input::Tick;
        }
        let wait = tick_at - now;
        let input = select! {
            recv(self.events) -> e => match e {
                Ok(e) => Input::Event(e),
                Err(_) => Input::Tick,
            },
            recv(self.commands) -> r => match r {
                Ok(r) if r.expired() => Input::Tick,
                Ok(r) => Input::Command(r),
                Err(_) => {
                    // The API is gone; the loop goes on without it.
                    self.commands = crossbeam_channel::never();
                    Input::Tick
                }
            },
            default(wait) => Input::Tick,
        };
        if matches!(input, Input::Tick) {
            self.last_tick = Instant::now();
        }
        input
    }
}
