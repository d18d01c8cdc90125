//! Test harness shared by HotPrefix's crates: [`RedisServer`] runs a real `redis-server` (from
//! `PATH`) on a free loopback port, without persistence, optionally behind a password and/or
//! TLS with a freshly generated CA, and kills it when dropped.
//!
//! Tests use it instead of mocks because the contract they check (key expiry, pub/sub,
//! reconnection after a restart, AUTH and TLS handshakes) is the real server's behaviour.
//!
//! ```no_run
//! let redis = hotprefix_testkit::RedisServer::start();
//! let mut con = redis.connection();
//! let pong: String = redis::cmd("PING").query(&mut con).unwrap();
//! assert_eq!(pong, "PONG");
//! ```

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom};
use std::net::{Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use thiserror::Error;

/// The binary the harness runs; it must be on `PATH`.
pub const REDIS_SERVER: &str = "redis-server";

/// How long a starting server gets to answer PING. Generous because tests run on small,
/// loaded machines where a process start can take seconds.
const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// How many fresh ports a start tries: the port is free when chosen but another process can
/// take it before redis binds it, and then the next try picks another.
const PORT_ATTEMPTS: usize = 5;

/// Why a server could not be started.
#[derive(Debug, Error)]
pub enum HarnessError {
    /// `redis-server` could not be executed.
    #[error(
        "cannot run `{REDIS_SERVER}` ({0}): it must be on PATH for these tests \
         (Debian/Ubuntu: `apt-get install redis-server`)"
    )]
    Missing(io::Error),
    /// A file or socket operation of the harness failed.
    #[error("{what}: {source}")]
    Io {
        /// What the harness was doing.
        what: String,
        /// The error.
        source: io::Error,
    },
    /// The test certificates could not be generated.
    #[error("generating the test certificates: {0}")]
    Certificates(#[from] rcgen::Error),
    /// The server did not come up.
    #[error("redis-server on port {port} did not answer PING: {why}; its log ends with:\n{log}")]
    NotReady {
        /// The port it was started on.
        port: u16,
        /// What went wrong (exited, timed out).
        why: String,
        /// The last lines of its output.
        log: String,
    },
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> HarnessError {
    let what = what.into();
    move |source| HarnessError::Io { what, source }
}

/// How a [`RedisServer`] is set up.
#[derive(Clone, Debug, Default)]
pub struct RedisOptions {
    /// Require this password (`--requirepass`) from every client.
    pub password: Option<String>,
    /// Serve TLS only (no plain port), with a certificate for `127.0.0.1` and `localhost`
    /// signed by a CA generated for this server ([`RedisServer::ca_file`]).
    pub tls: bool,
}

/// The certificate files of a TLS server.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    /// The CA certificate (PEM) that clients trust.
    pub ca: PathBuf,
    /// The server's certificate (PEM), for `127.0.0.1` and `localhost`.
    pub cert: PathBuf,
    /// The server's private key (PEM).
    pub key: PathBuf,
}

/// A `redis-server` child process on `127.0.0.1`, killed on drop. Its data lives only in
/// memory (`--save "" --appendonly no`), so a [`RedisServer::restart`] starts empty, as a
/// crashed Redis without persistence would.
#[derive(Debug)]
pub struct RedisServer {
    child: Option<Child>,
    port: u16,
    dir: PathBuf,
    opts: RedisOptions,
    tls: Option<TlsFiles>,
}

impl RedisServer {
    /// A plain server with no password. Panics with the reason if it cannot start.
    pub fn start() -> RedisServer {
        Self::start_with(RedisOptions::default())
    }

    /// A server that requires `password`. Panics with the reason if it cannot start.
    pub fn with_password(password: &str) -> RedisServer {
        Self::start_with(RedisOptions {
            password: Some(password.to_string()),
            ..RedisOptions::default()
        })
    }

    /// A TLS-only server whose certificate is signed by a fresh CA ([`RedisServer::ca_file`]).
    /// Panics with the reason if it cannot start.
    pub fn with_tls() -> RedisServer {
        Self::start_with(RedisOptions {
            tls: true,
            ..RedisOptions::default()
        })
    }

    /// A server set up as `opts` says. Panics with the reason if it cannot start, since a test
    /// cannot do anything useful without it.
    pub fn start_with(opts: RedisOptions) -> RedisServer {
        match Self::try_start(opts) {
            Ok(s) => s,
            Err(e) => panic!("cannot start the test Redis: {e}"),
        }
    }

