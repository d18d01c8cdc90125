//! `hotprefix-operator`: reconciles HotPrefixServices until SIGINT or SIGTERM (leading over a
//! Lease when several replicas run), serving `/health` and `/metrics`; `hotprefix-operator
//! render FILE` prints the objects it would apply for a HotPrefixService in a file.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context as _, bail};
use clap::{ArgAction, Args, Parser, Subcommand};
use hotprefix_operator::controller::{self, Context, Scope};
use hotprefix_operator::leader::{self, LeaseLock, LeaseTimings};
use hotprefix_operator::metrics::Metrics;
use hotprefix_operator::render;
use hotprefix_operator::resources::Defaults;
use hotprefix_operator::server::{self, ServerState};
use hotprefix_operator::validate::is_dns_subdomain;
use k8s_openapi::api::coordination::v1::Lease;
use kube::runtime::events::Reporter;
use tokio::sync::watch;

/// Where a pod finds its own namespace.
const NAMESPACE_FILE: &str = "/var/run/secrets/kubernetes.io/serviceaccount/namespace";

#[derive(Debug, Parser)]
#[command(
    name = "hotprefix-operator",
    version,
    about = "Kubernetes operator for HotPrefixServices: engines, router and Redis",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print the objects the operator would apply for the HotPrefixService in each FILE.
    Render(RenderArgs),
}

#[derive(Debug, Args)]
struct RenderArgs {
    /// Namespace for objects that name none.
    #[arg(long, default_value = "default")]
    namespace: String,
    /// Give the children an owner reference to a HotPrefixService of this uid, as the
    /// operator does (without it they carry none).
    #[arg(long)]
    uid: Option<String>,
    #[command(flatten)]
    images: Images,
    /// YAML files holding one HotPrefixService each.
    #[arg(required = true)]
    files: Vec<PathBuf>,
}

#[derive(Debug, Clone, Args)]
struct Images {
    /// Engine image for specs that name none.
    #[arg(long, env = "HOTPREFIX_OPERATOR_ENGINE_IMAGE")]
    engine_image: Option<String>,
    /// Router image for specs that name none.
    #[arg(long, env = "HOTPREFIX_OPERATOR_ROUTER_IMAGE")]
    router_image: Option<String>,
    /// Managed Redis image for specs that name none.
    #[arg(long, env = "HOTPREFIX_OPERATOR_REDIS_IMAGE")]
    redis_image: Option<String>,
    /// Model download init container image (sh, curl, sha256sum) for specs that name none.
    #[arg(long, env = "HOTPREFIX_OPERATOR_DOWNLOADER_IMAGE")]
    downloader_image: Option<String>,
}

impl Images {
    fn defaults(&self) -> anyhow::Result<Defaults> {
        let base = Defaults::default();
        let pick = |flag: &str, v: &Option<String>, default: String| -> anyhow::Result<String> {
            match v {
                Some(i) if i.is_empty() || i.chars().any(char::is_whitespace) => {
                    bail!("--{flag} {i:?} is not an image reference")
                }
                Some(i) => Ok(i.clone()),
                None => Ok(default),
            }
        };
        Ok(Defaults {
            engine_image: pick("engine-image", &self.engine_image, base.engine_image)?,
            router_image: pick("router-image", &self.router_image, base.router_image)?,
            redis_image: pick("redis-image", &self.redis_image, base.redis_image)?,
            downloader_image: pick(
                "downloader-image",
                &self.downloader_image,
                base.downloader_image,
            )?,
        })
    }
}

