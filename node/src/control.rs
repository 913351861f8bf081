//! The local control socket: a Unix socket in the data dir (mode 0600) that
//! client subcommands use to talk to the running daemon.
//!
//! Protocol: one JSON request per line, `{"method": "image.ls", "params": {...}}`;
//! the daemon answers with zero or more `{"progress": {...}}` lines and then one
//! `{"ok": <value>}` or `{"error": "<message>"}` line. Services register their
//! methods and their `status` sections on a [`Router`].

use std::collections::BTreeMap;
use std::future::Future;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream as StdUnixStream;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader as TokioBufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::mpsc;
use tracing::{debug, warn};

use crate::error::{Error, Result};

/// Longest request line the daemon reads.
const MAX_REQUEST_BYTES: usize = 1 << 20;

/// A method's parameters, or the one-line error the client sees.
pub fn parse_params<T: serde::de::DeserializeOwned>(params: Value) -> Result<T> {
    serde_json::from_value(params).map_err(|e| Error::Control(format!("bad parameters: {e}")))
}

/// Run a method's blocking work (store, netlink) off the async threads.
pub async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::Control(format!("worker failed: {e}")))?
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Request {
    pub method: String,
    #[serde(default)]
    pub params: Value,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProgressUpdate {
    pub what: String,
    pub done: u64,
    pub total: u64,
    /// Structured detail (e.g. the state of every guest of a `run`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<Value>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Reply {
    Progress(ProgressUpdate),
    Ok(Value),
    Error(String),
}

/// Lets a handler report progress of a long operation to the waiting client.
#[derive(Clone)]
pub struct Progress {
    tx: Option<mpsc::UnboundedSender<Reply>>,
}

impl Progress {
    pub fn report(&self, what: &str, done: u64, total: u64) {
        if let Some(tx) = &self.tx {
            let _ = tx.send(Reply::Progress(ProgressUpdate {
                what: what.to_string(),
                done,
                total,
                detail: None,
            }));
        }
    }

    /// Report a structured event (shown by clients that know `what`).
    pub fn event(&self, what: &str, detail: Value) {
        if let Some(tx) = &self.tx {
            let _ = tx.send(Reply::Progress(ProgressUpdate {
                what: what.to_string(),
                done: 0,
                total: 0,
                detail: Some(detail),
            }));
        }
    }

    /// A progress sink that feeds `tx` (a service's own waiter, not a client).
    pub fn to_channel(tx: mpsc::UnboundedSender<Reply>) -> Progress {
        Progress { tx: Some(tx) }
    }
}

pub type HandlerFuture = Pin<Box<dyn Future<Output = Result<Value>> + Send>>;
type Handler = Arc<dyn Fn(Value, Progress) -> HandlerFuture + Send + Sync>;
type StatusFn = Arc<dyn Fn() -> Value + Send + Sync>;

/// Method table of the daemon. Each service registers its own methods
/// (`image.*`, `overlay.*`, ...) and a section of `status`.
#[derive(Default, Clone)]
pub struct Router {
    handlers: BTreeMap<String, Handler>,
    status: Vec<(String, StatusFn)>,
}

impl Router {
    /// Register `name`; `f` gets the request's params and a progress sink.
    pub fn method<F, Fut>(&mut self, name: &str, f: F)
    where
        F: Fn(Value, Progress) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Value>> + Send + 'static,
    {
        let prev = self
            .handlers
            .insert(name.to_string(), Arc::new(move |p, pr| Box::pin(f(p, pr))));
        assert!(prev.is_none(), "control method {name} registered twice");
    }

    /// Add a section (a JSON object under `name`) to the `status` reply.
    pub fn status_section<F>(&mut self, name: &str, f: F)
    where
        F: Fn() -> Value + Send + Sync + 'static,
    {
        self.status.push((name.to_string(), Arc::new(f)));
    }

    /// The full status object: every registered section.
    pub fn status(&self) -> Value {
        let mut obj = serde_json::Map::new();
        for (name, f) in &self.status {
            obj.insert(name.clone(), f());
        }
        Value::Object(obj)
    }

    pub async fn call(&self, method: &str, params: Value, progress: Progress) -> Result<Value> {
        if method == "status" {
            return Ok(self.status());
        }
        match self.handlers.get(method) {
            Some(h) => h(params, progress).await,
            None => Err(Error::UnknownMethod(method.to_string())),
        }
    }
}

/// Bind the control socket. A stale socket file (no daemon answering) is
/// replaced; a live one means another daemon owns this data dir.
pub fn bind(path: &Path, data_dir: &Path) -> Result<UnixListener> {
    if path.exists() {
        if StdUnixStream::connect(path).is_ok() {
            return Err(Error::DaemonRunning {
                dir: data_dir.to_path_buf(),
            });
        }
        std::fs::remove_file(path)
            .map_err(|e| Error::io(format!("removing stale {}", path.display()), e))?;
    }
    let listener = UnixListener::bind(path)
        .map_err(|e| Error::io(format!("binding control socket {}", path.display()), e))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| Error::io(format!("chmod {}", path.display()), e))?;
    Ok(listener)
}

