//! The engine thread: owns the [`Scheduler`] and runs it in a loop, fed through a channel by
//! [`EngineHandle`], which the HTTP handlers share. Requests go in with a token stream to answer
//! on; dropping that stream cancels the request.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, Sender, TryRecvError, channel};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use hotprefix_cache::{SummaryEntry, Usage};
use serde::Serialize;
use tokio::sync::mpsc::{UnboundedReceiver, unbounded_channel};
use tokio::sync::oneshot;

use crate::backend::Backend;
use crate::metrics::EngineMetrics;
use crate::sampling::SamplingParams;
use crate::scheduler::{Event, Limits, Request, Scheduler, SubmitError};

/// What `/debug/cache` shows.
#[derive(Clone, Debug, Serialize)]
pub struct CacheReport {
    /// Tokens per block.
    pub block_size: usize,
    /// The cache policy.
    pub policy: String,
    /// Occupancy of both tiers.
    pub usage: Usage,
    /// Cache counters.
    pub stats: hotprefix_cache::CacheStats,
    /// The hottest prefixes, hottest first.
    pub hottest: Vec<SummaryEntry>,
    /// Cached blocks held by running requests (zero when idle: nothing leaked); `None` in a
    /// [`EngineHandle::load_report`], which skips the per-block scan.
    pub locked_blocks: Option<usize>,
    /// Cached blocks being copied between tiers; `None` as above.
    pub in_transfer_blocks: Option<usize>,
    /// Requests queued and running.
    pub waiting: usize,
    /// Requests running.
    pub running: usize,
    /// Prompt tokens queued or admitted that are not yet prefilled.
    pub pending_prefill_tokens: usize,
}

enum Command {
    Submit(Request),
    /// `top_k` hottest prefixes; whether to scan every resident block for the lock and
    /// transfer counts.
    Report(usize, bool, oneshot::Sender<CacheReport>),
    Abort(String),
}

/// A request as the HTTP layer hands it over.
#[derive(Debug, Clone)]
pub struct GenerateParams {
    /// Request id for logs.
    pub id: String,
    /// Prompt token ids.
    pub prompt: Vec<u32>,
    /// Tokens to generate at most.
    pub max_tokens: usize,
    /// Sampling.
    pub sampling: SamplingParams,
    /// Token ids that end the answer.
    pub stop_tokens: Vec<u32>,
}

/// The HTTP side's handle on the engine thread. Cheap to clone.
#[derive(Clone, Debug)]
pub struct EngineHandle {
    tx: Arc<Mutex<Option<Sender<Command>>>>,
    limits: Limits,
    max_waiting: usize,
    /// Submissions sent and not yet taken by the engine thread.
    in_channel: Arc<AtomicUsize>,
    alive: Arc<AtomicBool>,
    metrics: Arc<EngineMetrics>,
    thread: Arc<Mutex<Option<JoinHandle<()>>>>,
    backend: &'static str,
}

