//! The buyer's trusted-measurement and revocation lists, from files or URLs, kept
//! current: a file is re-read when its mtime or size changes, a URL is fetched again
//! every `refetch` with `If-None-Match` / `If-Modified-Since` (a 304 costs nothing).
//!
//! A list that fails to load keeps its last good content (a flaky server must not
//! empty a revocation list); a list that never loaded makes `--trusted-only` refuse,
//! saying why. The reloading runs on its own thread ([`TrustWatch`]); the buyer reads
//! the current policy from it.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use market::TrustPolicy;
use serde_json::{json, Value};
use tracing::{info, warn};

use crate::error::{Error, Result};

/// How often a file's mtime is looked at.
const FILE_POLL: Duration = Duration::from_secs(1);
/// Largest list accepted from a URL (64-hex lines: about 150 000 entries).
const MAX_BODY: u64 = 10 << 20;
const HTTP_TIMEOUT: Duration = Duration::from_secs(10);

/// Where a list comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    File(PathBuf),
    Url(String),
}

impl Source {
    /// `http://` and `https://` are URLs; anything else is a file path.
    pub fn parse(s: &Path) -> Source {
        match s.to_str() {
            Some(u) if u.starts_with("http://") || u.starts_with("https://") => {
                Source::Url(u.to_owned())
            }
            _ => Source::File(s.to_path_buf()),
        }
    }
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::File(p) => write!(f, "{}", p.display()),
            Source::Url(u) => f.write_str(u),
        }
    }
}

/// One list: its source, last good content, and what tells a change.
#[derive(Debug)]
struct List {
    what: &'static str,
    source: Source,
    set: Option<BTreeSet<[u8; 32]>>,
    /// Files: (mtime, size) last read.
    stamp: Option<(SystemTime, u64)>,
    /// URLs: validators from the last 200, and when to ask again.
    etag: Option<String>,
    last_modified: Option<String>,
    due: Option<Instant>,
    error: Option<String>,
    loads: u64,
    not_modified: u64,
}

impl List {
    fn new(what: &'static str, source: Source) -> List {
        List {
            what,
            source,
            set: None,
            stamp: None,
            etag: None,
            last_modified: None,
            due: None,
            error: None,
            loads: 0,
            not_modified: 0,
        }
    }

    fn parse(&self, text: &str) -> Result<BTreeSet<[u8; 32]>> {
        TrustPolicy::parse_list(text).map_err(|e| Error::BadArg {
            what: self.what,
            reason: format!("{}: {e}", self.source),
        })
    }

    /// Re-reads or refetches if due and changed; Ok(true) when the content changed.
    fn refresh(&mut self, now: Instant, refetch: Duration) -> Result<bool> {
        let r = match self.source.clone() {
            Source::File(p) => self.refresh_file(&p),
            Source::Url(u) => {
                if self.due.is_some_and(|d| now < d) {
                    return Ok(false);
                }
                self.due = Some(now + refetch);
                self.refresh_url(&u)
            }
        };
        match &r {
            Ok(_) => self.error = None,
            Err(e) => self.error = Some(e.to_string()),
        }
        r
    }

    fn refresh_file(&mut self, p: &Path) -> Result<bool> {
        let meta = std::fs::metadata(p)
            .map_err(|e| Error::io(format!("reading the {} list {}", self.what, p.display()), e))?;
        let stamp = (
            meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
            meta.len(),
        );
        if self.stamp == Some(stamp) && self.set.is_some() {
            return Ok(false);
        }
        let text = std::fs::read_to_string(p)
            .map_err(|e| Error::io(format!("reading the {} list {}", self.what, p.display()), e))?;
        let set = self.parse(&text)?;
        self.stamp = Some(stamp);
        Ok(self.replace(set))
    }

