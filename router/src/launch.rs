//! Builds a running router from its configuration: the registry with the static replicas, the
//! policy, the tokenizer, and the background tasks (health probes, the Redis feed).

use std::sync::Arc;

use hotprefix_engine::source::{SourceError, apply_chat_template, load_text};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::RouterConfig;
use crate::metrics::RouterMetrics;
use crate::policy::{self, PolicyConfig, PolicyKind};
use crate::redis_feed::{self, FeedStatus};
use crate::registry::Registry;
use crate::server::{RouterState, http_client};

/// Why the router could not start.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    /// The model's tokenizer could not be loaded.
    #[error("loading the model's tokenizer: {0}")]
    Model(#[from] SourceError),
}

/// A started router: its state (for `server::run`) and its background tasks.
#[derive(Debug)]
pub struct Launched {
    /// The handlers' state.
    pub state: RouterState,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl Launched {
    /// Stops the background tasks and waits for them.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

/// Resolves once `rx` sees `true` (or its sender is gone).
async fn stopped(mut rx: watch::Receiver<bool>) {
    let _ = rx.wait_for(|v| *v).await;
}

/// Starts the router's background tasks; call inside a tokio runtime.
pub fn launch(cfg: &RouterConfig) -> Result<Launched, LaunchError> {
    let text = match &cfg.model {
        Some(m) => {
            // The engines' own sequence: the model's text side, then the --chat-template
            // override, so that both render a conversation into the same prompt.
            let mut text = load_text(m)?;
            apply_chat_template(&mut text.chat, cfg.chat_template.as_ref())?;
            Some(Arc::new(text))
        }
        None => None,
    };
    let registry = Arc::new(Registry::new(cfg.eject_after));
    for url in &cfg.replicas {
        registry.add_static(url);
    }
    let client = http_client(cfg.connect_timeout);
    let (stop, rx) = watch::channel(false);
    let mut tasks = Vec::new();
    tasks.push(tokio::spawn(crate::health::run(
        registry.clone(),
        client.clone(),
        cfg.health_interval,
        cfg.connect_timeout.max(std::time::Duration::from_secs(1)),
        stopped(rx.clone()),
    )));
    let feed = cfg.redis.as_ref().map(|target| {
        let status = Arc::new(FeedStatus::default());
        tasks.push(tokio::spawn(redis_feed::run(
            target.clone(),
            cfg.keys.clone(),
            registry.clone(),
            status.clone(),
            stopped(rx.clone()),
        )));
        status
    });
    if let Some(k8s) = &cfg.kubernetes {
        // The client is made inside the task (it may read files and run credential plugins);
        // without one the router starts anyway and routes to its other replicas.
        tasks.push(tokio::spawn(crate::kubernetes::run_default(
            k8s.clone(),
            registry.clone(),
            stopped(rx.clone()),
        )));
    }
    let policy: Arc<dyn policy::RoutingPolicy> = Arc::from(policy::build(&cfg.policy));
    // While Redis is down the hotprefix policy has no summaries; least-load keeps requests
    // balanced until they return.
    let fallback: Arc<dyn policy::RoutingPolicy> = Arc::from(policy::build(&PolicyConfig {
        kind: PolicyKind::LeastLoad,
        ..cfg.policy.clone()
    }));
    let state = RouterState {
        registry,
        policy,
        fallback,
        text,
        feed,
        client,
        cfg: Arc::new(cfg.proxy.clone()),
        metrics: Arc::new(RouterMetrics::default()),
    };
    Ok(Launched { state, stop, tasks })
}