impl EngineHandle {
    /// Starts the engine thread around `scheduler`.
    pub fn start<B: Backend + 'static>(
        mut scheduler: Scheduler<B>,
        metrics: Arc<EngineMetrics>,
    ) -> std::io::Result<EngineHandle> {
        let (tx, rx) = channel();
        let limits = scheduler.limits();
        let max_waiting = scheduler.config().max_waiting;
        let backend = scheduler.backend_name();
        let in_channel = Arc::new(AtomicUsize::new(0));
        let alive = Arc::new(AtomicBool::new(true));
        let (c, a) = (Arc::clone(&in_channel), Arc::clone(&alive));
        let thread = std::thread::Builder::new()
            .name("engine".into())
            .spawn(move || {
                // Marks the engine dead however the thread ends, a panic included, so
                // `/health` fails and the pod is restarted instead of hanging requests.
                let _alive = AliveGuard(Arc::clone(&a));
                run_loop(&mut scheduler, &rx, &c);
                // Whatever is left is told why it ends; then the handle reports not alive.
                scheduler.abort_all("the engine stopped");
                a.store(false, Ordering::SeqCst);
            })?;
        Ok(EngineHandle {
            tx: Arc::new(Mutex::new(Some(tx))),
            limits,
            max_waiting,
            in_channel,
            alive,
            metrics,
            thread: Arc::new(Mutex::new(Some(thread))),
            backend,
        })
    }

    /// The compute backend the engine runs on (`cpu`, `cuda`).
    pub fn backend_name(&self) -> &'static str {
        self.backend
    }

    /// What requests are checked against.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// The shared metrics.
    pub fn metrics(&self) -> &Arc<EngineMetrics> {
        &self.metrics
    }

    /// Whether the engine thread is running.
    pub fn is_alive(&self) -> bool {
        self.alive.load(Ordering::SeqCst)
    }

    fn send(&self, c: Command) -> Result<(), SubmitError> {
        let guard = self.tx.lock().unwrap_or_else(PoisonError::into_inner);
        match guard.as_ref() {
            Some(tx) => tx.send(c).map_err(|_| SubmitError::ShuttingDown),
            None => Err(SubmitError::ShuttingDown),
        }
    }

    /// Queues a request; its tokens arrive on the returned stream, which cancels the request
    /// when dropped. Refuses at once what can never run and what would overflow the queue.
    pub fn submit(&self, p: GenerateParams) -> Result<UnboundedReceiver<Event>, SubmitError> {
        self.limits.check(&p.prompt, p.max_tokens)?;
        let queued = self.metrics.status().waiting + self.in_channel.load(Ordering::SeqCst);
        if queued >= self.max_waiting {
            return Err(SubmitError::QueueFull(queued));
        }
        if !self.is_alive() {
            return Err(SubmitError::ShuttingDown);
        }
        let (events, rx) = unbounded_channel();
        self.in_channel.fetch_add(1, Ordering::SeqCst);
        let r = self.send(Command::Submit(Request {
            id: p.id,
            prompt: p.prompt,
            max_tokens: p.max_tokens,
            sampling: p.sampling,
            stop_tokens: p.stop_tokens,
            events,
        }));
        if r.is_err() {
            self.in_channel.fetch_sub(1, Ordering::SeqCst);
        }
        r.map(|()| rx)
    }

    /// The cache's state and its `top_k` hottest prefixes.
    pub async fn cache_report(&self, top_k: usize) -> Option<CacheReport> {
        self.report(top_k, true).await
    }

    /// [`Self::cache_report`] without the lock and transfer counts, which need a scan of every
    /// resident block on the engine thread (tens of milliseconds for a million-block cache):
    /// what the Redis publisher asks for four times a second.
    pub async fn load_report(&self, top_k: usize) -> Option<CacheReport> {
        self.report(top_k, false).await
    }

    async fn report(&self, top_k: usize, scan: bool) -> Option<CacheReport> {
        let (tx, rx) = oneshot::channel();
        self.send(Command::Report(top_k, scan, tx)).ok()?;
        rx.await.ok()
    }

    /// Ends every queued and running request with an error (the shutdown deadline passed).
    pub fn abort_all(&self, why: &str) {
        let _ = self.send(Command::Abort(why.to_string()));
    }

    /// Stops the engine thread after it has finished or aborted what it holds, and waits for
    /// it.
    pub fn stop(&self) {
        self.tx
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        let t = self
            .thread
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(t) = t {
            let _ = t.join();
        }
    }
}

struct AliveGuard(Arc<AtomicBool>);

impl Drop for AliveGuard {
    fn drop(&mut self) {
        self.0.store(false, Ordering::SeqCst);
    }
}

fn handle<B: Backend>(s: &mut Scheduler<B>, c: Command, in_channel: &AtomicUsize) {
    match c {
        Command::Submit(req) => {
            in_channel.fetch_sub(1, Ordering::SeqCst);
            let events = req.events.clone();
            if let Err(e) = s.submit(req) {
                let _ = events.send(Event::Rejected(e));
            }
        }
        Command::Report(top_k, scan, reply) => {
            let st = s.status();
            let (locked_blocks, in_transfer_blocks) = if scan {
                let resident = s.cache().resident_blocks();
                (
                    Some(resident.iter().filter(|b| b.locked).count()),
                    Some(
                        resident
                            .iter()
                            .filter(|b| b.device_loading || b.host_writing)
                            .count(),
                    ),
                )
            } else {
                (None, None)
            };
            let _ = reply.send(CacheReport {
                locked_blocks,
                in_transfer_blocks,
                waiting: st.waiting,
                running: st.running,
                pending_prefill_tokens: s.pending_prefill_tokens(),
                block_size: s.config().block_size,
                policy: s.config().policy.to_string(),
                usage: st.usage,
                stats: st.stats,
                hottest: s.summary(top_k),
            });
        }
        Command::Abort(why) => s.abort_all(&why),
    }
}

fn run_loop<B: Backend>(s: &mut Scheduler<B>, rx: &Receiver<Command>, in_channel: &AtomicUsize) {
    loop {
        if !s.has_work() {
            // Idle: sleep until a command arrives (or every second, to refresh gauges).
            match rx.recv_timeout(Duration::from_secs(1)) {
                Ok(c) => handle(s, c, in_channel),
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                    s.step();
                    continue;
                }
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return,
            }
        }
        loop {
            match rx.try_recv() {
                Ok(c) => handle(s, c, in_channel),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    // Shutting down: finish what is queued and running, then stop.
                    while s.has_work() {
                        s.step();
                    }
                    return;
                }
            }
        }
        s.step();
    }
}
