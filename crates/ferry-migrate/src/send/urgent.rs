//! Postcopy's urgent channel on the source: one thread reads the destination's page
//! requests and answers each at once from the paused guest's memory, on a channel that bulk
//! traffic never uses and that no bandwidth cap holds back.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;

use crossbeam_channel::Sender;
use ferry_memory::ram::{GuestRam, PAGE_SIZE};
use ferry_proto::{
    encode_pages_header, encode_zero_header, read_message_checked, Message, PageRun, ProtoError,
    MAX_BATCH_PAGES, MAX_RUNS,
};
use ferry_sys::iov;
use ferry_transport::Stream;

use super::worker::WorkerEvent;
use crate::channel::{sum_guest_pages, Wire};
use crate::error::{Channel, MigrateError};
use crate::progress::Progress;
use crate::wire::push_run;

const PHASE: &str = "postcopy";

/// The urgent channel's server thread.
pub(crate) struct Urgent {
    stream: Stream,
    join: Option<JoinHandle<()>>,
}

impl Urgent {
    /// Stops serving: the socket is shut down and the thread joined.
    pub(crate) fn stop(&mut self) {
        self.stream.shutdown();
        if let Some(j) = self.join.take() {
            let _ = j.join();
        }
    }
}

impl Drop for Urgent {
    fn drop(&mut self) {
        self.stop();
    }
}

/// What the server needs.
pub(crate) struct Serving {
    pub(crate) ram: Arc<GuestRam>,
    pub(crate) wire: Wire,
    pub(crate) pass: u32,
    pub(crate) progress: Arc<Progress>,
    /// Where the destination faulted last, for the push to follow.
    pub(crate) hint: Arc<std::sync::atomic::AtomicU64>,
}

/// Starts serving page requests on `stream`; a failure is reported through `events`.
pub(crate) fn spawn<E: Send + 'static>(
    stream: Stream,
    how: Serving,
    events: Sender<E>,
    wrap: fn(WorkerEvent) -> E,
) -> Result<Urgent, MigrateError> {
    let reader = stream
        .try_clone()
        .map_err(MigrateError::io("cloning the urgent channel"))?;
    let join = std::thread::Builder::new()
        .name("mig-urgent".into())
        .spawn(move || {
            crate::latency::control_thread();
            if let Err(e) = serve(reader, &how) {
                let _ = events.send(wrap(WorkerEvent::Failed(e)));
            }
        })
        .map_err(MigrateError::io("starting the urgent channel thread"))?;
    Ok(Urgent {
        stream,
        join: Some(join),
    })
}

fn serve(mut stream: Stream, how: &Serving) -> Result<(), MigrateError> {
    let mut scratch = Vec::new();
    let mut out = Answer::default();
    loop {
        let msg = match read_message_checked(&mut stream, &mut scratch, how.wire.sums) {
            Ok(m) => m,
            // Closed (the destination has every page), or shut down here.
            Err(ProtoError::Eof) => return Ok(()),
            Err(source) => {
                return Err(MigrateError::Receive {
                    channel: Channel::Urgent,
                    phase: PHASE,
                    source,
                })
            }
        };
        match msg {
            Message::PageRequest { runs, .. } => {
                out.answer(&mut stream, how, &runs)?;
                if let Some(r) = runs.last() {
                    how.hint.store(r.gpa, Ordering::Relaxed);
                }
            }
            m => {
                return Err(MigrateError::Unexpected {
                    message: m.name(),
                    phase: PHASE,
                    channel: Channel::Urgent,
                })
            }
        }
    }
}

/// A request's answer being built: data runs and zero runs, and reusable buffers.
#[derive(Default)]
struct Answer {
    data: Vec<PageRun>,
    data_pages: u32,
    zero: Vec<PageRun>,
    header: Vec<u8>,
    sums: Vec<u64>,
}

impl Answer {
    /// Sends every page of `runs`: data pages as Pages frames, zero pages as one ZeroPages.
    fn answer(
        &mut self,
        stream: &mut Stream,
        how: &Serving,
        runs: &[PageRun],
    ) -> Result<(), MigrateError> {
        for r in runs {
            if how.ram.region_of(r.gpa, u64::from(r.pages)).is_none() {
                return Err(MigrateError::OutsideRam {
                    channel: Channel::Urgent,
                    gpa: r.gpa,
                    pages: r.pages,
                });
            }
            for p in 0..u64::from(r.pages) {
                let gpa = r.gpa + p * PAGE_SIZE;
                if iov::is_zero(&how.ram.slice(gpa, PAGE_SIZE as usize)?) {
                    push_run(&mut self.zero, gpa);
                    continue;
                }
                if self.data_pages == MAX_BATCH_PAGES || self.data.len() == MAX_RUNS as usize {
                    self.flush_data(stream, how)?;
                }
                push_run(&mut self.data, gpa);
                self.data_pages += 1;
            }
        }
        self.flush_data(stream, how)?;
        self.flush_zero(stream, how)?;
        let pages: u64 = runs.iter().map(|r| u64::from(r.pages)).sum();
        how.progress
            .pages_requested
            .fetch_add(pages, Ordering::Relaxed);
        Ok(())
    }

    fn flush_data(&mut self, stream: &mut Stream, how: &Serving) -> Result<(), MigrateError> {
        if self.data.is_empty() {
            return Ok(());
        }
        self.sums.clear();
        if how.wire.sums {
            sum_guest_pages(&how.ram, &self.data, &mut self.sums)?;
        }
        let slices = self
            .data
            .iter()
            .map(|r| {
                how.ram
                    .slice(r.gpa, (u64::from(r.pages) * PAGE_SIZE) as usize)
            })
            .collect::<Result<Vec<_>, _>>()?;
        self.header.clear();
        encode_pages_header(
            how.pass,
            &self.data,
            &self.sums,
            how.wire.sums,
            &mut self.header,
        );
        stream
            .write_pages(&self.header, &slices)
            .map_err(send_err)?;
        count(
            &how.progress,
            self.header.len() as u64 + u64::from(self.data_pages) * PAGE_SIZE,
        );
        self.data.clear();
        self.data_pages = 0;
        Ok(())
    }

    fn flush_zero(&mut self, stream: &mut Stream, how: &Serving) -> Result<(), MigrateError> {
        for batch in self.zero.chunks(MAX_RUNS as usize) {
            self.header.clear();
            encode_zero_header(how.pass, batch, how.wire.sums, &mut self.header);
            std::io::Write::write_all(stream, &self.header)
                .and_then(|()| std::io::Write::flush(stream))
                .map_err(send_err)?;
            count(&how.progress, self.header.len() as u64);
        }
        self.zero.clear();
        Ok(())
    }
}

fn count(progress: &Progress, bytes: u64) {
    progress.bytes.fetch_add(bytes, Ordering::Relaxed);
}

fn send_err(source: std::io::Error) -> MigrateError {
    MigrateError::Send {
        channel: Channel::Urgent,
        phase: PHASE,
        source,
    }
}
