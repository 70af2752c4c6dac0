//! `/metrics` and `/healthz` over a deliberately tiny HTTP/1.1 server.
//!
//! [`Health`] is what the pipeline tells the world: whether it is streaming and whether
//! Redis takes its batches, each with since when and why not. [`serve`] answers one
//! request per connection: it reads at most [`Limits::max_request`] bytes of head within
//! [`Limits::read_timeout`], looks only at the request line, and closes. Anything it does
//! not understand gets a 4xx; nothing a client sends can make it panic or hold memory.

use crate::metrics::Metrics;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

/// The content type of the Prometheus text format.
pub const METRICS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Longest reason kept in [`Health`]; longer ones are cut, so a response stays small.
const MAX_REASON: usize = 300;

/// The replication side of health.
#[derive(Debug, Clone)]
enum Stream {
    Streaming,
    Down { since: Instant, reason: String },
}

/// The Redis side of health.
#[derive(Debug, Clone)]
enum Redis {
    Reachable,
    Unreachable { since: Instant, reason: String },
}

#[derive(Debug)]
struct State {
    stream: Stream,
    redis: Redis,
}

/// Whether walbust is doing its job, shared between the pipeline and `/healthz`.
///
/// It starts "not streaming: starting" with Redis presumed reachable (an idle database
/// sends no batch that could prove it), and is healthy only while streaming and Redis
/// reachable. Reasons must not contain keys or row values: they are served to anyone
/// who can reach the listener.
#[derive(Debug)]
pub struct Health {
    state: Mutex<State>,
}

impl Default for Health {
    fn default() -> Self {
        Health {
            state: Mutex::new(State {
                stream: Stream::Down { since: Instant::now(), reason: "starting".into() },
                redis: Redis::Reachable,
            }),
        }
    }
}

fn clip(reason: &str) -> String {
    let one_line = reason.split_whitespace().collect::<Vec<_>>().join(" ");
    match one_line.char_indices().nth(MAX_REASON) {
        Some((cut, _)) => format!("{}...", &one_line[..cut]),
        None => one_line,
    }
}

impl Health {
    /// A fresh state: not streaming yet ("starting"), Redis presumed reachable.
    pub fn new() -> Arc<Health> {
        Arc::new(Health::default())
    }

    fn with<R>(&self, f: impl FnOnce(&mut State) -> R) -> R {
        f(&mut self.state.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// The replication stream is running.
    pub fn streaming(&self) {
        self.with(|s| s.stream = Stream::Streaming);
    }

    /// The replication stream is not running, e.g. "reconnecting after: connection refused".
    /// Keeps the time it first stopped while it stays down.
    pub fn not_streaming(&self, reason: &str) {
        let reason = clip(reason);
        self.with(|s| {
            s.stream = match &s.stream {
                Stream::Down { since, .. } => Stream::Down { since: *since, reason },
                Stream::Streaming => Stream::Down { since: Instant::now(), reason },
            }
        });
    }

    /// Redis acknowledged a batch (or answered a ping).
    pub fn redis_reachable(&self) {
        self.with(|s| s.redis = Redis::Reachable);
    }

    /// Redis refused or failed a batch. Keeps the time of the first failure in a row.
    pub fn redis_unreachable(&self, reason: &str) {
        let reason = clip(reason);
        self.with(|s| {
            s.redis = match &s.redis {
                Redis::Unreachable { since, .. } => Redis::Unreachable { since: *since, reason },
                Redis::Reachable => Redis::Unreachable { since: Instant::now(), reason },
            }
        });
    }

    /// `Ok` when healthy, else why not, as of now.
    pub fn check(&self) -> Result<(), String> {
        self.check_at(Instant::now())
    }

    /// `Ok` when healthy, else why not (every reason, `; `-separated), as of `now`.
    pub fn check_at(&self, now: Instant) -> Result<(), String> {
        let secs = |since: Instant| now.saturating_duration_since(since).as_secs();
        self.with(|s| {
            let mut why = Vec::new();
            if let Stream::Down { since, reason } = &s.stream {
                why.push(format!("not streaming since {}s: {reason}", secs(*since)));
            }
            if let Redis::Unreachable { since, reason } = &s.redis {
                why.push(format!("redis unreachable since {}s: {reason}", secs(*since)));
            }
            if why.is_empty() { Ok(()) } else { Err(why.join("; ")) }
        })
    }
}

/// Bounds on what one client may cost.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// The most bytes of request head read; more gets 431.
    pub max_request: usize,
    /// How long a client may take to send its request head; slower gets 408.
    pub read_timeout: Duration,
    /// How long writing the response may take.
    pub write_timeout: Duration,
    /// Connections served at once; further ones wait in the listen backlog.
    pub max_connections: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_request: 8192,
            read_timeout: Duration::from_secs(5),
            write_timeout: Duration::from_secs(10),
            max_connections: 32,
        }
    }
}

