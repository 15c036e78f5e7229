//! Destination memory preparation: populate or lock guest memory on helper threads, from
//! startup, and report when it is done so the source can wait for it before pausing.

use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::Sender;
use ferry_memory::prepare::{self, HostRange, PrepareError, PrepareOptions, PrepareStep};
use ferry_memory::ram::{Backend, GuestRam, HUGE_PAGE_SIZE};

use crate::error::MigrateError;

/// What to do to destination memory while precopy runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrepareMode {
    /// Nothing: pages are faulted in as they arrive.
    None,
    /// Fault every page in (`MADV_POPULATE_WRITE`).
    Populate,
    /// Lock every page in RAM (`mlock`).
    Lock,
}

impl std::str::FromStr for PrepareMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "none" => Ok(PrepareMode::None),
            "populate" => Ok(PrepareMode::Populate),
            "lock" => Ok(PrepareMode::Lock),
            o => Err(format!(
                "unknown preparation mode '{o}' (expected populate, lock or none)"
            )),
        }
    }
}

impl PrepareMode {
    /// The step kind, for feasibility checks.
    pub fn kind(self) -> Option<prepare::StepKind> {
        match self {
            PrepareMode::None => None,
            PrepareMode::Populate => Some(prepare::StepKind::Populate),
            PrepareMode::Lock => Some(prepare::StepKind::Lock),
        }
    }
}

/// Starts preparing `ram` as `mode` says, on helper threads, and returns the running job
/// (`None` for [`PrepareMode::None`]). A destination that knows its layout from its own
/// configuration calls this at startup, so the work is done before the source even
/// connects; [`super::receive`] otherwise starts it itself.
pub fn start_prepare(
    ram: &GuestRam,
    mode: PrepareMode,
    threads: Option<usize>,
    nice: i32,
) -> Result<Option<prepare::PrepareHandle>, MigrateError> {
    let step: Arc<dyn PrepareStep> = match mode {
        PrepareMode::None => return Ok(None),
        PrepareMode::Populate => Arc::new(prepare::Populate),
        PrepareMode::Lock => Arc::new(prepare::Lock),
    };
    let ranges: Vec<HostRange> = ram
        .host_regions()
        .iter()
        .map(|r| HostRange::new(r.addr, r.len))
        .collect();
    let opts = PrepareOptions {
        max_threads: threads,
        nice,
        page_size: (ram.config().backend == Backend::Hugetlb).then_some(HUGE_PAGE_SIZE as usize),
        ..PrepareOptions::default()
    };
    Ok(Some(prepare::start(ranges, step, opts)?))
}

/// A finished preparation: how long it took and on how many threads (0: none was asked).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Prepared {
    pub(crate) elapsed: Duration,
    pub(crate) threads: usize,
}

/// Waits for `handle` on a helper thread and reports through `tx`; reports at once when
/// there is nothing to prepare.
pub(crate) fn watch<E: Send + 'static>(
    handle: Option<prepare::PrepareHandle>,
    tx: Sender<E>,
    wrap: fn(Result<Prepared, PrepareError>) -> E,
) -> Result<(), MigrateError> {
    let Some(handle) = handle else {
        let _ = tx.send(wrap(Ok(Prepared {
            elapsed: Duration::ZERO,
            threads: 0,
        })));
        return Ok(());
    };
    std::thread::Builder::new()
        .name("mig-prepare".into())
        .spawn(move || {
            let r = handle.wait().map(|rep| Prepared {
                elapsed: rep.elapsed,
                threads: rep.threads,
            });
            if let Ok(p) = &r {
                tracing::info!(
                    ms = p.elapsed.as_secs_f64() * 1000.0,
                    threads = p.threads,
                    "destination memory prepared"
                );
            }
            let _ = tx.send(wrap(r));
        })
        .map_err(MigrateError::io("starting the preparation watcher thread"))?;
    Ok(())
}
