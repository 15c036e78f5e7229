//! `migrate-recover URI`: a destination whose postcopy broke off listens on a new address as
//! well, for a source that cannot reach the old one (QEMU's `migrate-recover`). The source is
//! told with `migrate URI --resume`. Connections greeted there join the same event loop as
//! those of the first listener, so the phases take a reconnection the same way wherever it
//! came in.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use ferry_transport::{Listener, Uri};

use super::{accept, Destination, Event};
use crate::control::{Command, Request};

/// A second listener and the thread that greets its connections; stops when dropped.
pub(super) struct ExtraListener {
    uri: Uri,
    stop: Arc<AtomicBool>,
    /// Gives the listener back when it stops.
    thread: Option<JoinHandle<Listener>>,
}

impl ExtraListener {
    /// Stops greeting; the listener itself stays bound (a finished postcopy answers late
    /// reconnections on it).
    pub(super) fn stop(mut self) -> Option<Listener> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().and_then(|t| t.join().ok())
    }
}

impl Drop for ExtraListener {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Why `migrate-recover` cannot listen on `uri`, if it cannot.
fn refuse_address(uri: &Uri) -> Option<String> {
    match uri {
        // Binding replaces a socket file: never one that may still be in use.
        Uri::Unix(path) if std::fs::symlink_metadata(path).is_ok() => Some(format!(
            "{} exists: give a path that does not (a stale socket file must be removed first)",
            path.display()
        )),
        _ => None,
    }
}

impl Destination {
    /// Handles `migrate-recover` in a phase where a broken postcopy's source may reconnect
    /// (`allowed`); refuses it, saying why, elsewhere.
    pub(super) fn recover(&mut self, req: Request, phase: &'static str, allowed: bool) {
        let Command::Recover { uri } = &req.command else {
            return;
        };
        if !allowed {
            req.refuse(
                phase,
                "there is no postcopy here to recover: 'migrate-recover' serves a postcopy once \
                 its switch has begun",
            );
            return;
        }
        let uri = uri.clone();
        if self.recover.as_ref().is_some_and(|l| l.uri == uri) {
            req.answer(Ok(format!("already listening on {uri} as well")));
            return;
        }
        match self.listen_also(&uri) {
            Ok(()) => {
                tracing::info!(%uri, "migrate-recover: listening for the source here as well");
                req.answer(Ok(format!(
                    "listening on {uri} as well; on the source, 'migrate {uri} --resume' \
                     reconnects there"
                )));
            }
            Err(why) => req.refuse(phase, &format!("cannot listen on {uri}: {why}")),
        }
    }

    /// Starts greeting connections on `uri` into this loop (replacing an earlier extra
    /// listener).
    fn listen_also(&mut self, uri: &Uri) -> Result<(), String> {
        if let Some(why) = refuse_address(uri) {
            return Err(why);
        }
        let listener = Listener::bind(uri).map_err(|e| e.to_string())?;
        // Bound: the earlier extra listener, if any, can go.
        self.recover = None;
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, strays) = (self.events_tx.clone(), self.strays.clone());
        let (tls, timeout) = (self.params.tls.clone(), self.params.handshake_timeout);
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("mig-accept-2".into())
            .spawn(move || {
                crate::latency::control_thread();
                accept::run(
                    &listener,
                    tls.as_ref(),
                    timeout,
                    &flag,
                    &strays,
                    &tx,
                    Event::Greeted,
                );
                listener
            })
            .map_err(|e| format!("starting its acceptor thread: {e}"))?;
        self.recover = Some(ExtraListener {
            uri: uri.clone(),
            stop,
            thread: Some(thread),
        });
        Ok(())
    }
}