    /// A server set up as `opts` says, or why it could not start.
    pub fn try_start(opts: RedisOptions) -> Result<RedisServer, HarnessError> {
        install_crypto_provider();
        let dir = make_temp_dir()?;
        let tls = if opts.tls {
            Some(write_certificates(&dir)?)
        } else {
            None
        };
        let mut server = RedisServer {
            child: None,
            port: 0,
            dir,
            opts,
            tls,
        };
        let mut last = None;
        for _ in 0..PORT_ATTEMPTS {
            server.port = free_port()?;
            match server.spawn_and_wait() {
                Ok(()) => return Ok(server),
                // `redis-server` missing will not get better with another port.
                Err(e @ HarnessError::Missing(_)) => return Err(e),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| HarnessError::NotReady {
            port: server.port,
            why: "no attempt was made".into(),
            log: String::new(),
        }))
    }

    /// The URL clients connect with: `redis://` or `rediss://` to `127.0.0.1` and the port,
    /// with the password (percent-encoded) if the server has one.
    pub fn url(&self) -> String {
        let auth = match &self.opts.password {
            Some(p) => format!(":{}@", percent_encode(p)),
            None => String::new(),
        };
        format!("{}://{auth}127.0.0.1:{}", self.scheme(), self.port)
    }

    /// The URL without credentials (for clients given the password another way).
    pub fn url_without_password(&self) -> String {
        format!("{}://127.0.0.1:{}", self.scheme(), self.port)
    }

