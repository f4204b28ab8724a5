//! Serves HTTP/1 connections with limits, so that slow, idle or abandoned
//! clients cannot hold the server's file descriptors:
//!
//! - a new connection must send its first request head within
//!   `header_timeout` of connecting, and a later head must arrive within
//!   `header_timeout` of its first byte;
//! - between requests a connection may idle for `keep_alive` at most;
//! - a request body must arrive in full within `body_timeout` of its head
//!   (else 408), however it trickles;
//! - a response the client stops reading is dropped after `keep_alive`;
//! - at most `max_connections` are open; beyond that new ones wait in the
//!   listen backlog, so `accept` never runs out of descriptors.
//!
//! Each connection's task sleeps until the earliest of these deadlines (or
//! until a new head starts), then checks them against what the connection's
//! I/O wrapper and request counter record.

use axum::body::Body;
use axum::Router;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::{watch, Notify, Semaphore};
use tokio::time::Instant;
use tower::ServiceExt;

#[derive(Debug, Clone, Copy)]
pub struct ConnLimits {
    pub header_timeout: Duration,
    pub keep_alive: Duration,
    pub body_timeout: Duration,
    pub max_connections: usize,
}

impl Default for ConnLimits {
    fn default() -> Self {
        ConnLimits {
            header_timeout: Duration::from_secs(10),
            keep_alive: Duration::from_secs(60),
            body_timeout: Duration::from_secs(60),
            max_connections: default_max_connections(),
        }
    }
}

/// Descriptors kept free for everything that is not a client connection
/// (the model file, logs, the blocking pool, outgoing pipes).
const RESERVED_FDS: u64 = 256;

/// Raises the soft open-file limit to the hard one and returns it.
pub fn raise_fd_limit() -> u64 {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read and write the struct we own.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) != 0 {
            return 1024;
        }
        if r.rlim_cur < r.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: r.rlim_max,
                rlim_max: r.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                r = raised;
            }
        }
    }
    r.rlim_cur
}

/// Most connections by default: each costs a task and buffers, so the
/// open-file limit alone is no bound on memory.
const DEFAULT_CONNECTIONS_CAP: u64 = 16_384;

/// Open connections allowed by default: the open-file limit (raised) less a
/// reserve, at most [`DEFAULT_CONNECTIONS_CAP`].
pub fn default_max_connections() -> usize {
    fd_room().min(DEFAULT_CONNECTIONS_CAP) as usize
}

/// Raises the open-file limit and clamps `wanted` connections below it.
pub fn max_connections(wanted: usize) -> usize {
    (wanted as u64).min(fd_room()).max(1) as usize
}

/// Descriptors that connections may use.
fn fd_room() -> u64 {
    raise_fd_limit().saturating_sub(RESERVED_FDS).max(16)
}

/// What a connection did last, in milliseconds since it opened (0: never).
#[derive(Default)]
struct Activity {
    last_read: AtomicU64,
    /// When the first byte of a request head arrived (0: no head pending).
    head_started: AtomicU64,
    /// Since when a write has been waiting for the client (0: none).
    write_blocked: AtomicU64,
    /// Requests whose response has not been sent in full.
    active: AtomicUsize,
    /// Wakes the watchdog when a head starts (its deadline is the nearest).
    head: Notify,
}

struct Clock(Instant);

impl Clock {
    /// Milliseconds since the connection opened, never 0.
    fn now(&self) -> u64 {
        self.0.elapsed().as_millis() as u64 + 1
    }
}

/// The socket, recording reads and stalled writes in [`Activity`].
struct Watched<T> {
    io: T,
    act: Arc<Activity>,
    clock: Arc<Clock>,
}

impl<T: AsyncRead + Unpin> AsyncRead for Watched<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.io).poll_read(cx, buf);
        if buf.filled().len() > before {
            let now = self.clock.now();
            self.act.last_read.store(now, Relaxed);
            if self.act.active.load(Relaxed) == 0
                && self
                    .act
                    .head_started
                    .compare_exchange(0, now, Relaxed, Relaxed)
                    .is_ok()
            {
                self.act.head.notify_one();
            }
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Watched<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write(cx, buf);
        self.note_write(r.is_pending());
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let r = Pin::new(&mut self.io).poll_flush(cx);
        self.note_write(r.is_pending());
        r
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.note_write(r.is_pending());
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

impl<T> Watched<T> {
    fn note_write(&self, pending: bool) {
        if pending {
            let now = self.clock.now();
            let _ = self
                .act
                .write_blocked
                .compare_exchange(0, now, Relaxed, Relaxed);
        } else {
            self.act.write_blocked.store(0, Relaxed);
        }
    }
}

/// Counts a request as active until its response body is dropped (sent in
/// full, or abandoned with the connection).
struct ActiveGuard {
    act: Arc<Activity>,
    clock: Arc<Clock>,
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        // Keep-alive idling counts from the end of the response.
        self.act.last_read.store(self.clock.now(), Relaxed);
        self.act.active.fetch_sub(1, Relaxed);
    }
}

