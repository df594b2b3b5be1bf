//! What the submitting threads, the loader thread and the engine thread
//! share: the hand-off queue, admin commands, finished loads, and the
//! stats and expert list the handles read.

use std::collections::VecDeque;
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};

use tokio::sync::mpsc::UnboundedSender;

use super::residency::LoadJob;
use super::{EngineError, EngineStats, Event, ExpertSource, ExpertStatus, GenRequest};
use crate::model::{Expert, ModelError};

pub(crate) struct Pending {
    pub req: GenRequest,
    pub events: UnboundedSender<Event>,
}

pub(crate) enum Command {
    Register {
        src: ExpertSource,
        expert: Box<Expert>,
        reply: mpsc::Sender<Result<(), EngineError>>,
    },
    Unregister {
        name: String,
        reply: mpsc::Sender<Result<(), EngineError>>,
    },
}

/// What the submitting threads, the loader and the engine thread share.
#[derive(Default)]
pub(crate) struct SharedState {
    pub incoming: VecDeque<Pending>,
    /// Requests accepted and not yet admitted (incoming + waiting).
    pub queued: usize,
    pub commands: VecDeque<Command>,
    pub loaded: VecDeque<(LoadJob, Result<Expert, ModelError>)>,
    pub shutting_down: bool,
    pub stats: EngineStats,
    pub experts: Vec<ExpertStatus>,
    /// Running mean of admitted-to-done seconds.
    pub mean_request_s: f64,
}

#[derive(Default)]
pub(crate) struct Shared {
    pub state: Mutex<SharedState>,
    pub wake: Condvar,
}

impl Shared {
    pub fn lock(&self) -> std::sync::MutexGuard<'_, SharedState> {
        // A panic on another thread while holding the lock leaves plain
        // data behind; keep serving.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Reads experts from disk to the host tier, one at a time, off the
/// engine thread.
pub(crate) fn loader_thread(
    parser: crate::model::ExpertParser,
    jobs: mpsc::Receiver<LoadJob>,
    shared: Arc<Shared>,
) {
    for job in jobs {
        let result = parser.open(&job.path);
        shared.lock().loaded.push_back((job, result));
        shared.wake.notify_all();
    }
}