    fn scheme(&self) -> &'static str {
        if self.tls.is_some() {
            "rediss"
        } else {
            "redis"
        }
    }

    /// The port it listens on (the TLS port for a TLS server, which has no plain port).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The password it requires, if any.
    pub fn password(&self) -> Option<&str> {
        self.opts.password.as_deref()
    }

    /// The CA certificate file (PEM) a TLS server's certificate chains to.
    pub fn ca_file(&self) -> Option<&Path> {
        self.tls.as_ref().map(|t| t.ca.as_path())
    }

    /// All certificate files of a TLS server.
    pub fn tls_files(&self) -> Option<&TlsFiles> {
        self.tls.as_ref()
    }

    /// Whether the process is running (not stopped, not exited).
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// A client configured for this server: its URL with the password, and for TLS its CA as
    /// the only root.
    pub fn client(&self) -> redis::Client {
        install_crypto_provider();
        let built = match &self.tls {
            Some(t) => match fs::read(&t.ca) {
                Ok(pem) => redis::Client::build_with_tls(
                    self.url(),
                    redis::TlsCertificates {
                        client_tls: None,
                        root_cert: Some(pem),
                    },
                ),
                Err(e) => panic!("cannot read the test CA {}: {e}", t.ca.display()),
            },
            None => redis::Client::open(self.url()),
        };
        match built {
            Ok(c) => c,
            Err(e) => panic!("cannot build a client for the test Redis: {e}"),
        }
    }

    /// A new synchronous connection (PING answered), panicking with the reason if there is
    /// none within a few seconds.
    pub fn connection(&self) -> redis::Connection {
        match self.try_connection(Duration::from_secs(5)) {
            Ok(c) => c,
            Err(e) => panic!(
                "cannot connect to the test Redis on port {}: {e}",
                self.port
            ),
        }
    }

    fn try_connection(&self, timeout: Duration) -> redis::RedisResult<redis::Connection> {
        let mut con = self.client().get_connection_with_timeout(timeout)?;
        con.set_read_timeout(Some(timeout))?;
        con.set_write_timeout(Some(timeout))?;
        let _: String = redis::cmd("PING").query(&mut con)?;
        Ok(con)
    }

    /// Kills the server (SIGKILL: no chance to save or say goodbye, like a crash) and waits
    /// for it to exit. Its port stays reserved for [`RedisServer::restart`].
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Freezes the server (SIGSTOP): connections still open, as the kernel accepts them, but
    /// nothing is answered, like a Redis stuck on a slow command or a dead network path.
    /// Panics if the signal cannot be sent.
    pub fn pause(&mut self) {
        self.signal("-STOP");
    }

    /// Lets a [`RedisServer::pause`]d server run again (SIGCONT).
    pub fn resume(&mut self) {
        self.signal("-CONT");
    }

    /// Sends `sig` with the `kill` command (the workspace forbids `unsafe`, so no `libc`).
    fn signal(&mut self, sig: &str) {
        let Some(pid) = self.child.as_ref().map(Child::id) else {
            panic!("the test Redis is not running");
        };
        match Command::new("kill").arg(sig).arg(pid.to_string()).status() {
            Ok(s) if s.success() => {}
            Ok(s) => panic!("kill {sig} {pid} failed: {s}"),
            Err(e) => panic!("cannot run `kill` to send {sig} to the test Redis: {e}"),
        }
    }

    /// Stops the server if it runs and starts it again on the same port, empty. Panics with
    /// the reason if it does not come back.
    pub fn restart(&mut self) {
        self.stop();
        // The port was just released; a client's half-closed connection can keep it busy for
        // a moment, so retry for a while instead of picking another port (clients must find
        // the server where it was).
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            match self.spawn_and_wait() {
                Ok(()) => return,
                Err(e @ HarnessError::Missing(_)) => panic!("cannot restart the test Redis: {e}"),
                Err(e) if Instant::now() >= deadline => {
                    panic!("cannot restart the test Redis: {e}")
                }
                Err(_) => std::thread::sleep(Duration::from_millis(200)),
            }
        }
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join("redis.log")
    }

    fn args(&self) -> Vec<String> {
        let mut a: Vec<String> = [
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--daemonize",
            "no",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        a.push("--dir".into());
        a.push(self.dir.display().to_string());
        match &self.tls {
            Some(t) => {
                for (flag, value) in [
                    ("--port", "0".to_string()),
                    ("--tls-port", self.port.to_string()),
                    ("--tls-cert-file", t.cert.display().to_string()),
                    ("--tls-key-file", t.key.display().to_string()),
                    ("--tls-ca-cert-file", t.ca.display().to_string()),
                    ("--tls-auth-clients", "no".to_string()),
                ] {
                    a.push(flag.into());
                    a.push(value);
                }
            }
            None => {
                a.push("--port".into());
                a.push(self.port.to_string());
            }
        }
        if let Some(p) = &self.opts.password {
            a.push("--requirepass".into());
            a.push(p.clone());
        }
        a
    }

    /// Starts the process on `self.port` and waits until it answers PING; on failure the
    /// process is gone again.
    fn spawn_and_wait(&mut self) -> Result<(), HarnessError> {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .map_err(io_err("opening the redis log"))?;
        let log_start = log.metadata().map(|m| m.len()).unwrap_or(0);
        let err_log = log.try_clone().map_err(io_err("opening the redis log"))?;
        let child = Command::new(REDIS_SERVER)
            .args(self.args())
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err_log)
            .spawn()
            .map_err(HarnessError::Missing)?;
        self.child = Some(child);
        let deadline = Instant::now() + READY_TIMEOUT;
        let why = loop {
            if let Some(c) = self.child.as_mut()
                && let Ok(Some(status)) = c.try_wait()
            {
                self.child = None;
                break format!("it exited ({status})");
            }
            match self.try_connection(Duration::from_secs(1)) {
                Ok(_) => return Ok(()),
                Err(e) if Instant::now() >= deadline => {
                    break format!("not within {READY_TIMEOUT:?} (last error: {e})");
                }
                Err(_) => std::thread::sleep(Duration::from_millis(25)),
            }
        };
        self.stop();
        Err(HarnessError::NotReady {
            port: self.port,
            why,
            log: tail(&self.log_path(), log_start),
        })
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// Installs rustls's `ring` provider as the process default (the workspace builds rustls with
/// `ring` only, and rustls refuses to guess when no default is set). Installing twice is
/// harmless: the second call just reports that one is installed.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// `text` with every byte outside URL-safe characters written as `%XX`, so that a password
/// with `@`, `/` or `:` stays inside the URL's user-info.
fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A port that was free a moment ago on 127.0.0.1 (the listener is dropped before returning).
fn free_port() -> Result<u16, HarnessError> {
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).map_err(io_err("finding a free port"))?;
    let port = l
        .local_addr()
        .map_err(io_err("finding a free port"))?
        .port();
    Ok(port)
}

/// A new private directory for one server's log, data directory and certificates.
fn make_temp_dir() -> Result<PathBuf, HarnessError> {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let dir = std::env::temp_dir().join(format!(
        "hotprefix-redis-{}-{}-{nanos}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    fs::create_dir_all(&dir).map_err(io_err(format!("creating {}", dir.display())))?;
    Ok(dir)
}

/// Generates a CA and a server certificate for `127.0.0.1` and `localhost` signed by it, and
/// writes them (PEM) into `dir`.
fn write_certificates(dir: &Path) -> Result<TlsFiles, HarnessError> {
    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "HotPrefix test CA");
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca_params, ca_key);

    let server_key = KeyPair::generate()?;
    let mut params = CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".into()])?;
    params
        .distinguished_name
        .push(DnType::CommonName, "HotPrefix test Redis");
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let server_cert = params.signed_by(&server_key, &issuer)?;

    let files = TlsFiles {
        ca: dir.join("ca.pem"),
        cert: dir.join("server.pem"),
        key: dir.join("server-key.pem"),
    };
    for (path, pem) in [
        (&files.ca, ca_cert.pem()),
        (&files.cert, server_cert.pem()),
        (&files.key, server_key.serialize_pem()),
    ] {
        fs::write(path, pem).map_err(io_err(format!("writing {}", path.display())))?;
    }
    Ok(files)
}

