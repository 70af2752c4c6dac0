//! `/metrics` and `/healthz` over HTTP/1.1 (hyper).
//!
//! [`Health`] is what the pipeline tells the world: whether it is streaming and whether
//! Redis takes its batches, each with since when and why not. [`serve`] runs every
//! connection in a task of its own with keep-alive, so idle or slow clients never delay
//! another's scrape: a request head must arrive within [`Limits::header_read_timeout`]
//! (idle keep-alive connections included), heads are bounded by [`Limits::max_request`],
//! and at most [`Limits::max_connections`] are open at once. Anything it does not
//! understand gets a 4xx; nothing a client sends can make it panic or hold memory.
//! [`serve_when_bound`] keeps trying a busy address in the background.

use crate::telemetry::metrics::Metrics;
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use std::convert::Infallible;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

/// The content type of the Prometheus text format.
pub const METRICS_CONTENT_TYPE: &str = crate::telemetry::metrics::CONTENT_TYPE;

/// Longest reason kept in [`Health`]; longer ones are cut, so a response stays small.
const MAX_REASON: usize = 300;

/// The replication side of health.
#[derive(Debug, Clone)]
enum Stream {
    Streaming,
    Down {
        since: Instant,
        reason: String,
    },
    /// Another process holds the slot; this one waits to take over. Healthy: an
    /// orchestrator must keep a standby running.
    Standby,
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
/// It starts "not streaming: starting" with Redis presumed reachable until the pipeline's
/// first ping or batch says otherwise (it pings at start and while idle), and is healthy
/// only while streaming and Redis reachable. Reasons must not contain keys or row values:
/// they are served to anyone who can reach the listener.
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
                Stream::Streaming | Stream::Standby => Stream::Down { since: Instant::now(), reason },
            }
        });
    }

    /// Another process holds the slot and this one stands by to take over.
    pub fn standby(&self) {
        self.with(|s| s.stream = Stream::Standby);
    }

    /// Whether this process stands by for the slot.
    pub fn is_standby(&self) -> bool {
        self.with(|s| matches!(s.stream, Stream::Standby))
    }

    /// Redis acknowledged a batch (or answered a ping).
    pub fn redis_reachable(&self) {
        self.with(|s| s.redis = Redis::Reachable);
    }

    /// Redis refused or failed a batch or a ping. Keeps the time of the first failure in a row.
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
    /// The most bytes of request head buffered (at least 8192); more gets 431.
    pub max_request: usize,
    /// How long a connection may take to send a request head, counted from when the server
    /// starts waiting for it: a silent or idle keep-alive connection is closed after this.
    pub header_read_timeout: Duration,
    /// Connections served at once. Further ones are closed at once rather than left to
    /// wait, so idle connections never delay a scrape that gets in.
    pub max_connections: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { max_request: 8192, header_read_timeout: Duration::from_secs(10), max_connections: 4096 }
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

/// Longest pause between two attempts to bind a busy address.
const REBIND_MAX: Duration = Duration::from_secs(10);