/// Serve control connections until the task is dropped.
pub async fn serve(listener: UnixListener, router: Arc<Router>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let router = router.clone();
                tokio::spawn(async move {
                    if let Err(e) = serve_one(stream, router).await {
                        debug!(error = %e, "control connection ended");
                    }
                });
            }
            Err(e) => {
                warn!(error = %e, "control socket accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    }
}

async fn serve_one(stream: UnixStream, router: Arc<Router>) -> std::io::Result<()> {
    let (rd, mut wr) = stream.into_split();
    let mut rd = TokioBufReader::new(rd);
    let mut line = Vec::new();
    loop {
        line.clear();
        let n = (&mut rd)
            .take(MAX_REQUEST_BYTES as u64 + 1)
            .read_until(b'\n', &mut line)
            .await?;
        if n == 0 {
            return Ok(());
        }
        let (tx, mut rx) = mpsc::unbounded_channel();
        if n > MAX_REQUEST_BYTES {
            let _ = tx.send(Reply::Error(format!(
                "request longer than {MAX_REQUEST_BYTES} bytes"
            )));
            drop(tx);
        } else {
            match serde_json::from_slice::<Request>(&line) {
                Ok(req) => {
                    let router = router.clone();
                    let progress = Progress {
                        tx: Some(tx.clone()),
                    };
                    tokio::spawn(async move {
                        let reply = match router.call(&req.method, req.params, progress).await {
                            Ok(v) => Reply::Ok(v),
                            Err(e) => Reply::Error(e.to_string()),
                        };
                        let _ = tx.send(reply);
                    });
                }
                Err(e) => {
                    let _ = tx.send(Reply::Error(format!("malformed request: {e}")));
                    drop(tx);
                }
            }
        }
        while let Some(reply) = rx.recv().await {
            let last = !matches!(reply, Reply::Progress(_));
            let mut out = serde_json::to_vec(&reply).expect("replies serialise");
            out.push(b'\n');
            wr.write_all(&out).await?;
            if last {
                break;
            }
        }
        if n > MAX_REQUEST_BYTES {
            return Ok(());
        }
    }
}

/// Blocking client used by the subcommands.
pub struct Client {
    reader: BufReader<StdUnixStream>,
    writer: StdUnixStream,
}

/// Which daemon a client command needs: the "no daemon" error says how to start it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    Buyer,
    Seller,
    /// Either role serves the command (status, images, `overlay ls`).
    Any,
}

impl Need {
    /// What to tell a user who has no daemon running for `dir`.
    pub fn hint(self, dir: &Path) -> String {
        let d = dir.display();
        match self {
            Need::Buyer | Need::Seller => {
                let role = if self == Need::Buyer { "buyer" } else { "seller" };
                format!("this command needs a {role} daemon: start one with `cpushare-node --role {role} --data-dir {d}`")
            }
            Need::Any => format!(
                "start one with `cpushare-node --role seller --data-dir {d}` to sell, or `--role buyer` to rent"
            ),
        }
    }
}

impl Client {
    /// Connect to the daemon of `data_dir`; with no daemon, the error says to start
    /// one of either role (see [`Client::connect_as`]).
    pub fn connect(socket: &Path, data_dir: &Path) -> Result<Client> {
        Client::connect_as(socket, data_dir, Need::Any)
    }

