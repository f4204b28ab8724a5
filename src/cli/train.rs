//! `ruvllm train`: a LoRA adapter trained on a JSON Lines file (see
//! `ruvllm::train::data` for the formats) over the frozen model, written
//! as a PEFT folder that `--lora` (and PEFT) load.

use ruvllm::engine::Engine;
use ruvllm::model::lora::{LoraAdapter, Target};
use ruvllm::progress::Progress;
use ruvllm::sampling::Rng;
use ruvllm::train::{data::parse_jsonl, AdamW, AdamWConfig, Trainer};
use ruvllm::{Error, Result};
use std::path::PathBuf;
use std::time::Instant;

/// What `ruvllm train` takes beside the model.
#[derive(clap::Args, Debug)]
pub struct TrainArgs {
    /// The JSON Lines file.
    #[arg(long)]
    pub data: PathBuf,
    /// Folder the adapter is written to.
    #[arg(long, short = 'o')]
    pub out: PathBuf,
    /// LoRA rank.
    #[arg(long, default_value_t = 8)]
    pub rank: usize,
    /// LoRA alpha (the update is scaled by alpha / rank; default 2 × rank).
    #[arg(long)]
    pub alpha: Option<f32>,
    /// Projections to adapt.
    #[arg(long, value_delimiter = ',', default_value = "q,k,v,o,gate,up,down")]
    pub targets: Vec<String>,
    /// Passes over the data.
    #[arg(long, default_value_t = 1)]
    pub epochs: usize,
    /// AdamW learning rate (betas 0.9/0.999, weight decay 0.01).
    #[arg(long, default_value_t = 2e-4)]
    pub lr: f32,
    /// Examples per optimizer step (their gradients are averaged).
    #[arg(long, default_value_t = 4)]
    pub batch: usize,
    /// Tokens per example, at most (longer ones are cut).
    #[arg(long, default_value_t = 512)]
    pub max_len: usize,
    /// Seed of the adapter's initialisation and the data order.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Print the figures as one JSON object.
    #[arg(long)]
    pub json: bool,
}

fn target(name: &str) -> Result<Target> {
    Ok(match name {
        "q" => Target::Q,
        "k" => Target::K,
        "v" => Target::V,
        "o" => Target::O,
        "gate" => Target::Gate,
        "up" => Target::Up,
        "down" => Target::Down,
        other => {
            return Err(Error::InvalidRequest(format!(
                "unknown LoRA target {other:?} (q, k, v, o, gate, up, down)"
            )))
        }
    })
}

pub fn run(e: &Engine, a: &TrainArgs) -> Result<()> {
    if a.rank == 0 || a.epochs == 0 || a.batch == 0 || a.max_len < 2 {
        return Err(Error::InvalidRequest(
            "--rank, --epochs and --batch must be positive and --max-len at least 2".into(),
        ));
    }
    let targets = a
        .targets
        .iter()
        .map(|t| target(t.trim()))
        .collect::<Result<Vec<_>>>()?;
    let model = e.model();
    let has_gate = model.layers.iter().all(|l| l.gate.is_some());
    if targets.contains(&Target::Gate) && !has_gate {
        return Err(Error::InvalidRequest(
            "this model's MLP has no gate projection: drop 'gate' from --targets".into(),
        ));
    }
    let text = std::fs::read_to_string(&a.data).map_err(|err| Error::io(&a.data, err))?;
    let max_len = a.max_len.min(e.context());
    let examples = parse_jsonl(&text, &e.tokenizer, &e.template, max_len)?;
    let alpha = a.alpha.unwrap_or(2.0 * a.rank as f32);
    let mut adapter = LoraAdapter::new_trainable(
        "trained",
        &model.spec,
        has_gate,
        a.rank,
        alpha / a.rank as f32,
        &targets,
        a.seed,
    )?;
    let mut optimizer = AdamW::new(AdamWConfig {
        lr: a.lr,
        ..AdamWConfig::default()
    })?;
    let mut trainer = Trainer {
        model,
        frozen: e.always_on_adapters(),
        adapter: &mut adapter,
        optimizer: &mut optimizer,
    };
    let pool = e.pool();
    let tokens: usize = examples.iter().map(|x| x.tokens.len()).sum();
    let start = Instant::now();
    let before = trainer.mean_loss(&examples, pool)?;
    let steps_per_epoch = examples.len().div_ceil(a.batch);
    let total = steps_per_epoch * a.epochs;
    let mut progress = Progress::new("training", !a.json);
    let mut rng = Rng::new(a.seed);
    let mut order: Vec<usize> = (0..examples.len()).collect();
    let mut epoch_losses = Vec::new();
    let train_start = Instant::now();
    for epoch in 0..a.epochs {
        // Fisher-Yates with our own generator: the same seed, the same run.
        for i in (1..order.len()).rev() {
            order.swap(i, (rng.next_u64() % (i as u64 + 1)) as usize);
        }
        let mut sum = 0f32;
        for (s, idx) in order.chunks(a.batch).enumerate() {
            let batch: Vec<_> = idx.iter().map(|&i| &examples[i]).collect();
            sum += trainer.step(&batch, pool)?;
            progress.update(epoch * steps_per_epoch + s + 1, total);
        }
        epoch_losses.push(sum / steps_per_epoch as f32);
    }
    let train_secs = train_start.elapsed().as_secs_f64();
    let after = trainer.mean_loss(&examples, pool)?;
    adapter.save_peft(&a.out, &model.spec)?;
    let trained_tokens = (tokens * a.epochs) as f64;
    if a.json {
        println!(
            "{}",
            serde_json::json!({
                "examples": examples.len(),
                "tokens": tokens,
                "steps": total,
                "loss_before": before,
                "loss_after": after,
                "epoch_losses": epoch_losses,
                "train_seconds": train_secs,
                "tokens_per_second": trained_tokens / train_secs,
                "seconds": start.elapsed().as_secs_f64(),
                "out": a.out,
            })
        );
    } else {
        for (i, l) in epoch_losses.iter().enumerate() {
            eprintln!("epoch {}: mean loss {l:.4}", i + 1);
        }
        eprintln!(
            "{} examples ({tokens} tokens), {total} steps in {train_secs:.1}s ({:.0} tokens/s); \
             loss {before:.4} -> {after:.4}; adapter written to {}",
            examples.len(),
            trained_tokens / train_secs,
            a.out.display()
        );
    }
    Ok(())
}