/// The last lines of what the server wrote to `path` since byte `from`, for error messages.
fn tail(path: &Path, from: u64) -> String {
    let mut text = String::new();
    if let Ok(mut f) = File::open(path)
        && f.seek(SeekFrom::Start(from)).is_ok()
    {
        let _ = f.read_to_string(&mut text);
    }
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn ping(con: &mut redis::Connection) -> String {
        redis::cmd("PING").query(con).unwrap()
    }

    #[test]
    fn plain_server_answers_and_forgets_everything_on_restart() {
        let mut s = RedisServer::start();
        assert!(s.url().starts_with("redis://127.0.0.1:"));
        assert_eq!(s.url(), s.url_without_password());
        let mut con = s.connection();
        assert_eq!(ping(&mut con), "PONG");
        let _: () = redis::cmd("SET").arg("k").arg("v").query(&mut con).unwrap();

        let port = s.port();
        s.stop();
        assert!(!s.is_running());
        // A stopped server refuses connections.
        assert!(
            s.client()
                .get_connection_with_timeout(Duration::from_secs(1))
                .is_err()
        );
        s.restart();
        assert!(s.is_running());
        assert_eq!(s.port(), port, "a restart keeps the port");
        let mut con = s.connection();
        let v: Option<String> = redis::cmd("GET").arg("k").query(&mut con).unwrap();
        assert_eq!(v, None, "a restarted server starts empty");
    }

    #[test]
    fn password_server_refuses_clients_without_it() {
        // Characters that mean something in a URL are percent-encoded into it.
        let s = RedisServer::with_password("s3cret/p@ss word");
        assert_eq!(s.password(), Some("s3cret/p@ss word"));
        assert!(s.url().contains(":s3cret%2Fp%40ss%20word@"), "{}", s.url());
        assert_eq!(ping(&mut s.connection()), "PONG");
        let mut anon = redis::Client::open(s.url_without_password())
            .unwrap()
            .get_connection_with_timeout(Duration::from_secs(5))
            .unwrap();
        let e = redis::cmd("PING").query::<String>(&mut anon).unwrap_err();
        assert!(e.to_string().contains("NOAUTH"), "{e}");
    }

    #[test]
    fn tls_server_is_reachable_with_its_ca_only() {
        let s = RedisServer::with_tls();
        assert!(s.url().starts_with("rediss://127.0.0.1:"));
        let ca = s.ca_file().unwrap();
        assert!(
            fs::read_to_string(ca)
                .unwrap()
                .contains("BEGIN CERTIFICATE")
        );
        assert_eq!(ping(&mut s.connection()), "PONG");
        // Plain text to the TLS port gets no answer (the handshake fails).
        let mut plain = redis::Client::open(format!("redis://127.0.0.1:{}", s.port()))
            .unwrap()
            .get_connection_with_timeout(Duration::from_secs(2));
        if let Ok(c) = plain.as_mut() {
            c.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            assert!(redis::cmd("PING").query::<String>(c).is_err());
        }
        // A client that trusts another CA refuses the server's certificate.
        let other = RedisServer::with_tls();
        let pem = fs::read(other.ca_file().unwrap()).unwrap();
        let wrong = redis::Client::build_with_tls(
            s.url(),
            redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(pem),
            },
        )
        .unwrap();
        assert!(
            wrong
                .get_connection_with_timeout(Duration::from_secs(5))
                .is_err()
        );
    }

    #[test]
    fn a_paused_server_accepts_but_does_not_answer_until_resumed() {
        let mut s = RedisServer::start();
        let mut con = s.connection();
        s.pause();
        con.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        assert!(redis::cmd("PING").query::<String>(&mut con).is_err());
        s.resume();
        assert_eq!(ping(&mut s.connection()), "PONG");
        // Dropping a paused server still kills it.
        s.pause();
    }

    #[test]
    fn dropping_the_server_kills_it_and_removes_its_files() {
        let s = RedisServer::with_tls();
        let dir = s.dir.clone();
        let client = s.client();
        assert!(dir.exists());
        drop(s);
        assert!(!dir.exists());
        assert!(
            client
                .get_connection_with_timeout(Duration::from_secs(1))
                .is_err()
        );
    }
}