    fn refresh_url(&mut self, url: &str) -> Result<bool> {
        let fail = |reason: String| Error::BadArg {
            what: self.what,
            reason: format!("fetching {url}: {reason}"),
        };
        let mut req = attohttpc::get(url)
            .timeout(HTTP_TIMEOUT)
            .follow_redirects(true);
        // Validators only while we hold what they describe.
        if self.set.is_some() {
            if let Some(e) = &self.etag {
                req = req.header(attohttpc::header::IF_NONE_MATCH, e.as_str());
            }
            if let Some(m) = &self.last_modified {
                req = req.header(attohttpc::header::IF_MODIFIED_SINCE, m.as_str());
            }
        }
        let resp = req.send().map_err(|e| fail(e.to_string()))?;
        let status = resp.status();
        if status == attohttpc::StatusCode::NOT_MODIFIED && self.set.is_some() {
            self.not_modified += 1;
            return Ok(false);
        }
        if !status.is_success() {
            return Err(fail(format!("HTTP {status}")));
        }
        let header = |name: attohttpc::header::HeaderName| {
            resp.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        let (etag, last_modified) = (
            header(attohttpc::header::ETAG),
            header(attohttpc::header::LAST_MODIFIED),
        );
        if resp
            .headers()
            .get(attohttpc::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
            .is_some_and(|n| n > MAX_BODY)
        {
            return Err(fail(format!("larger than {} MiB", MAX_BODY >> 20)));
        }
        let mut body = Vec::new();
        let mut reader = std::io::Read::take(resp.split().2, MAX_BODY + 1);
        std::io::Read::read_to_end(&mut reader, &mut body).map_err(|e| fail(e.to_string()))?;
        if body.len() as u64 > MAX_BODY {
            return Err(fail(format!("larger than {} MiB", MAX_BODY >> 20)));
        }
        let text = String::from_utf8(body).map_err(|_| fail("not UTF-8 text".into()))?;
        let set = self.parse(&text)?;
        self.etag = etag;
        self.last_modified = last_modified;
        Ok(self.replace(set))
    }

    fn replace(&mut self, set: BTreeSet<[u8; 32]>) -> bool {
        self.loads += 1;
        let changed = self.set.as_ref() != Some(&set);
        if changed {
            info!(list = self.what, source = %self.source, entries = set.len(), "measurement list loaded");
        }
        self.set = Some(set);
        changed
    }

    fn status(&self) -> Value {
        json!({
            "source": self.source.to_string(),
            "entries": self.set.as_ref().map(|s| s.len()),
            "loads": self.loads,
            "not_modified": self.not_modified,
            "error": self.error,
        })
    }
}

/// Both lists. Synchronous: [`TrustWatch`] drives it from its own thread.
#[derive(Debug)]
pub struct TrustLists {
    trusted: Option<List>,
    revoked: Option<List>,
    refetch: Duration,
}

impl TrustLists {
    pub fn new(trusted: Option<&Path>, revoked: Option<&Path>, refetch: Duration) -> TrustLists {
        TrustLists {
            trusted: trusted.map(|p| List::new("buyer.trusted", Source::parse(p))),
            revoked: revoked.map(|p| List::new("buyer.revoked", Source::parse(p))),
            refetch,
        }
    }

    /// Re-reads what changed; Ok(true) when the policy changed. Every list is tried;
    /// the first error is returned (the lists keep their last good content).
    pub fn refresh(&mut self, now: Instant) -> Result<bool> {
        let mut changed = false;
        let mut first_err = None;
        for l in [&mut self.trusted, &mut self.revoked].into_iter().flatten() {
            match l.refresh(now, self.refetch) {
                Ok(c) => changed |= c,
                Err(e) => {
                    warn!(list = l.what, source = %l.source, error = %e, "measurement list not reloaded (the last good one stays)");
                    first_err.get_or_insert(e);
                }
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(changed),
        }
    }

    /// The current policy, or why `--trusted-only` cannot run yet: no trusted list
    /// configured, or a configured list that never loaded.
    pub fn policy(&self) -> std::result::Result<TrustPolicy, String> {
        let Some(trusted) = &self.trusted else {
            return Err("the buyer has no trusted measurements: set buyer.trusted to a list file or http:// URL in the config".into());
        };
        let loaded = |l: &List| {
            l.set.clone().ok_or_else(|| {
                format!(
                    "the {} list {} has not loaded yet{}",
                    l.what,
                    l.source,
                    l.error
                        .as_ref()
                        .map(|e| format!(": {e}"))
                        .unwrap_or_default()
                )
            })
        };
        Ok(TrustPolicy {
            trusted: loaded(trusted)?,
            revoked: match &self.revoked {
                Some(r) => loaded(r)?,
                None => BTreeSet::new(),
            },
        })
    }

    pub fn status(&self) -> Value {
        json!({
            "trusted": self.trusted.as_ref().map(List::status),
            "revoked": self.revoked.as_ref().map(List::status),
        })
    }
}

/// The lists, reloaded on a thread of their own; the buyer reads snapshots.
#[derive(Clone)]
pub struct TrustWatch {
    current: Arc<Mutex<Shared>>,
}

struct Shared {
    policy: std::result::Result<Arc<TrustPolicy>, String>,
    status: Value,
}

impl TrustWatch {
    /// Loads both lists once (a file that does not parse is an error here, at start;
    /// a URL that does not answer is retried in the background), then keeps them.
    pub fn start(mut lists: TrustLists) -> Result<TrustWatch> {
        if let Err(e) = lists.refresh(Instant::now()) {
            let file_failed = [&lists.trusted, &lists.revoked]
                .into_iter()
                .flatten()
                .any(|l| matches!(l.source, Source::File(_)) && l.error.is_some());
            if file_failed {
                return Err(e);
            }
        }
        let current = Arc::new(Mutex::new(Shared {
            policy: lists.policy().map(Arc::new),
            status: lists.status(),
        }));
        if lists.trusted.is_some() || lists.revoked.is_some() {
            let weak = Arc::downgrade(&current);
            std::thread::Builder::new()
                .name("trust-lists".into())
                .spawn(move || loop {
                    std::thread::sleep(FILE_POLL);
                    // The buyer is gone: so is the reason to reload.
                    let Some(cur) = weak.upgrade() else { return };
                    let _ = lists.refresh(Instant::now());
                    let mut g = cur.lock().expect("trust lock");
                    g.policy = lists.policy().map(Arc::new);
                    g.status = lists.status();
                })
                .map_err(|e| Error::io("starting the trust-list thread", e))?;
        }
        Ok(TrustWatch { current })
    }

    pub fn policy(&self) -> std::result::Result<Arc<TrustPolicy>, String> {
        self.current.lock().expect("trust lock").policy.clone()
    }

    pub fn status(&self) -> Value {
        self.current.lock().expect("trust lock").status.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader, Write};
    use std::net::TcpListener;
    use std::sync::atomic::{AtomicU32, Ordering};

    fn h(b: u8) -> String {
        hex::encode([b; 32])
    }

    /// A small HTTP/1.1 server on loopback serving one mutable body with an ETag;
    /// answers 304 to a matching If-None-Match, counts full and conditional answers.
    struct Server {
        url: String,
        body: Arc<Mutex<(String, u32)>>,
        full: Arc<AtomicU32>,
        not_modified: Arc<AtomicU32>,
    }

    fn serve() -> Server {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/trusted.txt", l.local_addr().unwrap());
        let body = Arc::new(Mutex::new((String::new(), 0u32)));
        let full = Arc::new(AtomicU32::new(0));
        let not_modified = Arc::new(AtomicU32::new(0));
        let (b, f, n) = (body.clone(), full.clone(), not_modified.clone());
        std::thread::spawn(move || {
            for s in l.incoming() {
                let Ok(mut s) = s else { continue };
                let mut r = BufReader::new(s.try_clone().unwrap());
                let mut inm = None;
                loop {
                    let mut line = String::new();
                    if r.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                        break;
                    }
                    if let Some(v) = line.to_ascii_lowercase().strip_prefix("if-none-match:") {
                        inm = Some(v.trim().to_owned());
                    }
                }
                let (text, version) = b.lock().unwrap().clone();
                let etag = format!("\"v{version}\"");
                let resp = if inm.as_deref() == Some(etag.as_str()) {
                    n.fetch_add(1, Ordering::SeqCst);
                    format!(
                        "HTTP/1.1 304 Not Modified\r\nETag: {etag}\r\nConnection: close\r\n\r\n"
                    )
                } else {
                    f.fetch_add(1, Ordering::SeqCst);
                    format!(
                        "HTTP/1.1 200 OK\r\nETag: {etag}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{text}",
                        text.len()
                    )
                };
                let _ = s.write_all(resp.as_bytes());
            }
        });
        Server {
            url,
            body,
            full,
            not_modified,
        }
    }

    #[test]
    fn urls_are_refetched_with_their_etag_and_changes_are_taken() {
        let srv = serve();
        *srv.body.lock().unwrap() = (format!("# trusted\n{}\n", h(1)), 1);
        let mut lists = TrustLists::new(Some(Path::new(&srv.url)), None, Duration::from_secs(5));
        let t0 = Instant::now();
        assert!(lists.refresh(t0).unwrap());
        let p = lists.policy().unwrap();
        assert!(p.is_trusted(&[1; 32]) && !p.is_trusted(&[2; 32]));
        // Not due yet: no request at all.
        assert!(!lists.refresh(t0 + Duration::from_secs(1)).unwrap());
        assert_eq!(srv.full.load(Ordering::SeqCst), 1);
        // Due, unchanged: a conditional request answered 304.
        assert!(!lists.refresh(t0 + Duration::from_secs(6)).unwrap());
        assert_eq!(srv.not_modified.load(Ordering::SeqCst), 1);
        // Changed on the server: the next fetch takes it.
        *srv.body.lock().unwrap() = (format!("{}\n{}\n", h(1), h(2)), 2);
        assert!(lists.refresh(t0 + Duration::from_secs(12)).unwrap());
        assert!(lists.policy().unwrap().is_trusted(&[2; 32]));
        assert_eq!(srv.full.load(Ordering::SeqCst), 2);
        // A bad list on the server: an error, and the last good list stays.
        *srv.body.lock().unwrap() = ("not a hash\n".into(), 3);
        assert!(lists.refresh(t0 + Duration::from_secs(18)).is_err());
        assert!(lists.policy().unwrap().is_trusted(&[2; 32]));
    }

    #[test]
    fn a_url_that_never_answered_blocks_trusted_only_and_says_why() {
        // A port nobody listens on (bound, then closed).
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let url = format!("http://127.0.0.1:{port}/revoked.txt");
        let dir = tempfile::tempdir().unwrap();
        let trusted = dir.path().join("trusted");
        std::fs::write(&trusted, format!("{}\n", h(1))).unwrap();
        let mut lists = TrustLists::new(
            Some(&trusted),
            Some(Path::new(&url)),
            Duration::from_secs(5),
        );
        assert!(lists.refresh(Instant::now()).is_err());
        let why = lists.policy().unwrap_err();
        assert!(why.contains("buyer.revoked") && why.contains(&url), "{why}");
        // Without a trusted list at all, the reason is that.
        let none = TrustLists::new(None, None, Duration::from_secs(5));
        assert!(none.policy().unwrap_err().contains("set buyer.trusted"));
    }

    #[test]
    fn files_are_reread_when_they_change_and_the_watch_follows() {
        let dir = tempfile::tempdir().unwrap();
        let trusted = dir.path().join("trusted");
        let revoked = dir.path().join("revoked");
        std::fs::write(&trusted, format!("{}\n{}\n", h(1), h(2))).unwrap();
        std::fs::write(&revoked, "").unwrap();
        let watch = TrustWatch::start(TrustLists::new(
            Some(&trusted),
            Some(&revoked),
            Duration::from_secs(60),
        ))
        .unwrap();
        assert!(watch.policy().unwrap().is_trusted(&[2; 32]));
        // Revoke 2 (a different size, so even a coarse mtime sees the change).
        std::fs::write(&revoked, format!("{}\n", h(2))).unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while watch.policy().unwrap().is_trusted(&[2; 32]) {
            assert!(
                Instant::now() < deadline,
                "revocation not picked up: {}",
                watch.status()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        assert!(watch.policy().unwrap().is_trusted(&[1; 32]));
        // A trusted file that does not parse fails the start, naming the line.
        std::fs::write(&trusted, "zz\n").unwrap();
        let e = TrustWatch::start(TrustLists::new(
            Some(&trusted),
            None,
            Duration::from_secs(60),
        ))
        .err()
        .unwrap();
        assert!(e.to_string().contains("buyer.trusted"), "{e}");
    }

    #[test]
    fn sources_are_urls_only_with_an_http_scheme() {
        assert_eq!(
            Source::parse(Path::new("http://10.0.0.1/t.txt")),
            Source::Url("http://10.0.0.1/t.txt".into())
        );
        assert_eq!(
            Source::parse(Path::new("/etc/cpushare/trusted")),
            Source::File("/etc/cpushare/trusted".into())
        );
    }
}
