//! A progress bar for long work at load (in-situ quantization), drawn on
//! standard error only when it is a terminal.

use std::io::{IsTerminal, Write};
use std::time::Instant;

pub struct Progress {
    label: String,
    start: Instant,
    /// Drawn at all (a terminal, and asked for).
    shown: bool,
    last_percent: Option<usize>,
}

impl Progress {
    pub fn new(label: impl Into<String>, wanted: bool) -> Self {
        Progress {
            label: label.into(),
            start: Instant::now(),
            shown: wanted && std::io::stderr().is_terminal(),
            last_percent: None,
        }
    }

    /// Redraws the bar when the whole percentage changed.
    pub fn update(&mut self, done: usize, total: usize) {
        if !self.shown || total == 0 {
            return;
        }
        let pct = done * 100 / total;
        if self.last_percent == Some(pct) {
            return;
        }
        self.last_percent = Some(pct);
        let filled = pct * 30 / 100;
        let mut err = std::io::stderr().lock();
        let _ = write!(
            err,
            "\r{} [{}{}] {pct:3}% ({done}/{total}, {:.1}s)",
            self.label,
            "#".repeat(filled),
            " ".repeat(30 - filled),
            self.start.elapsed().as_secs_f64()
        );
        if done == total {
            let _ = writeln!(err);
        }
        let _ = err.flush();
    }
}
