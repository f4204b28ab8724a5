//! [`TokenStream`]: the events of one generation, read as a blocking
//! iterator or polled without blocking or with a timeout; wrapped in an
//! [`AsyncTokenStream`](super::AsyncTokenStream), a `futures::Stream` whose
//! task is woken only when an event is ready.

use super::StreamEvent;
use crate::engine_loop::RequestGuard;
use crate::error::{Error, Result};
use futures::task::AtomicWaker;
use std::sync::mpsc;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

/// Streaming token iterator with throughput metrics.
///
/// ```
/// use ruvllm::backends::{GeneratedToken, StreamEvent, TokenStream};
/// use std::time::Duration;
///
/// let (tx, mut stream) = TokenStream::channel();
/// assert!(stream.recv_timeout(Duration::from_millis(10)).is_none()); // nothing yet
/// tx.send(StreamEvent::Token(GeneratedToken {
///     id: 7, text: "hi".into(), logprob: Some(-0.1), is_special: false,
/// })).unwrap();
/// drop(tx);
/// assert!(matches!(stream.try_next(), Some(Ok(StreamEvent::Token(_)))));
/// assert_eq!(stream.tokens_received(), 1);
/// assert!(stream.try_next().is_none() && stream.is_finished()); // the sender is gone
/// ```
pub struct TokenStream {
    rx: mpsc::Receiver<StreamEvent>,
    /// Woken by the producer after each event and when it goes away. A
    /// stream made from a plain channel has none until it is first polled
    /// as a `Stream` (see [`TokenStream::new`]).
    waker: Option<Arc<AtomicWaker>>,
    /// Cancels the generation when the stream is dropped.
    _guard: Option<RequestGuard>,
    finished: bool,
    start_time: Instant,
    token_count: usize,
}

impl TokenStream {
    /// A stream over the events sent into `receiver`.
    ///
    /// Reading it as an iterator or with [`try_next`](Self::try_next) /
    /// [`recv_timeout`](Self::recv_timeout) reads the channel directly. A
    /// plain channel cannot wake an async task, so the first time such a
    /// stream is polled as an [`AsyncTokenStream`](super::AsyncTokenStream)
    /// it moves the receiver to a helper thread that forwards each event and
    /// wakes the task; the thread ends when the sender is dropped. (The
    /// backends' streams wake their task directly.)
    pub fn new(receiver: mpsc::Receiver<StreamEvent>) -> Self {
        TokenStream {
            rx: receiver,
            waker: None,
            _guard: None,
            finished: false,
            start_time: Instant::now(),
            token_count: 0,
        }
    }

    /// A sender and the stream reading it.
    pub fn channel() -> (mpsc::Sender<StreamEvent>, Self) {
        let (tx, rx) = mpsc::channel();
        (tx, Self::new(rx))
    }

    /// A sender that wakes the stream's task after every event (what the
    /// backends use, so that no thread or polling is needed).
    pub(crate) fn waking_channel() -> (EventSender, Self) {
        let (tx, rx) = mpsc::channel();
        let waker = Arc::new(AtomicWaker::new());
        let mut stream = Self::new(rx);
        stream.waker = Some(waker.clone());
        (
            EventSender {
                tx: Some(tx),
                waker,
            },
            stream,
        )
    }

    /// Ties the generation's lifetime to the stream's.
    pub(crate) fn with_guard(mut self, guard: RequestGuard) -> Self {
        self._guard = Some(guard);
        self
    }

    /// Whether the last event (`Done` or `Error`) was read or the sender is gone.
    pub fn is_finished(&self) -> bool {
        self.finished
    }

    /// `Token` events read so far.
    pub fn tokens_received(&self) -> usize {
        self.token_count
    }

    /// Time since the stream was created.
    pub fn elapsed(&self) -> Duration {
        self.start_time.elapsed()
    }

    /// Tokens read per second since the stream was created.
    pub fn tokens_per_second(&self) -> f64 {
        let secs = self.elapsed().as_secs_f64();
        if secs > 0.0 {
            self.token_count as f64 / secs
        } else {
            0.0
        }
    }