/// A listen address that could not be bound.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {addr} for /metrics and /healthz; pick a free address in `[metrics] listen`")]
pub struct BindError {
    /// The address asked for.
    pub addr: String,
    /// Why.
    #[source]
    pub source: std::io::Error,
}

/// Binds the metrics listener, naming the address on failure.
pub async fn bind(addr: &str) -> Result<TcpListener, BindError> {
    TcpListener::bind(addr).await.map_err(|source| BindError { addr: addr.to_string(), source })
}

/// Serves `/metrics` and `/healthz` on `listener` until `shutdown` resolves, with default [`Limits`].
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    shutdown: impl Future<Output = ()>,
) {
    serve_with(listener, metrics, health, shutdown, Limits::default()).await
}

/// [`serve`] with explicit limits. Connections still open at shutdown are dropped.
pub async fn serve_with(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    shutdown: impl Future<Output = ()>,
    limits: Limits,
) {
    tokio::pin!(shutdown);
    let mut conns = JoinSet::new();
    loop {
        // At the limit, wait for a connection to finish before accepting another.
        while conns.len() >= limits.max_connections.max(1) {
            tokio::select! {
                _ = conns.join_next() => {}
                _ = shutdown.as_mut() => return,
            }
        }
        while conns.try_join_next().is_some() {}
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.as_mut() => return,
        };
        match accepted {
            Ok((stream, _peer)) => {
                let (metrics, health) = (metrics.clone(), health.clone());
                conns.spawn(handle(stream, metrics, health, limits));
            }
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!(error = %e, "accepting a metrics connection failed");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                    _ = shutdown.as_mut() => return,
                }
            }
        }
    }
}

/// A response: status line, content type, body.
#[derive(Debug, PartialEq, Eq)]
struct Response {
    status: &'static str,
    content_type: &'static str,
    body: String,
    /// Send an `Allow` header (405).
    allow: bool,
    /// HEAD: send the headers a GET would get, without the body.
    head_only: bool,
}

impl Response {
    fn text(status: &'static str, body: impl Into<String>) -> Self {
        Response {
            status,
            content_type: "text/plain; charset=utf-8",
            body: body.into(),
            allow: false,
            head_only: false,
        }
    }
}

async fn handle(mut stream: TcpStream, metrics: Arc<Metrics>, health: Arc<Health>, limits: Limits) {
    let response = match tokio::time::timeout(limits.read_timeout, read_head(&mut stream, limits.max_request)).await {
        Err(_) => Response::text("408 Request Timeout", "request not received in time\n"),
        Ok(Err(HeadError::Io)) => return,
        Ok(Err(HeadError::TooLarge)) => {
            Response::text("431 Request Header Fields Too Large", "request head too large\n")
        }
        Ok(Ok(head)) => respond(&head, &metrics, &health),
    };
    let _ = tokio::time::timeout(limits.write_timeout, write_response(&mut stream, &response)).await;
}

enum HeadError {
    Io,
    TooLarge,
}

