//! The end-to-end test against a real cluster, run when `KUBECONFIG` is set (and skipped,
//! saying so, otherwise): applies the CRD, runs the operator's controller in this process
//! against a fresh namespace, applies `examples/minimal.yaml` there and waits until the
//! service reports `Ready`; then deletes the namespace.
//!
//! The images must be pullable by the cluster: `HOTPREFIX_E2E_ENGINE_IMAGE`,
//! `HOTPREFIX_E2E_ROUTER_IMAGE` (and optionally `HOTPREFIX_E2E_REDIS_IMAGE`,
//! `HOTPREFIX_E2E_DOWNLOADER_IMAGE`) override the release defaults; `HOTPREFIX_E2E_TIMEOUT_S`
//! (default 1200) bounds the wait, `HOTPREFIX_E2E_KEEP=1` keeps the namespace for a look.
//! Run it alone: `KUBECONFIG=~/.kube/config cargo test -p hotprefix-operator --test e2e`.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use hotprefix_operator::controller::{self, Context, Scope};
use hotprefix_operator::crd::{self, HotPrefixService, Phase};
use hotprefix_operator::metrics::Metrics;
use hotprefix_operator::render;
use hotprefix_operator::resources::Defaults;
use hotprefix_operator::status;
use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::events::Reporter;

fn main() {
    if std::env::var_os("KUBECONFIG").is_none() {
        println!("e2e: skipped: KUBECONFIG is not set (no cluster to run against)");
        return;
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    match rt.block_on(run()) {
        Ok(()) => println!("e2e: passed"),
        Err(e) => {
            eprintln!("e2e: FAILED: {e:#}");
            std::process::exit(1);
        }
    }
}

fn image(var: &str, default: String) -> String {
    std::env::var(var)
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or(default)
}

async fn run() -> anyhow::Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = kube::Client::try_default().await?;
    let manager = PatchParams::apply("hotprefix-e2e").force();

    // The CRD, as the chart installs it, and until the API server serves it.
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let definition = crd::definition();
    let name = definition.metadata.name.clone().unwrap();
    crds.patch(&name, &manager, &Patch::Apply(&definition))
        .await?;
    let started = Instant::now();
    loop {
        let c = crds.get(&name).await?;
        let established = c
            .status
            .and_then(|s| s.conditions)
            .unwrap_or_default()
            .iter()
            .any(|c| c.type_ == "Established" && c.status == "True");
        if established {
            break;
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(60),
            "the CRD was not established"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    println!("e2e: CRD established");

    let ns = format!("hotprefix-e2e-{}", std::process::id());
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let mut n = Namespace::default();
    n.metadata.name = Some(ns.clone());
    namespaces.create(&PostParams::default(), &n).await?;
    println!("e2e: namespace {ns}");
    let result = in_namespace(client.clone(), &ns).await;
    if std::env::var_os("HOTPREFIX_E2E_KEEP").is_none() {
        namespaces.delete(&ns, &DeleteParams::background()).await?;
        println!("e2e: namespace {ns} deleted");
    }
    result
}

async fn in_namespace(client: kube::Client, ns: &str) -> anyhow::Result<()> {
    let base = Defaults::default();
    let defaults = Defaults {
        engine_image: image("HOTPREFIX_E2E_ENGINE_IMAGE", base.engine_image),
        router_image: image("HOTPREFIX_E2E_ROUTER_IMAGE", base.router_image),
        redis_image: image("HOTPREFIX_E2E_REDIS_IMAGE", base.redis_image),
        downloader_image: image("HOTPREFIX_E2E_DOWNLOADER_IMAGE", base.downloader_image),
    };
    let ctx = Context::new(
        client.clone(),
        defaults,
        Reporter {
            controller: "hotprefix-operator".into(),
            instance: Some("e2e".into()),
        },
        Arc::new(Metrics::default()),
    );
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let operator = tokio::spawn(controller::run(
        client.clone(),
        Scope::Namespaces(vec![ns.to_string()]),
        ctx,
        stopped,
    ));

    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../examples/minimal.yaml"
    ))?;
    let mut hps = render::parse(&text)?;
    hps.metadata.namespace = Some(ns.to_string());
    let name = hps.metadata.name.clone().unwrap();
    let api: Api<HotPrefixService> = Api::namespaced(client, ns);
    api.patch(
        &name,
        &PatchParams::apply("hotprefix-e2e").force(),
        &Patch::Apply(&hps),
    )
    .await?;
    println!("e2e: applied examples/minimal.yaml as {ns}/{name}");

    let timeout = std::env::var("HOTPREFIX_E2E_TIMEOUT_S")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1200);
    let started = Instant::now();
    let mut last = String::new();
    let outcome = loop {
        let h = api.get(&name).await?;
        let s = h.status.unwrap_or_default();
        let ready = status::condition(&s, status::READY);
        let line = format!(
            "phase {:?}, {}/{} engines ready, router ready {}: {}",
            s.phase.map(Phase::as_str),
            s.ready_replicas,
            h.spec.engine.replicas,
            s.router_ready,
            ready.map(|c| c.message.clone()).unwrap_or_default()
        );
        if line != last {
            println!("e2e: {line}");
            last = line;
        }
        if s.phase == Some(Phase::Ready) {
            println!(
                "e2e: Ready after {:?}, endpoint {:?}",
                started.elapsed(),
                s.endpoint
            );
            break Ok(());
        }
        if started.elapsed() > Duration::from_secs(timeout) {
            break Err(anyhow::anyhow!("not Ready after {timeout} s: {last}"));
        }
        tokio::time::sleep(Duration::from_secs(5)).await;
    };
    let _ = stop.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(30), operator).await;
    outcome
}
