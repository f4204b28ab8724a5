//! The thread pool is shared by reference (`run` takes `&self`), so it must
//! stay correct when several threads use it at once, and when a job calls
//! back into a pool.

use ruvllm::threadpool::ThreadPool;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// Σ 0..total through `for_each_chunk`, with every index visited once.
fn sum_through(pool: &ThreadPool, total: usize, chunk: usize) -> usize {
    let sum = AtomicUsize::new(0);
    pool.for_each_chunk(total, chunk, &|r| {
        sum.fetch_add(r.sum::<usize>(), Ordering::Relaxed);
    });
    sum.into_inner()
}

/// Fails (rather than hangs) when `f` does not finish in time.
fn within(secs: u64, f: impl FnOnce() + Send + 'static) {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        f();
        let _ = tx.send(());
    });
    match rx.recv_timeout(Duration::from_secs(secs)) {
        Ok(()) => {}
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => panic!("no result after {secs} s"),
        // The closure panicked: its message is already printed.
        Err(_) => panic!("the test body panicked"),
    }
}

#[test]
fn concurrent_callers_each_get_their_own_results() {
    within(120, || {
        let pool = ThreadPool::new(2);
        let start = Instant::now();
        std::thread::scope(|sc| {
            for caller in 0..3usize {
                let pool = &pool;
                sc.spawn(move || {
                    for i in 0..200usize {
                        // Every index of this caller's job runs exactly once,
                        // before run returns.
                        let hits: Vec<AtomicUsize> = (0..2).map(|_| AtomicUsize::new(0)).collect();
                        pool.run(&|t| {
                            hits[t].fetch_add(1, Ordering::SeqCst);
                        });
                        let hits: Vec<usize> =
                            hits.iter().map(|h| h.load(Ordering::SeqCst)).collect();
                        assert_eq!(hits, [1, 1], "caller {caller}, round {i}");
                        let total = 100 + (caller * 7919 + i * 31) % 5000;
                        let got = sum_through(pool, total, 16);
                        assert_eq!(got, total * (total - 1) / 2, "caller {caller}, round {i}");
                    }
                });
            }
        });
        eprintln!("3 × 200 concurrent jobs in {:?}", start.elapsed());
    });
}

#[test]
fn a_job_may_call_into_a_pool() {
    within(60, || {
        let pool = ThreadPool::new(3);
        let other = ThreadPool::new(2);
        for _ in 0..200 {
            let outer = AtomicUsize::new(0);
            pool.for_each_chunk(64, 1, &|r| {
                // The same pool and another one, from every thread of the job.
                let inner = sum_through(&pool, 1000, 10) + sum_through(&other, 10, 1);
                assert_eq!(inner, 499_500 + 45);
                outer.fetch_add(r.len(), Ordering::Relaxed);
            });
            assert_eq!(outer.into_inner(), 64);
        }
    });
}

#[test]
fn a_panicking_job_leaves_the_pool_usable() {
    let pool = ThreadPool::new(3);
    // The caller's part alone, a worker alone, and both at once (the
    // worker's panic must not be left over for the next, healthy call).
    for who in [&[0usize][..], &[2], &[0, 1]] {
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            pool.run(&|i| {
                if who.contains(&i) {
                    panic!("job {i} fails on purpose");
                }
            })
        }));
        assert!(r.is_err(), "threads {who:?}: the panic was not reported");
        assert_eq!(sum_through(&pool, 1000, 7), 499_500);
    }
}