#[derive(Debug, Args)]
struct RunArgs {
    /// Address of `/health` and `/metrics`.
    #[arg(
        long,
        env = "HOTPREFIX_OPERATOR_LISTEN",
        default_value = "0.0.0.0:8080"
    )]
    listen: SocketAddr,
    /// Namespaces to manage, comma-separated (default: all; the RBAC must match).
    #[arg(
        long,
        env = "HOTPREFIX_OPERATOR_WATCH_NAMESPACES",
        value_delimiter = ','
    )]
    watch_namespaces: Vec<String>,
    /// Elect one active replica over a Lease (turn off only with a single replica).
    #[arg(long, env = "HOTPREFIX_OPERATOR_LEADER_ELECT", default_value_t = true, action = ArgAction::Set)]
    leader_elect: bool,
    /// The Lease's name.
    #[arg(
        long,
        env = "HOTPREFIX_OPERATOR_LEASE_NAME",
        default_value = "hotprefix-operator"
    )]
    lease_name: String,
    /// The Lease's namespace (default: the operator pod's own).
    #[arg(long, env = "HOTPREFIX_OPERATOR_LEASE_NAMESPACE")]
    lease_namespace: Option<String>,
    /// This replica's identity in the Lease and in Events (default: the host name, which is
    /// the pod name).
    #[arg(long, env = "HOTPREFIX_OPERATOR_IDENTITY")]
    identity: Option<String>,
    #[command(flatten)]
    images: Images,
    /// Log format: text or json.
    #[arg(long, env = "HOTPREFIX_OPERATOR_LOG_FORMAT", default_value = "text")]
    log_format: String,
    /// OpenTelemetry collector to export reconcile spans to over OTLP/HTTP
    /// (http://host:4318). Without it no spans are exported.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    otlp_endpoint: Option<String>,
}

/// The checked configuration of a run.
#[derive(Debug)]
struct RunConfig {
    listen: SocketAddr,
    scope: Scope,
    lease: Option<(String, String)>,
    identity: String,
    defaults: Defaults,
    json_logs: bool,
    otlp_endpoint: Option<String>,
}

fn host_name() -> Option<String> {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
}

