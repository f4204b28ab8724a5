//! A small fork-join thread pool for the model's per-operation parallelism.
//!
//! A decode step runs a few hundred small matmuls, so the cost of waking
//! workers matters more than anything else here: workers spin on a generation
//! counter for a while after each job (about a millisecond) before parking, so
//! back-to-back operations hand over in well under a microsecond.
//!
//! One job runs at a time: callers on different threads take turns, and a
//! job that itself calls into a pool runs that inner call on its own thread.

use std::cell::{Cell, UnsafeCell};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;

type Job = *const (dyn Fn(usize) + Sync);

struct Shared {
    generation: AtomicUsize,
    pending: AtomicUsize,
    stop: AtomicBool,
    sleeping: AtomicUsize,
    panicked: AtomicBool,
    job: UnsafeCell<Option<Job>>,
}

// SAFETY: `job` is written only by the thread inside `ThreadPool::run` that
// holds `ThreadPool::turn` (so by one thread at a time), before it publishes a
// new generation (release), and read by workers after they observe that
// generation (acquire); `run` does not return, nor release `turn`, until
// every worker is done with it, so the pointee outlives all reads.
unsafe impl Sync for Shared {}
unsafe impl Send for Shared {}

pub struct ThreadPool {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
    n_threads: usize,
    /// Held for the whole of a `run`: two callers publishing jobs at once
    /// would overwrite each other's job and completion count.
    turn: Mutex<()>,
}

thread_local! {
    /// Whether this thread is running a pool job (a worker, or a caller
    /// inside `run`): a `run` from there must not wait for workers, which
    /// may be the ones waiting for it.
    static IN_JOB: Cell<bool> = const { Cell::new(false) };
}

const SPIN_LIMIT: u32 = 200_000;

impl ThreadPool {
    /// A pool of `n_threads` threads in all, the calling thread included.
    pub fn new(n_threads: usize) -> Self {
        let n_threads = n_threads.max(1);
        let shared = Arc::new(Shared {
            generation: AtomicUsize::new(0),
            pending: AtomicUsize::new(0),
            stop: AtomicBool::new(false),
            sleeping: AtomicUsize::new(0),
            panicked: AtomicBool::new(false),
            job: UnsafeCell::new(None),
        });
        let workers = (1..n_threads)
            .map(|idx| {
                let s = shared.clone();
                std::thread::Builder::new()
                    .name(format!("ruvllm-worker-{idx}"))
                    .spawn(move || worker(s, idx))
                    .expect("spawn worker thread")
            })
            .collect();
        ThreadPool {
            shared,
            workers,
            n_threads,
            turn: Mutex::new(()),
        }
    }

    pub fn n_threads(&self) -> usize {
        self.n_threads
    }

    /// Runs `f(thread_index)` for every index `0..n_threads` and waits for
    /// all, each index on its own thread. Concurrent callers take turns; a
    /// call from inside a job runs every index on the calling thread.
    ///
    /// A thread that a job spawns is not "inside a job": if it calls `run`
    /// on the same pool while the job waits for it, it waits for the turn
    /// the job holds, and both hang. Jobs must not do that.
    pub fn run(&self, f: &(dyn Fn(usize) + Sync)) {
        if self.n_threads == 1 || IN_JOB.get() {
            (0..self.n_threads).for_each(f);
            return;
        }
        // A panic in an earlier job poisons the lock but leaves no state
        // behind: that run waited for its workers before unwinding.
        let _turn = self.turn.lock().unwrap_or_else(PoisonError::into_inner);
        let s = &*self.shared;
        // SAFETY: see `Shared`; erasing the lifetime is sound because we wait for
        // `pending == 0` before returning.
        unsafe {
            *s.job.get() = Some(std::mem::transmute::<*const (dyn Fn(usize) + Sync + '_), Job>(f));
        }
        s.pending.store(self.n_threads - 1, Ordering::SeqCst);
        s.generation.fetch_add(1, Ordering::SeqCst);
        if s.sleeping.load(Ordering::SeqCst) > 0 {
            for w in &self.workers {
                w.thread().unpark();
            }
        }
        IN_JOB.set(true);
        let mine = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(0)));
        IN_JOB.set(false);
        while s.pending.load(Ordering::Acquire) != 0 {
            std::hint::spin_loop();
        }
        // Cleared before re-raising the caller's own panic, so that a worker
        // panic of this call is not reported by the next, unrelated one.
        let worker_panicked = s.panicked.swap(false, Ordering::SeqCst);
        if let Err(p) = mine {
            std::panic::resume_unwind(p);
        }
        if worker_panicked {
            panic!("a worker thread panicked");
        }
    }