/// Binds `addr` and serves on it until `shutdown`. While the address cannot be bound (the
/// port is taken, the interface not up yet) it logs why and tries again, backing off to
/// 10 s: metrics matter less than invalidation, which goes on meanwhile.
pub async fn serve_when_bound(
    addr: String,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    shutdown: impl Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    let mut wait = Duration::from_secs(1);
    let mut failures = 0u32;
    let listener = loop {
        match bind(&addr).await {
            Ok(listener) => break listener,
            Err(e) => {
                failures += 1;
                // Loud at first, then once a minute or so.
                if failures == 1 || (wait == REBIND_MAX && failures.is_multiple_of(6)) {
                    tracing::warn!(listen = %addr, error = %crate::errors::causes::error_chain(&e), failures, retry_in = ?wait,
                        "cannot serve /metrics and /healthz yet; retrying while invalidation goes on");
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown.as_mut() => return,
        }
        wait = (wait * 2).min(REBIND_MAX);
    };
    tracing::info!(listen = %addr, after_failures = failures, "serving /metrics and /healthz");
    serve(listener, metrics, health, shutdown).await
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

/// [`serve`] with explicit limits: HTTP/1.1 with keep-alive (hyper), every connection in a
/// task of its own. Connections still open at shutdown are dropped.
pub async fn serve_with(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    shutdown: impl Future<Output = ()>,
    limits: Limits,
) {
    tokio::pin!(shutdown);
    let mut conns = JoinSet::new();
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(limits.max_request.max(MIN_BUFFER))
        .keep_alive(true);
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.as_mut() => return,
        };
        while conns.try_join_next().is_some() {}
        match accepted {
            Ok((stream, _peer)) if conns.len() >= limits.max_connections.max(1) => {
                tracing::debug!(connections = conns.len(), "metrics connection limit reached; closing a new one");
                drop(stream);
            }
            Ok((stream, _peer)) => {
                let _ = stream.set_nodelay(true);
                let (metrics, health) = (metrics.clone(), health.clone());
                let service = service_fn(move |request: Request<Incoming>| {
                    let response = respond(request.method(), request.uri().path(), &metrics, &health);
                    async move { Ok::<_, Infallible>(response) }
                });
                let connection = http.serve_connection(TokioIo::new(stream), service);
                conns.spawn(async move {
                    // A client that goes away or sends garbage (it got its 4xx) ends only its own connection.
                    let _ = connection.await;
                });
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

/// hyper's smallest request buffer.
const MIN_BUFFER: usize = 8192;

/// Decides the response from the method and path alone (HEAD gets GET's headers; hyper
/// leaves the body out).
fn respond(method: &Method, path: &str, metrics: &Metrics, health: &Health) -> Response<Full<Bytes>> {
    let known = matches!(path, "/metrics" | "/healthz");
    if !known {
        return text(StatusCode::NOT_FOUND, "not found; try /metrics or /healthz\n".into());
    }
    if method != Method::GET && method != Method::HEAD {
        let mut r = text(StatusCode::METHOD_NOT_ALLOWED, "only GET and HEAD are served\n".into());
        r.headers_mut().insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    match path {
        "/metrics" => {
            let mut r = text(StatusCode::OK, metrics.render());
            r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(METRICS_CONTENT_TYPE));
            r
        }
        _ => match health.check() {
            Ok(()) if health.is_standby() => text(StatusCode::OK, "standby\n".into()),
            Ok(()) => text(StatusCode::OK, "ok\n".into()),
            Err(why) => text(StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")),
        },
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    let headers = r.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
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
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    // Generous: the suite runs beside builds on small machines.
    const DEADLINE: Duration = Duration::from_secs(60);

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

        /// Sends `raw` and returns the response: its head, and as much body as it announces
        /// (or everything until the server closes).
        async fn exchange(&self, raw: &[u8]) -> String {
            let io = async {
                let mut s = TcpStream::connect(self.addr).await.expect("connect");
                s.write_all(raw).await.expect("send request");
                let mut out = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    let text = String::from_utf8_lossy(&out).into_owned();
                    if let Some((head, body)) = text.split_once("\r\n\r\n") {
                        let length = header(&text, "content-length").and_then(|l| l.parse::<usize>().ok());
                        let no_body = raw.starts_with(b"HEAD ");
                        if no_body || length.is_some_and(|l| body.len() >= l) {
                            return format!("{head}\r\n\r\n{body}");
                        }
                    }
                    match s.read(&mut chunk).await {
                        // A reset after the response is fine; what arrived before it counts.
                        Ok(0) | Err(_) => return String::from_utf8_lossy(&out).into_owned(),
                        Ok(n) => out.extend_from_slice(&chunk[..n]),
                    }
                }
            };
            tokio::time::timeout(DEADLINE, io).await.expect("no answer within the deadline")
        }

        async fn get(&self, path: &str) -> String {
            self.exchange(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes()).await
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
        // The process's own CPU time and memory move between two renders; the rest may not.
        let steady =
            |text: &str| text.lines().filter(|l| !l.starts_with("walbust_process_")).collect::<Vec<_>>().join("\n");
        assert_eq!(steady(body(&r)), steady(&metrics.render()));
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
    async fn unknown_paths_methods_and_versions_get_4xx() {
        let server = Server::start(Metrics::new(), Health::new(), Limits::default()).await;
        assert_eq!(status_line(&server.get("/").await), "HTTP/1.1 404 Not Found");
        assert_eq!(status_line(&server.get("/metrics/../etc").await), "HTTP/1.1 404 Not Found");
        let r = server.exchange(b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n").await;
        assert_eq!(status_line(&r), "HTTP/1.1 405 Method Not Allowed", "{r}");
        assert_eq!(header(&r, "allow"), Some("GET, HEAD"));
        let r = server.exchange(b"GET /metrics HTTP/2.0\r\n\r\n").await;
        assert_eq!(status_line(&r), "HTTP/1.1 400 Bad Request", "{r}");
        server.stop().await;
    }

    #[tokio::test]
    async fn head_gets_the_headers_without_the_body() {
        let server = Server::start(Metrics::new(), Health::new(), Limits::default()).await;
        let r = server.exchange(b"HEAD /metrics HTTP/1.1\r\n\r\n").await;
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
            b"GET\r\n\r\n",
            b"GET  /metrics HTTP/1.1\r\n\r\n",
            b"GET /metrics HTTP/1.1 extra\r\n\r\n",
            b"\xc3\x28 / HTTP/1.1\r\n\r\n",
        ] {
            let r = server.exchange(garbage).await;
            assert_eq!(status_line(&r), "HTTP/1.1 400 Bad Request", "{garbage:?} -> {r}");
        }
        assert_eq!(status_line(&server.get("/metrics").await), "HTTP/1.1 200 OK");
        server.stop().await;
    }

    #[tokio::test]
    async fn keep_alive_serves_several_requests_on_one_connection() {
        let server = Server::start(Metrics::new(), Health::new(), Limits::default()).await;
        let io = async {
            let mut s = TcpStream::connect(server.addr).await.expect("connect");
            s.write_all(b"GET /healthz HTTP/1.1\r\n\r\n").await.expect("first request");
            let mut first = [0u8; 17];
            s.read_exact(&mut first).await.expect("first answer");
            s.write_all(b"GET /metrics HTTP/1.1\r\nConnection: close\r\n\r\n").await.expect("second request");
            let mut rest = Vec::new();
            let _ = s.read_to_end(&mut rest).await;
            (String::from_utf8_lossy(&first).into_owned(), String::from_utf8_lossy(&rest).into_owned())
        };
        let (first, rest) = tokio::time::timeout(DEADLINE, io).await.expect("answers within the deadline");
        assert_eq!(first, "HTTP/1.1 503 Serv");
        assert!(rest.contains("HTTP/1.1 200 OK\r\n"), "{rest}");
        assert!(rest.contains("walbust_"), "{rest}");
        server.stop().await;
    }

    #[tokio::test]
    async fn an_oversized_request_gets_431() {
        let server = Server::start(Metrics::new(), Health::new(), Limits::default()).await;
        let mut raw = b"GET /metrics HTTP/1.1\r\nX-Filler: ".to_vec();
        raw.extend(std::iter::repeat_n(b'a', 64 * 1024));
        raw.extend_from_slice(b"\r\n\r\n");
        let r = server.exchange(&raw).await;
        assert_eq!(status_line(&r), "HTTP/1.1 431 Request Header Fields Too Large", "{r}");
        assert_eq!(status_line(&server.get("/metrics").await), "HTTP/1.1 200 OK");
        server.stop().await;
    }

    #[tokio::test]
    async fn a_silent_client_is_closed_after_the_header_read_timeout() {
        let limits = Limits { header_read_timeout: Duration::from_millis(200), ..Limits::default() };
        let server = Server::start(Metrics::new(), Health::new(), limits).await;
        let r = server.exchange(b"GET /metr").await;
        assert_eq!(r, "", "closed without an answer");
        server.stop().await;
    }

    #[tokio::test]
    async fn idle_connections_up_to_the_limit_never_delay_a_scrape() {
        let limits = Limits { max_connections: 3, ..Limits::default() };
        let server = Server::start(Metrics::new(), Health::new(), limits).await;
        let mut idle = Vec::new();
        for _ in 0..2 {
            idle.push(TcpStream::connect(server.addr).await.expect("connect"));
        }
        let started = Instant::now();
        let r = server.get("/metrics").await;
        assert_eq!(status_line(&r), "HTTP/1.1 200 OK", "{r}");
        assert!(started.elapsed() < limits.header_read_timeout, "{:?}", started.elapsed());
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