    /// Connect for a command that `need`s a daemon of one role.
    pub fn connect_as(socket: &Path, data_dir: &Path, need: Need) -> Result<Client> {
        let stream = StdUnixStream::connect(socket).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
                Error::NoDaemon {
                    dir: data_dir.to_path_buf(),
                    hint: need.hint(data_dir),
                }
            }
            _ => Error::io(format!("connecting to {}", socket.display()), e),
        })?;
        let writer = stream
            .try_clone()
            .map_err(|e| Error::io("control socket", e))?;
        Ok(Client {
            reader: BufReader::new(stream),
            writer,
        })
    }

    /// Call `method`; `on_progress` sees every progress line before the result.
    pub fn call(
        &mut self,
        method: &str,
        params: Value,
        mut on_progress: impl FnMut(&ProgressUpdate),
    ) -> Result<Value> {
        let mut req = serde_json::to_vec(&Request {
            method: method.to_string(),
            params,
        })
        .expect("requests serialise");
        req.push(b'\n');
        self.writer
            .write_all(&req)
            .map_err(|e| Error::io("writing to the control socket", e))?;
        let mut line = String::new();
        loop {
            line.clear();
            let n = self
                .reader
                .read_line(&mut line)
                .map_err(|e| Error::io("reading from the control socket", e))?;
            if n == 0 {
                return Err(Error::Control(
                    "the daemon closed the connection without answering (did it crash? see its log)"
                        .into(),
                ));
            }
            match serde_json::from_str::<Reply>(&line) {
                Ok(Reply::Progress(p)) => on_progress(&p),
                Ok(Reply::Ok(v)) => return Ok(v),
                Ok(Reply::Error(msg)) => return Err(Error::Remote(msg)),
                Err(e) => return Err(Error::Control(format!("unreadable reply: {e}"))),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn methods_progress_errors_and_status_sections() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("control.sock");
        let mut router = Router::default();
        router.method("test.echo", |params, progress: Progress| async move {
            progress.report("echo", 1, 2);
            Ok(params)
        });
        router.method("test.fail", |_, _| async {
            Err(Error::Remote("nope".into()))
        });
        router.status_section("store", || serde_json::json!({"bytes": 5}));
        let listener = bind(&sock, dir.path()).unwrap();
        let server = tokio::spawn(serve(listener, Arc::new(router)));

        let sock2 = sock.clone();
        let dir2 = dir.path().to_path_buf();
        tokio::task::spawn_blocking(move || {
            let mut c = Client::connect(&sock2, &dir2).unwrap();
            let mut seen = 0;
            let v = c
                .call("test.echo", serde_json::json!({"a": 1}), |_| seen += 1)
                .unwrap();
            assert_eq!(v, serde_json::json!({"a": 1}));
            assert_eq!(seen, 1);
            let e = c.call("test.fail", Value::Null, |_| {}).unwrap_err();
            assert_eq!(e.to_string(), "nope");
            let e = c.call("nope.nope", Value::Null, |_| {}).unwrap_err();
            assert!(e.to_string().contains("unknown control method"), "{e}");
            let s = c.call("status", Value::Null, |_| {}).unwrap();
            assert_eq!(s["store"]["bytes"], 5);
            // A second daemon on the same data dir is refused.
            let e = bind(&sock2, &dir2).unwrap_err();
            assert!(matches!(e, Error::DaemonRunning { .. }));
        })
        .await
        .unwrap();
        server.abort();
    }

    #[test]
    fn no_daemon_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let e = Client::connect(&dir.path().join("control.sock"), dir.path())
            .err()
            .unwrap();
        assert!(e.to_string().contains("no cpushare-node daemon"), "{e}");
        let e = Client::connect_as(&dir.path().join("control.sock"), dir.path(), Need::Buyer)
            .err()
            .unwrap();
        assert!(e.to_string().contains("needs a buyer daemon"), "{e}");
        assert!(e.to_string().contains("--role buyer --data-dir"), "{e}");
        let e = Client::connect_as(&dir.path().join("control.sock"), dir.path(), Need::Seller)
            .err()
            .unwrap();
        assert!(e.to_string().contains("--role seller"), "{e}");
    }
}