    /// Splits `0..total` into chunks of `chunk` and hands them out dynamically.
    pub fn for_each_chunk(
        &self,
        total: usize,
        chunk: usize,
        f: &(dyn Fn(std::ops::Range<usize>) + Sync),
    ) {
        let chunk = chunk.max(1);
        if self.n_threads == 1 || total <= chunk {
            if total > 0 {
                f(0..total);
            }
            return;
        }
        let next = AtomicUsize::new(0);
        self.run(&|_| loop {
            let start = next.fetch_add(chunk, Ordering::Relaxed);
            if start >= total {
                break;
            }
            f(start..(start + chunk).min(total));
        });
    }
}

impl ThreadPool {
    /// Calls `f(offset, chunk)` on disjoint `chunk`-sized pieces of `data`
    /// (the last may be shorter), spread over the pool.
    pub fn par_chunks_mut<T: Send>(
        &self,
        data: &mut [T],
        chunk: usize,
        f: &(dyn Fn(usize, &mut [T]) + Sync),
    ) {
        let len = data.len();
        let ptr = SyncPtr(data.as_mut_ptr());
        self.for_each_chunk(len, chunk, &|range| {
            // SAFETY: for_each_chunk hands out disjoint ranges within `len`.
            let piece =
                unsafe { std::slice::from_raw_parts_mut(ptr.get().add(range.start), range.len()) };
            f(range.start, piece);
        });
    }
}

fn worker(s: Arc<Shared>, idx: usize) {
    IN_JOB.set(true);
    let mut seen = 0usize;
    loop {
        let mut spins = 0u32;
        loop {
            let g = s.generation.load(Ordering::Acquire);
            if g != seen {
                seen = g;
                break;
            }
            if s.stop.load(Ordering::Relaxed) {
                return;
            }
            spins += 1;
            if spins < SPIN_LIMIT {
                std::hint::spin_loop();
            } else {
                s.sleeping.fetch_add(1, Ordering::SeqCst);
                if s.generation.load(Ordering::SeqCst) == seen && !s.stop.load(Ordering::SeqCst) {
                    std::thread::park();
                }
                s.sleeping.fetch_sub(1, Ordering::SeqCst);
                spins = 0;
            }
        }
        // SAFETY: see `Shared`.
        let job = unsafe { (*s.job.get()).expect("job set before generation bump") };
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| unsafe { (*job)(idx) }));
        if r.is_err() {
            s.panicked.store(true, Ordering::SeqCst);
        }
        s.pending.fetch_sub(1, Ordering::Release);
    }
}

impl Drop for ThreadPool {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        for w in &self.workers {
            w.thread().unpark();
        }
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

/// A raw pointer that may be shared between the pool's threads, for writing
/// disjoint parts of one output buffer.
pub struct SyncPtr<T>(pub *mut T);
impl<T> Clone for SyncPtr<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for SyncPtr<T> {}
impl<T> SyncPtr<T> {
    /// The pointer; a method so closures capture the whole (Sync) wrapper.
    #[inline]
    pub fn get(self) -> *mut T {
        self.0
    }
}
// SAFETY: users write only disjoint index sets from different threads.
unsafe impl<T> Send for SyncPtr<T> {}
unsafe impl<T> Sync for SyncPtr<T> {}