    /// The next event if one is ready, without blocking. `None` when nothing
    /// is ready yet or the stream has finished ([`is_finished`](Self::is_finished) tells which).
    pub fn try_next(&mut self) -> Option<Result<StreamEvent>> {
        if self.finished {
            return None;
        }
        match self.rx.try_recv() {
            Ok(ev) => Some(self.note(ev)),
            Err(mpsc::TryRecvError::Empty) => None,
            Err(mpsc::TryRecvError::Disconnected) => {
                self.finished = true;
                None
            }
        }
    }

    /// The next event, waiting at most `timeout`. `None` when the time ran
    /// out or the stream has finished ([`is_finished`](Self::is_finished) tells which).
    pub fn recv_timeout(&mut self, timeout: Duration) -> Option<Result<StreamEvent>> {
        if self.finished {
            return None;
        }
        match self.rx.recv_timeout(timeout) {
            Ok(ev) => Some(self.note(ev)),
            Err(mpsc::RecvTimeoutError::Timeout) => None,
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                self.finished = true;
                None
            }
        }
    }

    fn note(&mut self, ev: StreamEvent) -> Result<StreamEvent> {
        match &ev {
            StreamEvent::Token(_) => self.token_count += 1,
            StreamEvent::Done { .. } | StreamEvent::Error(_) => self.finished = true,
        }
        Ok(ev)
    }

    /// The next event for an async reader ([`super::AsyncTokenStream`]):
    /// `Pending` registers the task, which is woken when an event is sent.
    pub(crate) fn poll_event(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<StreamEvent>>> {
        if self.finished {
            return Poll::Ready(None);
        }
        let waker = match &self.waker {
            Some(w) => w.clone(),
            None => match self.bridge() {
                Ok(w) => w,
                Err(e) => {
                    self.finished = true;
                    return Poll::Ready(Some(Err(e)));
                }
            },
        };
        // Registered before looking, so an event sent after the look wakes us.
        waker.register(cx.waker());
        match self.rx.try_recv() {
            Ok(ev) => Poll::Ready(Some(self.note(ev))),
            Err(mpsc::TryRecvError::Empty) => Poll::Pending,
            Err(mpsc::TryRecvError::Disconnected) => {
                self.finished = true;
                Poll::Ready(None)
            }
        }
    }

    /// Gives a plain-channel stream a waker: its receiver moves to a thread
    /// that forwards every event through a waking channel.
    fn bridge(&mut self) -> Result<Arc<AtomicWaker>> {
        let (tx, rx) = mpsc::channel();
        let plain = std::mem::replace(&mut self.rx, rx);
        let waker = Arc::new(AtomicWaker::new());
        let sender = EventSender {
            tx: Some(tx),
            waker: waker.clone(),
        };
        std::thread::Builder::new()
            .name("ruvllm-stream".into())
            .spawn(move || {
                for ev in plain {
                    if !sender.send(ev) {
                        break;
                    }
                }
            })
            .map_err(|e| Error::io("token stream thread", e))?;
        self.waker = Some(waker.clone());
        Ok(waker)
    }
}

impl Iterator for TokenStream {
    type Item = Result<StreamEvent>;

    /// Blocks until the next event; `None` once the stream has finished.
    fn next(&mut self) -> Option<Self::Item> {
        if self.finished {
            return None;
        }
        match self.rx.recv() {
            Ok(ev) => Some(self.note(ev)),
            Err(mpsc::RecvError) => {
                self.finished = true;
                None
            }
        }
    }
}

/// The producer's end of [`TokenStream::waking_channel`].
pub(crate) struct EventSender {
    /// Taken on drop, so that the receiver sees the disconnection before the
    /// task is woken to look.
    tx: Option<mpsc::Sender<StreamEvent>>,
    waker: Arc<AtomicWaker>,
}

impl EventSender {
    /// Sends and wakes the reader; false once the stream is gone.
    pub(crate) fn send(&self, ev: StreamEvent) -> bool {
        let sent = self.tx.as_ref().is_some_and(|tx| tx.send(ev).is_ok());
        self.waker.wake();
        sent
    }
}

impl Drop for EventSender {
    fn drop(&mut self) {
        drop(self.tx.take());
        self.waker.wake();
    }
}
