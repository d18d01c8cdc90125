//! The official OpenAI Python client against the server: `scripts/setup-python.sh` installs the
//! pinned `openai` package into `.venv`, the real model is served in-process on 127.0.0.1:0, and
//! `scripts/openai-client-check.py` runs its chat, streaming, completion, model-list and error
//! checks against it. Skipped, saying so, only where python3 is not installed at all.

#![allow(clippy::unwrap_used)]

mod common;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use hotprefix_engine::launch::launch;
use hotprefix_engine::server;
use tokio::net::TcpListener;

/// The workspace root, where the scripts and `.venv` are.
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// Runs `cmd` to its end or for at most `limit` (then kills it), returning its status (`None`
/// if it was killed) and its stdout and stderr together.
fn run_bounded(mut cmd: Command, limit: Duration) -> (Option<ExitStatus>, String) {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    // Read both pipes on threads, so that a chatty child never blocks on a full pipe.
    let drain = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut s = String::new();
            let _ = r.read_to_string(&mut s);
            s
        })
    };
    let out = drain(Box::new(child.stdout.take().unwrap()));
    let err = drain(Box::new(child.stderr.take().unwrap()));
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break Some(s);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let text = format!("{}{}", out.join().unwrap(), err.join().unwrap());
    (status, text)
}

#[test]
fn the_official_openai_python_client_works() {
    if Command::new("python3")
        .arg("--version")
        .output()
        .is_err_and(|e| e.kind() == std::io::ErrorKind::NotFound)
    {
        // The one reason to skip: everything else (no venv module, no PyPI) is a failure.
        eprintln!("SKIPPED the_official_openai_python_client_works: python3 is not installed");
        return;
    }
    let root = root();

    let mut setup = Command::new("bash");
    setup
        .arg(root.join("scripts/setup-python.sh"))
        .current_dir(&root);
    let (status, out) = run_bounded(setup, Duration::from_secs(600));
    assert!(
        status.is_some_and(|s| s.success()),
        "scripts/setup-python.sh failed ({status:?}):\n{out}"
    );

    let cfg = common::small_config(common::model_path().to_str().unwrap(), &[]);
    let state = launch(&cfg).unwrap();
    let engine = state.engine.clone();
    let model = state.model_id.clone();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let listener = rt.block_on(TcpListener::bind("127.0.0.1:0")).unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let shutdown = async move {
        let _ = stopped.await;
    };
    let served = rt.spawn(server::run(
        listener,
        state,
        shutdown,
        Duration::from_secs(5),
    ));

    let mut check = Command::new(root.join(".venv/bin/python"));
    check
        .arg(root.join("scripts/openai-client-check.py"))
        .args([
            "--base-url",
            &format!("http://{addr}/v1"),
            "--model",
            &model,
        ])
        .current_dir(&root)
        // A proxy configured for the machine must not be asked for 127.0.0.1.
        .env("NO_PROXY", "127.0.0.1,localhost")
        .env("no_proxy", "127.0.0.1,localhost");
    let started = Instant::now();
    let (status, out) = run_bounded(check, Duration::from_secs(300));
    println!("{out}");
    assert!(
        status.is_some_and(|s| s.success()),
        "scripts/openai-client-check.py failed ({status:?}, after {:?}):\n{out}",
        started.elapsed()
    );

    // Nothing leaked: every request the client made has let go of its blocks.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = rt.block_on(engine.cache_report(0)).unwrap();
        if r.locked_blocks == Some(0) && r.usage.device_outstanding == 0 && r.running == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "still held after 30 s: {r:?}");
        std::thread::sleep(Duration::from_millis(20));
    }

    let _ = stop.send(());
    rt.block_on(async { tokio::time::timeout(Duration::from_secs(30), served).await })
        .expect("server::run returns after the shutdown")
        .unwrap()
        .unwrap();
}