fn pod_namespace() -> Option<String> {
    std::fs::read_to_string(NAMESPACE_FILE)
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

impl RunArgs {
    fn validate(self) -> anyhow::Result<RunConfig> {
        let json_logs = match self.log_format.as_str() {
            "text" => false,
            "json" => true,
            other => bail!("--log-format {other:?}: expected text or json"),
        };
        let namespaces: Vec<String> = self
            .watch_namespaces
            .into_iter()
            .map(|n| n.trim().to_string())
            .filter(|n| !n.is_empty())
            .collect();
        for n in &namespaces {
            // Namespace names are DNS labels: a subdomain without dots.
            if !is_dns_subdomain(n) || n.contains('.') || n.len() > 63 {
                bail!("--watch-namespaces: {n:?} is not a namespace name");
            }
        }
        let scope = if namespaces.is_empty() {
            Scope::Cluster
        } else {
            Scope::Namespaces(namespaces)
        };
        let identity = match self.identity.or_else(host_name) {
            Some(i) => i,
            None => bail!("--identity: the host name is unknown; give an identity"),
        };
        let lease = if self.leader_elect {
            if !is_dns_subdomain(&self.lease_name) {
                bail!("--lease-name {:?} is not an object name", self.lease_name);
            }
            let ns = match self.lease_namespace.or_else(pod_namespace) {
                Some(ns) => ns,
                None => bail!(
                    "--lease-namespace: not running in a pod (no {NAMESPACE_FILE}); name the \
                     Lease's namespace or pass --leader-elect=false"
                ),
            };
            Some((ns, self.lease_name))
        } else {
            None
        };
        let otlp_endpoint = self.otlp_endpoint.filter(|e| !e.trim().is_empty());
        if let Some(e) = &otlp_endpoint {
            hotprefix_telemetry::traces_endpoint(e).context("--otlp-endpoint")?;
        }
        Ok(RunConfig {
            listen: self.listen,
            scope,
            lease,
            identity,
            defaults: self.images.defaults()?,
            json_logs,
            otlp_endpoint,
        })
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Some(Command::Render(args)) = cli.command {
        return render_files(&args);
    }
    let cfg = cli.run.validate()?;
    // Held to the end of `main`: dropping it exports the last spans.
    let _telemetry = hotprefix_telemetry::init(
        "hotprefix-operator",
        cfg.json_logs,
        cfg.otlp_endpoint.as_deref(),
    )
    .context("setting up logs and traces")?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(operate(cfg))
}

fn render_files(args: &RenderArgs) -> anyhow::Result<()> {
    let defaults = args.images.defaults()?;
    for file in &args.files {
        let text =
            std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
        let out = render::render(&text, &args.namespace, args.uid.as_deref(), &defaults)
            .with_context(|| format!("{}", file.display()))?;
        print!("{out}");
    }
    Ok(())
}

/// Serves `/health` and `/metrics`, waits for leadership, reconciles until a signal (or the
/// loss of leadership), then releases the Lease.
async fn operate(cfg: RunConfig) -> anyhow::Result<()> {
    // kube's TLS is rustls, which needs a process-wide crypto provider; a second install is
    // harmless.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = kube::Client::try_default()
        .await
        .context("connecting to Kubernetes (in-cluster service account or kubeconfig)")?;
    let metrics = Arc::new(Metrics::default());
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .with_context(|| format!("binding {}", cfg.listen))?;
    let (stop, stopped) = watch::channel(false);
    let server = {
        let state = ServerState {
            metrics: metrics.clone(),
        };
        let mut rx = stopped.clone();
        tokio::spawn(server::run(listener, state, async move {
            let _ = rx.wait_for(|s| *s).await;
        }))
    };
    tracing::info!(
        listen = %cfg.listen,
        scope = ?cfg.scope,
        identity = %cfg.identity,
        leader_election = cfg.lease.is_some(),
        "hotprefix-operator starting"
    );
    let signal = hotprefix_telemetry::shutdown_signal();
    tokio::pin!(signal);
    let mut lock = cfg.lease.as_ref().map(|(ns, name)| {
        LeaseLock::new(
            kube::Api::<Lease>::namespaced(client.clone(), ns),
            name,
            &cfg.identity,
            LeaseTimings::default(),
        )
    });
    if let Some(lock) = lock.as_mut() {
        tokio::select! {
            () = leader::acquire(lock) => {}
            () = &mut signal => {
                let _ = stop.send(true);
                let _ = server.await;
                return Ok(());
            }
        }
    }
    metrics.set_leader(true);
    let ctx = Context::new(
        client.clone(),
        cfg.defaults.clone(),
        Reporter {
            controller: "hotprefix-operator".into(),
            instance: Some(cfg.identity.clone()),
        },
        metrics.clone(),
    );
    let mut controller = tokio::spawn(controller::run(client, cfg.scope.clone(), ctx, stopped));
    let lost = async {
        match lock.as_mut() {
            Some(lock) => leader::hold(lock).await,
            None => std::future::pending().await,
        }
    };
    let outcome = tokio::select! {
        () = &mut signal => {
            tracing::info!("shutting down: finishing reconciliations in flight");
            Ok(())
        }
        () = lost => Err(anyhow::anyhow!("lost the leader lease; exiting so that a fresh start can compete again")),
        r = &mut controller => {
            r.context("the controller task failed")?;
            Err(anyhow::anyhow!("the controller stopped unexpectedly"))
        }
    };
    metrics.set_leader(false);
    let _ = stop.send(true);
    if !controller.is_finished() {
        let _ = controller.await;
    }
    if outcome.is_ok()
        && let Some(lock) = lock.as_mut()
    {
        match lock.release().await {
            Ok(()) => tracing::info!("released the leader lease"),
            Err(e) => {
                tracing::warn!(error = %e, "releasing the leader lease failed; it expires on its own")
            }
        }
    }
    match server.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!(error = %e, "the HTTP server failed"),
        Err(e) => tracing::warn!(error = %e, "the HTTP server task failed"),
    }
    outcome
}
