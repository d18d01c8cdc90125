//! The model download init container's script, taken from the built engine pod and run with
//! `/bin/sh`, `curl` and `sha256sum` against a local HTTP server: a fresh download, a cached
//! file used without a request, a checksum mismatch refused, a corrupt cached file and a
//! partial file from a server that cannot resume both replaced, and the bearer token sent.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::routing::get;
use hotprefix_operator::render;
use hotprefix_operator::resources::{self, Defaults};

const MODEL: &[u8] = &[7u8; 200_000];

#[derive(Clone, Default)]
struct Seen {
    requests: Arc<Mutex<Vec<Option<String>>>>,
}

async fn model(State(s): State<Seen>, headers: HeaderMap) -> Vec<u8> {
    let auth = headers
        .get("authorization")
        .map(|v| v.to_str().unwrap().to_string());
    s.requests.lock().unwrap().push(auth);
    MODEL.to_vec()
}

/// The script of the `download-model` init container of the minimal example's engine pod.
fn script() -> String {
    let text = std::fs::read_to_string(format!(
        "{}/../examples/minimal.yaml",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap();
    let mut h = render::parse(&text).unwrap();
    h.metadata.namespace = Some("default".into());
    let c = resources::build(&h, &Defaults::default()).unwrap();
    let pod = c.engine.spec.unwrap().template.spec.unwrap();
    let init = &pod.init_containers.unwrap()[0];
    let cmd = init.command.clone().unwrap();
    assert_eq!(cmd[..2], ["/bin/sh", "-c"]);
    cmd[2].clone()
}

fn sha256(data: &[u8], dir: &Path) -> String {
    let p = dir.join("sum-input");
    std::fs::write(&p, data).unwrap();
    let out = Command::new("sha256sum")
        .arg(&p)
        .output()
        .expect("sha256sum is required");
    String::from_utf8(out.stdout).unwrap()[..64].to_string()
}

struct Run {
    models: PathBuf,
    tmp: PathBuf,
    url: String,
}

impl Run {
    fn run(&self, sha: Option<&str>, token: Option<&str>) -> Output {
        let mut cmd = Command::new("/bin/sh");
        cmd.arg("-c")
            .arg(script())
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("MODEL_DIR", &self.models)
            .env("MODEL_URL", &self.url)
            .env("MODEL_FILE", "m.gguf")
            .env("TMPDIR", &self.tmp);
        if let Some(s) = sha {
            cmd.env("MODEL_SHA256", s);
        }
        if let Some(t) = token {
            cmd.env("DOWNLOAD_TOKEN", t);
        }
        cmd.output().expect("curl and /bin/sh are required")
    }

    fn file(&self) -> PathBuf {
        self.models.join("m.gguf")
    }
}

#[tokio::test]
async fn the_download_script_downloads_once_verifies_and_recovers() {
    let seen = Seen::default();
    let app = Router::new()
        .route("/m.gguf", get(model))
        .with_state(seen.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let base = std::env::temp_dir().join(format!("hotprefix-download-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    let run = Run {
        models: base.join("models"),
        tmp: base.join("tmp"),
        url: format!("http://{addr}/m.gguf"),
    };
    std::fs::create_dir_all(&run.models).unwrap();
    std::fs::create_dir_all(&run.tmp).unwrap();
    let good = sha256(MODEL, &base);
    let requests = || seen.requests.lock().unwrap().clone();
    let ok = |o: &Output| {
        assert!(
            o.status.success(),
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
    };

    // A fresh download, checked, with the token sent as a bearer header.
    let sh = blocking(&run, Some(good.clone()), Some("hf_token")).await;
    ok(&sh);
    assert_eq!(std::fs::read(run.file()).unwrap(), MODEL);
    assert!(!run.models.join("m.gguf.part").exists());
    assert!(
        !run.tmp.join("download-header").exists(),
        "the token file is removed"
    );
    assert_eq!(requests(), [Some("Bearer hf_token".to_string())]);

    // Cached and verified: no request.
    let again = blocking(&run, Some(good.clone()), None).await;
    ok(&again);
    assert!(String::from_utf8_lossy(&again.stdout).contains("model cached"));
    assert_eq!(requests().len(), 1);

    // A corrupt cached file is downloaded again (without a token: no header).
    std::fs::write(run.file(), b"corrupt").unwrap();
    ok(&blocking(&run, Some(good.clone()), None).await);
    assert_eq!(std::fs::read(run.file()).unwrap(), MODEL);
    assert_eq!(requests().len(), 2);
    assert_eq!(requests()[1], None);

    // A partial file from an earlier attempt, and a server that ignores ranges: resuming
    // fails and a fresh download replaces it.
    std::fs::remove_file(run.file()).unwrap();
    std::fs::write(run.models.join("m.gguf.part"), &MODEL[..1000]).unwrap();
    ok(&blocking(&run, Some(good.clone()), None).await);
    assert_eq!(std::fs::read(run.file()).unwrap(), MODEL);

    // A checksum that does not match: refused, nothing left behind.
    std::fs::remove_file(run.file()).unwrap();
    let wrong = "0".repeat(64);
    let bad = blocking(&run, Some(wrong), None).await;
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("does not have SHA-256"));
    assert!(!run.file().exists() && !run.models.join("m.gguf.part").exists());

    // Without a checksum any complete file is kept.
    ok(&blocking(&run, None, None).await);
    assert_eq!(std::fs::read(run.file()).unwrap(), MODEL);
    let _ = std::fs::remove_dir_all(&base);
}

async fn blocking(run: &Run, sha: Option<String>, token: Option<&'static str>) -> Output {
    let (models, tmp, url) = (run.models.clone(), run.tmp.clone(), run.url.clone());
    tokio::task::spawn_blocking(move || Run { models, tmp, url }.run(sha.as_deref(), token))
        .await
        .unwrap()
}
