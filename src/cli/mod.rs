//! Subcommands of the `ruvllm` binary that need more than a few lines.

pub mod bench_hostile;
pub mod bench_serve;
pub mod quantize;
pub mod serve;
pub mod train;