/// Reads until the blank line ending the head, or the peer closes after a request line.
async fn read_head(stream: &mut TcpStream, max: usize) -> Result<Vec<u8>, HeadError> {
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    loop {
        if buf.len() > max {
            return Err(HeadError::TooLarge);
        }
        if buf.windows(4).any(|w| w == b"\r\n\r\n") || buf.windows(2).any(|w| w == b"\n\n") {
            return Ok(buf);
        }
        let n = stream.read(&mut chunk).await.map_err(|_| HeadError::Io)?;
        if n == 0 {
            // A client that half-closes after its request line still gets an answer.
            return if buf.is_empty() { Err(HeadError::Io) } else { Ok(buf) };
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Decides the response from the request head alone.
fn respond(head: &[u8], metrics: &Metrics, health: &Health) -> Response {
    let line_end = head.iter().position(|&b| b == b'\n').unwrap_or(head.len());
    let Ok(line) = std::str::from_utf8(&head[..line_end]) else {
        return Response::text("400 Bad Request", "request line is not text\n");
    };
    let mut parts = line.trim_end_matches('\r').split(' ');
    let (Some(method), Some(target), Some(version), None) = (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Response::text("400 Bad Request", "expected `METHOD /path HTTP/1.1`\n");
    };
    if !version.starts_with("HTTP/1.") {
        return Response::text("505 HTTP Version Not Supported", "only HTTP/1.x is served\n");
    }
    let path = target.split(['?', '#']).next().unwrap_or(target);
    let known = matches!(path, "/metrics" | "/healthz");
    if !known {
        return Response::text("404 Not Found", "not found; try /metrics or /healthz\n");
    }
    if method != "GET" && method != "HEAD" {
        let mut r = Response::text("405 Method Not Allowed", "only GET and HEAD are served\n");
        r.allow = true;
        return r;
    }
    let mut response = match path {
        "/metrics" => Response { content_type: METRICS_CONTENT_TYPE, ..Response::text("200 OK", metrics.render()) },
        _ => match health.check() {
            Ok(()) => Response::text("200 OK", "ok\n"),
            Err(why) => Response::text("503 Service Unavailable", format!("{why}\n")),
        },
    };
    response.head_only = method == "HEAD";
    response
}

async fn write_response(stream: &mut TcpStream, r: &Response) -> std::io::Result<()> {
    let allow = if r.allow { "Allow: GET, HEAD\r\n" } else { "" };
    let head = format!(
        "HTTP/1.1 {}\r\nContent-Type: {}\r\nContent-Length: {}\r\n{allow}\
         Cache-Control: no-store\r\nConnection: close\r\n\r\n",
        r.status,
        r.content_type,
        r.body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    if !r.head_only {
        stream.write_all(r.body.as_bytes()).await?;
    }
    stream.shutdown().await
}

/// Why [`probe`] got no answer from `/healthz`.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// The listen address is not `host:port`.
    #[error("invalid metrics listen address `{0}`; write host:port in `[metrics] listen`")]
    Address(String),
    /// Connecting, sending or reading failed.
    #[error("no answer from /healthz on {addr}; is walbust running with this config?")]
    Io {
        /// The address connected to.
        addr: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// No complete answer within the timeout.
    #[error("no answer from /healthz on {addr} within {timeout:?}")]
    Timeout {
        /// The address connected to.
        addr: String,
        /// How long it waited.
        timeout: Duration,
    },
    /// The answer is not an HTTP response.
    #[error("/healthz on {addr} answered something that is not an HTTP/1.x response")]
    Malformed {
        /// The address connected to.
        addr: String,
    },
}

/// What `/healthz` answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeAnswer {
    /// The HTTP status code: 200 when healthy, 503 with reasons otherwise.
    pub status: u16,
    /// The body: `ok`, or the reasons.
    pub body: String,
}

/// The address a local probe connects to for `listen`: the loopback address of the same
/// family when walbust listens on every interface (`0.0.0.0`, `[::]`).
pub fn probe_address(listen: &str) -> Result<std::net::SocketAddr, ProbeError> {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
    let addr: SocketAddr = listen.parse().map_err(|_| ProbeError::Address(listen.to_string()))?;
    let ip = match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    Ok(SocketAddr::new(ip, addr.port()))
}

/// `GET /healthz` from the server listening on `listen`, for container health checks and
/// scripts on images without an HTTP client. The whole exchange is bounded by `timeout`.
pub async fn probe(listen: &str, timeout: Duration) -> Result<ProbeAnswer, ProbeError> {
    let addr = probe_address(listen)?;
    let name = addr.to_string();
    let exchange = async {
        let mut stream = TcpStream::connect(addr).await?;
        let request = format!("GET /healthz HTTP/1.1\r\nHost: {name}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await?;
        let mut answer = Vec::new();
        // The server closes after one response; a health body is small.
        (&mut stream).take(64 * 1024).read_to_end(&mut answer).await?;
        Ok::<_, std::io::Error>(answer)
    };
    let answer = match tokio::time::timeout(timeout, exchange).await {
        Err(_) => return Err(ProbeError::Timeout { addr: name, timeout }),
        Ok(Err(source)) => return Err(ProbeError::Io { addr: name, source }),
        Ok(Ok(a)) => String::from_utf8_lossy(&a).into_owned(),
    };
    let malformed = || ProbeError::Malformed { addr: name.clone() };
    let (head, body) = answer.split_once("\r\n\r\n").ok_or_else(malformed)?;
    let status = head
        .strip_prefix("HTTP/1.")
        .and_then(|rest| rest.get(2..5))
        .and_then(|code| code.parse().ok())
        .ok_or_else(malformed)?;
    Ok(ProbeAnswer { status, body: body.to_string() })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    const DEADLINE: Duration = Duration::from_secs(10);

    struct Server {
        addr: std::net::SocketAddr,
        stop: Option<tokio::sync::oneshot::Sender<()>>,
        task: tokio::task::JoinHandle<()>,
    }

    impl Server {
        async fn start(metrics: Arc<Metrics>, health: Arc<Health>, limits: Limits) -> Server {
            let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind 127.0.0.1:0");
            let addr = listener.local_addr().expect("local addr");
            let (stop, rx) = tokio::sync::oneshot::channel::<()>();
            let task = tokio::spawn(serve_with(
                listener,
                metrics,
                health,
                async {
                    let _ = rx.await;
                },
                limits,
            ));
            Server { addr, stop: Some(stop), task }
        }

        /// Sends `raw`, half-closes when asked, and returns everything the server wrote.
        async fn exchange(&self, raw: &[u8], half_close: bool) -> String {
            let io = async {
                let mut s = TcpStream::connect(self.addr).await.expect("connect");
                s.write_all(raw).await.expect("send request");
                if half_close {
                    s.shutdown().await.expect("half-close");
                }
                let mut out = Vec::new();
                // A reset after the response is fine; what arrived before it counts.
                let _ = s.read_to_end(&mut out).await;
                String::from_utf8_lossy(&out).into_owned()
            };
            tokio::time::timeout(DEADLINE, io).await.expect("no answer within the deadline")
        }

        async fn get(&self, path: &str) -> String {
            self.exchange(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes(), false).await
        }

        async fn stop(mut self) {
            let _ = self.stop.take().expect("stopped once").send(());
            tokio::time::timeout(DEADLINE, self.task).await.expect("server stops on shutdown").expect("no panic");
        }
    }

    fn status_line(response: &str) -> &str {
        response.lines().next().unwrap_or("")
    }

    fn body(response: &str) -> &str {
        response.split_once("\r\n\r\n").map_or("", |(_, b)| b)
    }

    fn header<'a>(response: &'a str, name: &str) -> Option<&'a str> {
        let head = response.split_once("\r\n\r\n")?.0;
        head.lines().find_map(|l| {
            let (k, v) = l.split_once(": ")?;
            k.eq_ignore_ascii_case(name).then_some(v)
        })
    }

    #[tokio::test]
    async fn metrics_are_served_in_the_prometheus_text_format() {
        let metrics = Metrics::new();
        metrics.changes("public.users", "insert");
        let server = Server::start(metrics.clone(), Health::new(), Limits::default()).await;
        let r = server.get("/metrics?x=1").await;
        assert_eq!(status_line(&r), "HTTP/1.1 200 OK", "{r}");
        assert_eq!(header(&r, "content-type"), Some("text/plain; version=0.0.4; charset=utf-8"));
        assert_eq!(header(&r, "content-length"), Some(body(&r).len().to_string().as_str()));
        assert!(body(&r).contains("walbust_changes_total{table=\"public.users\",op=\"insert\"} 1\n"), "{r}");
        assert_eq!(body(&r), metrics.render());
        server.stop().await;
    }

    #[tokio::test]
    async fn healthz_is_503_with_the_reason_until_streaming_and_redis_reachable() {
        let health = Health::new();
        let server = Server::start(Metrics::new(), health.clone(), Limits::default()).await;
        let r = server.get("/healthz").await;
        assert_eq!(status_line(&r), "HTTP/1.1 503 Service Unavailable", "{r}");
        assert!(body(&r).starts_with("not streaming since "), "{r}");
        assert!(body(&r).ends_with(": starting\n"), "{r}");

        health.streaming();
        let r = server.get("/healthz").await;
        assert_eq!(status_line(&r), "HTTP/1.1 200 OK", "{r}");
        assert_eq!(body(&r), "ok\n");

        health.redis_unreachable("connection refused (os error 111)");
        let r = server.get("/healthz").await;
        assert_eq!(status_line(&r), "HTTP/1.1 503 Service Unavailable", "{r}");
        assert!(body(&r).starts_with("redis unreachable since "), "{r}");
        assert!(body(&r).ends_with("s: connection refused (os error 111)\n"), "{r}");

        health.not_streaming("reconnecting after: server closed the connection");
        let r = server.get("/healthz").await;
        assert!(
            body(&r).contains(
                "not streaming since 0s: reconnecting after: server closed the connection; redis unreachable"
            ),
            "{r}"
        );

        health.streaming();
        health.redis_reachable();
        assert_eq!(status_line(&server.get("/healthz").await), "HTTP/1.1 200 OK");
        server.stop().await;
    }

    #[tokio::test]
    async fn unknown_paths_methods_and_versions_get_4xx_or_505() {
        let server = Server::start(Metrics::new(), Health::new(), Limits::default()).await;
        assert_eq!(status_line(&server.get("/").await), "HTTP/1.1 404 Not Found");
        assert_eq!(status_line(&server.get("/metrics/../etc").await), "HTTP/1.1 404 Not Found");
        let r = server.exchange(b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n", false).await;
        assert_eq!(status_line(&r), "HTTP/1.1 405 Method Not Allowed", "{r}");
        assert_eq!(header(&r, "allow"), Some("GET, HEAD"));
        let r = server.exchange(b"GET /metrics HTTP/2.0\r\n\r\n", false).await;
        assert_eq!(status_line(&r), "HTTP/1.1 505 HTTP Version Not Supported", "{r}");
        server.stop().await;
    }

    #[tokio::test]
    async fn head_gets_the_headers_without_the_body() {
        let server = Server::start(Metrics::new(), Health::new(), Limits::default()).await;
        let r = server.exchange(b"HEAD /metrics HTTP/1.1\r\n\r\n", false).await;
        assert_eq!(status_line(&r), "HTTP/1.1 200 OK", "{r}");
        let length: usize = header(&r, "content-length").unwrap().parse().unwrap();
        assert!(length > 100, "{r}");
        assert_eq!(body(&r), "");
        server.stop().await;
    }

    #[tokio::test]
    async fn garbage_gets_400_and_the_server_keeps_serving() {
        let server = Server::start(Metrics::new(), Health::new(), Limits::default()).await;
        for garbage in [
            &b"\x00\xff\xfe\r\n\r\n"[..],
            b"\r\n\r\n",
            b"GET\r\n\r\n",
            b"GET /metrics\r\n\r\n",
            b"GET  /metrics HTTP/1.1\r\n\r\n",
            b"GET /metrics HTTP/1.1 extra\r\n\r\n",
            b"\xc3\x28 / HTTP/1.1\r\n\r\n",
        ] {
            let r = server.exchange(garbage, false).await;
            assert_eq!(status_line(&r), "HTTP/1.1 400 Bad Request", "{garbage:?} -> {r}");
        }
        // A request line without the blank line, then a half-close, is still answered.
        let r = server.exchange(b"GET /healthz HTTP/1.0\r\n", true).await;
        assert_eq!(status_line(&r), "HTTP/1.1 503 Service Unavailable", "{r}");
        assert_eq!(status_line(&server.get("/metrics").await), "HTTP/1.1 200 OK");
        server.stop().await;
    }

    #[tokio::test]
    async fn an_oversized_request_gets_431() {
        let limits = Limits { max_request: 1024, ..Limits::default() };
        let server = Server::start(Metrics::new(), Health::new(), limits).await;
        let mut raw = b"GET /metrics HTTP/1.1\r\nX-Filler: ".to_vec();
        raw.extend(std::iter::repeat_n(b'a', 4096));
        raw.extend_from_slice(b"\r\n\r\n");
        let r = server.exchange(&raw, false).await;
        assert_eq!(status_line(&r), "HTTP/1.1 431 Request Header Fields Too Large", "{r}");
        assert_eq!(status_line(&server.get("/metrics").await), "HTTP/1.1 200 OK");
        server.stop().await;
    }

    #[tokio::test]
    async fn a_silent_client_gets_408_after_the_read_timeout() {
        let limits = Limits { read_timeout: Duration::from_millis(200), ..Limits::default() };
        let server = Server::start(Metrics::new(), Health::new(), limits).await;
        let r = server.exchange(b"GET /metr", false).await;
        assert_eq!(status_line(&r), "HTTP/1.1 408 Request Timeout", "{r}");
        server.stop().await;
    }

    #[tokio::test]
    async fn connections_beyond_the_limit_wait_and_are_then_served() {
        let limits = Limits { max_connections: 1, read_timeout: Duration::from_millis(300), ..Limits::default() };
        let server = Server::start(Metrics::new(), Health::new(), limits).await;
        // Holds the only slot until its read timeout.
        let idle = TcpStream::connect(server.addr).await.expect("connect");
        let r = server.get("/metrics").await;
        assert_eq!(status_line(&r), "HTTP/1.1 200 OK", "{r}");
        drop(idle);
        server.stop().await;
    }

    #[test]
    fn health_keeps_the_first_failure_time_and_the_latest_reason() {
        let h = Health::default();
        let t0 = Instant::now();
        h.streaming();
        h.redis_unreachable("connection refused");
        h.redis_unreachable("timed out\nafter 5s");
        let later = t0 + Duration::from_secs(12);
        let why = h.check_at(later).unwrap_err();
        assert!(why.starts_with("redis unreachable since 1"), "{why}");
        assert!(why.ends_with("s: timed out after 5s"), "{why}");
        h.redis_reachable();
        assert_eq!(h.check_at(later), Ok(()));
    }

    #[test]
    fn long_reasons_are_clipped() {
        let h = Health::default();
        h.not_streaming(&"x".repeat(10_000));
        let why = h.check().unwrap_err();
        assert!(why.len() < MAX_REASON + 50, "{}", why.len());
        assert!(why.ends_with("..."));
    }

    #[tokio::test]
    async fn probe_reads_healthz_status_and_reasons_on_a_wildcard_listen_address() {
        let health = Health::new();
        let server = Server::start(Metrics::new(), health.clone(), Limits::default()).await;
        let listen = format!("0.0.0.0:{}", server.addr.port());
        let down = probe(&listen, DEADLINE).await.expect("an answer");
        assert_eq!(down.status, 503, "{down:?}");
        assert!(down.body.ends_with(": starting\n"), "{down:?}");
        health.streaming();
        let up = probe(&listen, DEADLINE).await.expect("an answer");
        assert_eq!(up, ProbeAnswer { status: 200, body: "ok\n".into() });
        server.stop().await;

        let closed = probe(&listen, DEADLINE).await.expect_err("nothing listens any more");
        assert!(closed.to_string().starts_with("no answer from /healthz on 127.0.0.1:"), "{closed}");
        assert_eq!(probe_address("[::]:9").expect("valid").to_string(), "[::1]:9");
        assert!(matches!(probe("off", DEADLINE).await, Err(ProbeError::Address(_))));
    }
}