/// What the watchdog decides: close now (and why), or look again at the
/// given time (milliseconds since the connection opened).
enum Verdict {
    Close(&'static str),
    CheckAt(u64),
}

fn verdict(act: &Activity, now: u64, limits: &ConnLimits) -> Verdict {
    let ms = |d: Duration| d.as_millis() as u64;
    let mut next = now + ms(limits.keep_alive);
    let blocked = act.write_blocked.load(Relaxed);
    if blocked != 0 {
        let deadline = blocked + ms(limits.keep_alive);
        if now >= deadline {
            return Verdict::Close("the client stopped reading its response");
        }
        next = next.min(deadline);
    }
    if act.active.load(Relaxed) > 0 {
        // A write that blocks from now on is seen at its deadline at worst.
        return Verdict::CheckAt(next);
    }
    let head = act.head_started.load(Relaxed);
    let deadline = if head != 0 {
        head + ms(limits.header_timeout)
    } else {
        act.last_read.load(Relaxed) + ms(limits.keep_alive)
    };
    if now >= deadline {
        return Verdict::Close(if head != 0 {
            "request head too slow"
        } else {
            "idle"
        });
    }
    Verdict::CheckAt(next.min(deadline))
}

/// Counts a connection as open until its task ends, even by a panic.
struct OpenGuard(Arc<AtomicUsize>);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
    }
}

/// A request body that must arrive in full by a deadline: the timer starts
/// with the head and is never reset, so trickling bytes do not extend it.
struct DeadlineBody {
    inner: Incoming,
    deadline: Pin<Box<tokio::time::Sleep>>,
}

/// The error of a body that missed its deadline (the API answers 408).
#[derive(Debug, thiserror::Error)]
#[error("the request body did not arrive in time")]
pub struct BodyTimeout;

impl hyper::body::Body for DeadlineBody {
    type Data = hyper::body::Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        if std::future::Future::poll(self.deadline.as_mut(), cx).is_ready() {
            return Poll::Ready(Some(Err(Box::new(BodyTimeout))));
        }
        Pin::new(&mut self.inner)
            .poll_frame(cx)
            .map_err(|e| Box::new(e) as Self::Error)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// Serves `app` on `listener` until `shutdown` completes; then lets open
/// requests finish for up to `grace` and returns.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: ConnLimits,
    shutdown: impl std::future::Future<Output = ()>,
    grace: Duration,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let (stop_tx, stop_rx) = watch::channel(false);
    let open = Arc::new(AtomicUsize::new(0));
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            _ = &mut shutdown => break,
            p = slots.clone().acquire_owned() => p.expect("the semaphore is never closed"),
        };
        let (stream, _) = tokio::select! {
            _ = &mut shutdown => break,
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    // Out of descriptors or a connection reset before
                    // accept: wait a little rather than spin.
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let (app, mut stop) = (app.clone(), stop_rx.clone());
        open.fetch_add(1, Relaxed);
        let guard = OpenGuard(open.clone());
        tokio::spawn(async move {
            let _open = guard;
            let _slot = permit;
            connection(stream, app, limits, &mut stop).await;
        });
    }
    let _ = stop_tx.send(true);
    let t0 = Instant::now();
    while open.load(Relaxed) > 0 && t0.elapsed() < grace {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn connection(
    stream: tokio::net::TcpStream,
    app: Router,
    limits: ConnLimits,
    stop: &mut watch::Receiver<bool>,
) {
    let act = Arc::new(Activity::default());
    let clock = Arc::new(Clock(Instant::now()));
    // The first head's time starts now, not at its first byte.
    act.head_started.store(clock.now(), Relaxed);
    let io = TokioIo::new(Watched {
        io: stream,
        act: act.clone(),
        clock: clock.clone(),
    });
    let svc = {
        let (act, clock) = (act.clone(), clock.clone());
        hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
            act.active.fetch_add(1, Relaxed);
            act.head_started.store(0, Relaxed);
            let guard = ActiveGuard {
                act: act.clone(),
                clock: clock.clone(),
            };
            let req = req.map(|inner| {
                Body::new(DeadlineBody {
                    inner,
                    deadline: Box::pin(tokio::time::sleep(limits.body_timeout)),
                })
            });
            let app = app.clone();
            async move {
                let resp = app
                    .oneshot(req)
                    .await
                    .unwrap_or_else(|e: Infallible| match e {});
                Ok::<_, Infallible>(resp.map(move |b| {
                    Body::new(b.map_frame(move |f| {
                        let _held = &guard;
                        f
                    }))
                }))
            }
        })
    };
    let conn = hyper::server::conn::http1::Builder::new()
        .keep_alive(true)
        .serve_connection(io, svc);
    tokio::pin!(conn);
    let mut draining = false;
    loop {
        let at = match verdict(&act, clock.now(), &limits) {
            Verdict::Close(why) => {
                tracing::debug!("closing a connection: {why}");
                return;
            }
            Verdict::CheckAt(ms) => clock.0 + Duration::from_millis(ms),
        };
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!("connection ended: {e}");
                }
                return;
            }
            _ = tokio::time::sleep_until(at) => {}
            _ = act.head.notified() => {}
            _ = stop.changed(), if !draining => {
                draining = true;
                conn.as_mut().graceful_shutdown();
            }
        }
    }
}
