//! The `ruvllm` command line.

mod cli;

use clap::{Args, Parser, Subcommand};
use ruvllm::adapter_registry::{LoraOption, XLoraOption};
use ruvllm::chat::ChatMessage;
use ruvllm::engine::{default_threads, Engine, EngineOptions};
use ruvllm::kv::KvDtype;
use ruvllm::request::GenerationRequest;
use ruvllm::sampling::SamplingParams;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

const DEFAULT_MODEL: &str = "models/SmolLM2-135M-Instruct.Q4_1.gguf";

#[derive(Parser)]
#[command(
    name = "ruvllm",
    version,
    about = "LLM inference runtime for GGUF and Hugging Face models"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Command,
}

#[derive(Args, Clone)]
struct ModelArgs {
    /// GGUF file or Hugging Face folder (config.json + *.safetensors + tokenizer.json).
    #[arg(long, short = 'm', default_value = DEFAULT_MODEL)]
    model: PathBuf,
    /// Threads for the model's matmuls (default: every core).
    #[arg(long, short = 't')]
    threads: Option<usize>,
    /// Tokens of context to reserve KV cache for (default: the model's, at most 4096).
    #[arg(long, short = 'c')]
    ctx_size: Option<usize>,
    /// LoRA adapter: a PEFT folder or a llama.cpp GGUF adapter (repeatable;
    /// several are summed). With `serve`, NAME=PATH loads an adapter that
    /// requests choose with `"model": "NAME"`; a bare PATH applies to all.
    #[arg(long = "lora", value_name = "[NAME=]PATH")]
    lora: Vec<String>,
    /// X-LoRA checkpoint (PEFT's: adapter_config.json of type XLORA, the
    /// classifier, one folder per expert): a classifier picks the experts'
    /// weights per token. With `serve`, NAME=PATH loads one that requests
    /// choose with `"model": "NAME"`; a bare PATH applies to all.
    #[arg(long = "xlora", value_name = "[NAME=]PATH")]
    xlora: Vec<String>,
    /// Named LoRA adapters resident at most (serve): loading one more over
    /// HTTP unloads the least recently used idle one.
    #[arg(long)]
    max_loras: Option<usize>,
    /// KV cache element type: f16 (half the memory, llama.cpp's default),
    /// f32 (exact), or q8_0 / q4_0 (blocks of 32 values as llama.cpp's
    /// `-ctk/-ctv`: 3.8× / 7.1× the tokens of f32 in the same memory).
    /// Default: f16 for `serve`, f32 elsewhere.
    #[arg(long, value_parser = ["f16", "f32", "q8_0", "q4_0"])]
    kv_dtype: Option<String>,
    /// In-situ quantization: quantize F32/F16/BF16 weights at load to this
    /// type (q8_0, q4_0, q4_1, q5_0, q5_1, q4_k, q5_k, q6_k; rows that are not
    /// whole blocks of 256 take Q5_0, Q5_1 or Q8_0, as llama-quantize does).
    #[arg(long, value_name = "TYPE")]
    isq: Option<String>,
    /// With --isq: run the float model over this text first and fit each
    /// block under the importance of its columns (the mean square of the
    /// activations they multiply, as llama.cpp's importance matrix).
    #[arg(long, value_name = "FILE", requires = "isq")]
    calibrate: Option<PathBuf>,
    /// Windows of --calibrate's text to run, at most (each of 512 tokens,
    /// or the context if smaller).
    #[arg(long, value_name = "N", default_value_t = ruvllm::engine::Calibration::DEFAULT_WINDOWS)]
    calibrate_windows: usize,
    /// Weight of each --lora, in the same order (default 1.0).
    #[arg(long = "lora-scale", value_name = "W", allow_negative_numbers = true)]
    lora_scale: Vec<f32>,
    /// Speculative decoding by prompt lookup: draft tokens per step, at
    /// most (0 turns it off). The output is the same either way.
    #[arg(long, value_name = "N", default_value_t = ruvllm::speculative::SpecConfig::default().tokens)]
    spec_tokens: usize,
    /// Drafting stops when more sequences than this decode at once.
    #[arg(long, value_name = "N", default_value_t = ruvllm::speculative::SpecConfig::default().max_seqs)]
    spec_max_seqs: usize,
}

impl ModelArgs {
    /// The adapters to load. Only a server keeps names: elsewhere every
    /// adapter applies.
    fn lora_options(&self, keep_names: bool) -> ruvllm::Result<Vec<LoraOption>> {
        if self.lora_scale.len() > self.lora.len() {
            return Err(ruvllm::Error::InvalidRequest(format!(
                "{} --lora-scale values for {} --lora adapters",
                self.lora_scale.len(),
                self.lora.len()
            )));
        }
        self.lora
            .iter()
            .enumerate()
            .map(|(i, arg)| {
                let (name, path) = named_path(arg, "LoRA adapter")?;
                Ok(LoraOption {
                    name: name.filter(|_| keep_names),
                    path,
                    scale: self.lora_scale.get(i).copied().unwrap_or(1.0),
                })
            })
            .collect()
    }

    /// The X-LoRA checkpoints to load (names kept by a server only).
    fn xlora_options(&self, keep_names: bool) -> ruvllm::Result<Vec<XLoraOption>> {
        self.xlora
            .iter()
            .map(|arg| {
                let (name, path) = named_path(arg, "X-LoRA checkpoint")?;
                Ok(XLoraOption {
                    name: name.filter(|_| keep_names),
                    path,
                })
            })
            .collect()
    }
}

/// Splits `[NAME=]PATH`: NAME=PATH when the text before '=' is a name (a
/// path with '=' in a folder name stays a path). The path must exist.
fn named_path(arg: &str, what: &str) -> ruvllm::Result<(Option<String>, PathBuf)> {
    let name_char = |c: char| c.is_ascii_alphanumeric() || "-_.:@+".contains(c);
    let (name, path) = match arg.split_once('=') {
        Some((n, p)) if !n.is_empty() && n.len() <= 128 && n.chars().all(name_char) => {
            (Some(n.to_string()), PathBuf::from(p))
        }
        _ => (None, PathBuf::from(arg)),
    };
    if !path.exists() {
        return Err(ruvllm::Error::InvalidRequest(format!(
            "{what} not found: {}",
            path.display()
        )));
    }
    Ok((name, path))
}

#[derive(Args, Clone)]
struct SamplingArgs {
    /// Maximum tokens to generate.
    #[arg(long, short = 'n', default_value_t = 256)]
    max_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.7)]
    temperature: f32,
    /// Keep the k most likely tokens (0: all).
    #[arg(long, default_value_t = 40)]
    top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches p.
    #[arg(long, default_value_t = 0.9)]
    top_p: f32,
    /// Drop tokens less likely than min-p times the most likely one.
    #[arg(long, default_value_t = 0.0)]
    min_p: f32,
    /// Penalty on tokens already generated (1.0: off).
    #[arg(long, default_value_t = 1.0)]
    repeat_penalty: f32,
    /// OpenAI-style frequency penalty.
    #[arg(long, default_value_t = 0.0)]
    frequency_penalty: f32,
    /// OpenAI-style presence penalty.
    #[arg(long, default_value_t = 0.0)]
    presence_penalty: f32,
    /// Random seed (same seed, same output).
    #[arg(long)]
    seed: Option<u64>,
    /// Stop before this text (repeatable).
    #[arg(long)]
    stop: Vec<String>,
}

impl SamplingArgs {
    fn params(&self) -> SamplingParams {
        SamplingParams {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            min_p: self.min_p,
            repetition_penalty: self.repeat_penalty,
            frequency_penalty: self.frequency_penalty,
            presence_penalty: self.presence_penalty,
            logit_bias: Vec::new(),
            seed: self.seed,
        }
    }
}

#[derive(Subcommand)]
enum Command {
    /// Interactive chat with the model's chat template (empty line or Ctrl-D quits).
    Chat {
        #[command(flatten)]
        model: ModelArgs,
        #[command(flatten)]
        sampling: SamplingArgs,
        /// System prompt.
        #[arg(long)]
        system: Option<String>,
    },
    /// Complete a raw prompt (no template), streaming the text to stdout.
    Run {
        #[command(flatten)]
        model: ModelArgs,
        #[command(flatten)]
        sampling: SamplingArgs,
        /// The prompt.
        #[arg(long, short = 'p')]
        prompt: String,
        /// Render the prompt as a user message with the chat template first.
        #[arg(long)]
        chat: bool,
        /// Print timing to stderr at the end.
        #[arg(long)]
        verbose: bool,
    },
    /// Architecture, parameters, quantization mix, context length, memory.
    Info {
        #[command(flatten)]
        model: ModelArgs,
    },
    /// Print token ids of text as JSON: {"ids":[...]}.
    Tokenize {
        #[command(flatten)]
        model: ModelArgs,
        #[arg(long)]
        text: String,
        /// Do not add BOS/EOS (by default they are added as the metadata says).
        #[arg(long)]
        no_special: bool,
    },
    /// Print full-vocabulary logits for every input position as JSON.
    Logits {
        #[command(flatten)]
        model: ModelArgs,
        /// Comma-separated token ids.
        #[arg(long, value_delimiter = ',', required = true)]
        tokens: Vec<u32>,
        /// Prefill the first token, then feed the rest one at a time through the KV cache.
        #[arg(long)]
        decode: bool,
    },
    /// Train a LoRA adapter over the frozen model (and any --lora adapters,
    /// kept frozen under it) on a JSON Lines file, one example per line:
    /// {"text"}, {"prompt", "completion"} or {"messages"} ending with an
    /// assistant turn (the loss is on the completion or that turn). The
    /// adapter is written as a PEFT folder for --lora.
    Train {
        #[command(flatten)]
        model: ModelArgs,
        #[command(flatten)]
        args: cli::train::TrainArgs,
    },
    /// Perplexity of a text file, scored as llama-perplexity does: the text is
    /// cut into windows of --ctx-size tokens (default 512) and the second
    /// half of each window is scored, the first half being its context.
    Perplexity {
        #[command(flatten)]
        model: ModelArgs,
        /// The text to score.
        #[arg(long, short = 'f')]
        file: PathBuf,
        /// Score at most this many windows.
        #[arg(long)]
        chunks: Option<usize>,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Prompt-processing and token-generation throughput (like llama-bench).
    Bench {
        #[command(flatten)]
        model: ModelArgs,
        /// Prompt lengths to measure.
        #[arg(
            short = 'p',
            long = "n-prompt",
            value_delimiter = ',',
            default_value = "512"
        )]
        n_prompt: Vec<usize>,
        /// Tokens to generate.
        #[arg(
            short = 'n',
            long = "n-gen",
            value_delimiter = ',',
            default_value = "128"
        )]
        n_gen: Vec<usize>,
        /// Context already in the KV cache when generation starts (as
        /// llama-bench's -d): tgN @ dD decodes N tokens after D.
        #[arg(short = 'd', long, value_delimiter = ',', default_value = "0")]
        depth: Vec<usize>,
        /// Also decode with this many sequences in shared batches (tgNxB).
        #[arg(short = 'b', long, value_delimiter = ',')]
        batch: Vec<usize>,
        /// Repetitions of each test.
        #[arg(short = 'r', long, default_value_t = 5)]
        repetitions: usize,
        /// Print one JSON object per test.
        #[arg(long)]
        json: bool,
    },
    /// Quantizes a GGUF file's F32/F16/BF16 weight matrices (as
    /// `llama-quantize --pure`; rows that are not whole blocks of a K-quant
    /// take its fallback type) and writes a new GGUF file.
    Quantize {
        /// GGUF file to read.
        input: PathBuf,
        /// GGUF file to write (replaced only once it is complete).
        output: PathBuf,
        /// q8_0, q4_0, q4_1, q5_0, q5_1, q4_k, q5_k or q6_k; f16 writes the
        /// weights as F16.
        #[arg(value_name = "TYPE")]
        ty: String,
        /// Threads (default: every core).
        #[arg(short, long)]
        threads: Option<usize>,
        /// Dequantize weights that are already quantized, then convert them
        /// (as llama-quantize's option; the rounding of both compounds).
        #[arg(long)]
        allow_requantize: bool,
    },
    /// OpenAI-compatible HTTP server with continuous batching.
    Serve(Box<ServeArgs>),
    /// Load test: concurrent streaming clients against an OpenAI-compatible server.
    BenchServe {
        /// Server base URL.
        #[arg(long, default_value = "http://127.0.0.1:8080")]
        url: String,
        /// Model names to send, comma-separated or repeated: request i
        /// names the (i mod n)-th, e.g. LoRA adapters of one server
        /// (default: none; servers use their only model).
        #[arg(long = "model", value_delimiter = ',')]
        models: Vec<String>,
        /// Concurrent clients.
        #[arg(long, short = 'c', default_value_t = 16)]
        clients: usize,
        /// Requests in all (default: twice the clients).
        #[arg(long)]
        requests: Option<usize>,
        /// Output tokens per request (EOS is ignored).
        #[arg(long, default_value_t = 128)]
        max_tokens: usize,
        /// Instead of the load test: requests one after another whose prompts
        /// share a document of about this many tokens (prefix caching).
        #[arg(long)]
        shared_prefix: Option<usize>,
        /// Name for this run in the report.
        #[arg(long, default_value = "server")]
        label: String,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Hostile load: normal requests mixed with malformed, half-bad and
    /// abandoned ones; then checks the server gave everything back.
    BenchHostile {
        /// Server base URL.
        #[arg(long, default_value = "http://127.0.0.1:8080")]
        url: String,
        /// Requests in all.
        #[arg(long, default_value_t = 10_000)]
        requests: usize,
        /// Concurrent clients.
        #[arg(long, short = 'c', default_value_t = 16)]
        clients: usize,
        /// Share of malformed, half-bad or abandoned requests.
        #[arg(long, default_value_t = 0.3)]
        bad_fraction: f64,
        /// The server's process id (its resident memory is read before and after).
        #[arg(long)]
        pid: Option<u32>,
        /// Seconds to let the server settle before each memory reading.
        #[arg(long, default_value_t = 3)]
        settle_secs: u64,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args)]
struct ServeArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Memory for the KV block pool, LoRA adapters included (default: 4 full
    /// contexts, at most 1 GiB, plus what the adapters given at start take).
    #[arg(long)]
    kv_cache_mb: Option<usize>,
    /// Tokens per KV block.
    #[arg(long, default_value_t = 16)]
    block_size: usize,
    /// Tokens one step may run across all sequences (the prefill chunk).
    #[arg(long, default_value_t = 512)]
    max_batched_tokens: usize,
    /// Sequences running at once.
    #[arg(long, default_value_t = 32)]
    max_num_seqs: usize,
    /// Requests that may wait beyond those running; more get 429.
    #[arg(long, default_value_t = 256)]
    max_waiting: usize,
    /// Require `Authorization: Bearer KEY` on the API routes (repeatable:
    /// each key is a tenant whose cached prefixes the others cannot hit).
    #[arg(long)]
    api_key: Vec<String>,
    /// Allowed CORS origin (repeatable; "*" for any).
    #[arg(long)]
    cors: Vec<String>,
    /// Longest a request may run, in seconds.
    #[arg(long, default_value_t = 600)]
    request_timeout_secs: u64,
    /// Largest request body, in KiB.
    #[arg(long, default_value_t = 2048)]
    max_body_kb: usize,
    /// Another name the model answers to.
    #[arg(long)]
    served_model_name: Option<String>,
    /// Seconds idle before memory holding nothing worth keeping is returned.
    #[arg(long, default_value_t = 10)]
    idle_trim_secs: u64,
    /// Idle trimming also forgets the prefix cache.
    #[arg(long)]
    idle_trim_drops_cache: bool,
    /// Seconds a client has to send a request head (from its first byte, or
    /// from connecting).
    #[arg(long, default_value_t = 10)]
    header_timeout_secs: u64,
    /// Seconds a connection may idle between requests.
    #[arg(long, default_value_t = 60)]
    keep_alive_secs: u64,
    /// Seconds a client has to send a request body.
    #[arg(long, default_value_t = 60)]
    body_timeout_secs: u64,
    /// Open connections at most (default: the open-file limit less 256).
    #[arg(long)]
    max_connections: Option<usize>,
    /// Serve /v1/load_lora_adapter and /v1/unload_lora_adapter (they load
    /// any file a client names: give it to trusted clients only, with --api-key).
    #[arg(long)]
    allow_lora_updates: bool,
    /// Learn from feedback (SONA): POST /v1/feedback rates a response by its
    /// id; LoRA adapters trained from the ratings apply to later requests
    /// (globally, and per OpenAI `user`). See the README.
    #[arg(long)]
    sona: bool,
    /// Where SONA keeps its trajectories and base adapter (survives restarts).
    #[arg(long, default_value = "sona", requires = "sona")]
    sona_dir: PathBuf,
    /// Consolidate SONA's base adapter after this many feedbacks (0: only on
    /// POST /v1/sona/consolidate).
    #[arg(long, default_value_t = 0, requires = "sona")]
    sona_consolidate_every: usize,
    /// Responses SONA keeps for feedback to refer to.
    #[arg(long, default_value_t = 1024, requires = "sona")]
    sona_max_responses: usize,
    /// Deliberate failures for tests: KIND:TOKEN (step-panic, step-error,
    /// admit-panic, abort-panic, fatal, slow) on requests whose prompt holds TOKEN.
    #[arg(long, hide = true)]
    debug_fault: Option<String>,
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    // A kernel level the CPU lacks is refused here, before any work starts.
    if let Err(e) = ruvllm::simd::requested().and_then(|_| run(cli)) {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

fn load(m: &ModelArgs) -> ruvllm::Result<Engine> {
    if !m.model.exists() {
        let hint = if m.model == Path::new(DEFAULT_MODEL) {
            " (fetch the default models with: scripts/fetch-models.sh)"
        } else {
            ""
        };
        return Err(ruvllm::Error::InvalidRequest(format!(
            "model not found: {}{hint}",
            m.model.display()
        )));
    }
    Engine::load(&m.model, &engine_options(m, false)?)
}

fn engine_options(m: &ModelArgs, serving: bool) -> ruvllm::Result<EngineOptions> {
    Ok(EngineOptions {
        threads: m.threads.unwrap_or_else(default_threads),
        context: m.ctx_size,
        lora: m.lora_options(serving)?,
        xlora: m.xlora_options(serving)?,
        isq: m.isq.as_deref().map(isq_type).transpose()?,
        calibration: m.calibrate.clone().map(|text| ruvllm::engine::Calibration {
            text,
            windows: m.calibrate_windows,
            window: ruvllm::engine::Calibration::DEFAULT_WINDOW,
        }),
        progress: true,
        max_loras: m.max_loras,
        speculative: (m.spec_tokens > 0).then(|| ruvllm::speculative::SpecConfig {
            tokens: m.spec_tokens.min(64),
            max_seqs: m.spec_max_seqs,
            ..Default::default()
        }),
        kv_dtype: match m.kv_dtype.as_deref() {
            Some(name) => KvDtype::from_name(name)
                .ok_or_else(|| ruvllm::Error::Config(format!("unknown KV type {name}")))?,
            None if serving => KvDtype::F16,
            None => KvDtype::F32,
        },
        ..Default::default()
    })
}

/// The GGML type an --isq (or quantize) type name stands for.
fn isq_type(name: &str) -> ruvllm::Result<ruvllm::quant::GgmlType> {
    use ruvllm::quant::quantize::ISQ_TYPES;
    let have: Vec<String> = ISQ_TYPES.iter().map(|t| t.name().to_lowercase()).collect();
    ISQ_TYPES
        .iter()
        .find(|t| t.name().eq_ignore_ascii_case(name))
        .copied()
        .ok_or_else(|| {
            ruvllm::Error::InvalidRequest(format!(
                "quantization type {name}: we quantize to {}",
                have.join(", ")
            ))
        })
}

fn secs(s: u64) -> std::time::Duration {
    std::time::Duration::from_secs(s)
}

fn serve(a: ServeArgs) -> ruvllm::Result<()> {
    if a.api_key.iter().any(|k| k.trim().is_empty()) {
        return Err(ruvllm::Error::InvalidRequest(
            "--api-key must not be empty".into(),
        ));
    }
    let addr = format!("{}:{}", a.host, a.port)
        .parse()
        .map_err(|e| ruvllm::Error::InvalidRequest(format!("bad --host/--port: {e}")))?;
    if !a.model.model.exists() {
        load(&a.model)?; // reports the missing file with its hint
    }
    cli::serve::run(cli::serve::ServeConfig {
        model: a.model.model.clone(),
        addr,
        engine: EngineOptions {
            kv_cache_mb: a.kv_cache_mb,
            block_size: a.block_size,
            max_batched_tokens: a.max_batched_tokens,
            max_num_seqs: a.max_num_seqs,
            ..engine_options(&a.model, true)?
        },
        engine_loop: ruvllm::engine_loop::LoopOptions {
            max_waiting: a.max_waiting,
            idle_trim: secs(a.idle_trim_secs),
            idle_trim_drops_cache: a.idle_trim_drops_cache,
        },
        server: ruvllm::server::ServerOptions {
            served_model_name: a.served_model_name,
            api_keys: a.api_key,
            cors: a.cors,
            request_timeout: secs(a.request_timeout_secs.max(1)),
            max_body_bytes: a.max_body_kb.saturating_mul(1024),
            max_preparing: a.max_num_seqs + a.max_waiting,
            allow_lora_updates: a.allow_lora_updates,
            limits: ruvllm::server::conn::ConnLimits {
                header_timeout: secs(a.header_timeout_secs.max(1)),
                keep_alive: secs(a.keep_alive_secs.max(1)),
                body_timeout: secs(a.body_timeout_secs.max(1)),
                max_connections: match a.max_connections {
                    Some(n) => ruvllm::server::conn::max_connections(n),
                    None => ruvllm::server::conn::default_max_connections(),
                },
            },
        },
        fault: a.debug_fault.as_deref().map(str::parse).transpose()?,
        sona: a.sona.then(|| ruvllm::sona::SonaConfig {
            dir: a.sona_dir.clone(),
            consolidate_every: a.sona_consolidate_every,
            max_responses: a.sona_max_responses.max(1),
            ..Default::default()
        }),
    })
}

fn run(cli: Cli) -> ruvllm::Result<()> {
    match cli.cmd {
        Command::Chat {
            model,
            sampling,
            system,
        } => chat(&model, &sampling, system),
        Command::Run {
            model,
            sampling,
            prompt,
            chat,
            verbose,
        } => {
            let mut e = load(&model)?;
            let ids = if chat {
                e.chat_prompt(&[ChatMessage::new("user", prompt)])?
            } else {
                e.tokenizer.encode(&prompt, true)?
            };
            let req = GenerationRequest {
                prompt: ids,
                sampling: sampling.params(),
                max_tokens: sampling.max_tokens,
                stop: sampling.stop.clone(),
                ..Default::default()
            };
            let mut out = std::io::stdout();
            let s = e.generate(&req, &mut |t| {
                let _ = out.write_all(t.text.as_bytes());
                let _ = out.flush();
                true
            })?;
            println!();
            if verbose {
                eprintln!(
                    "prompt: {} tokens ({} from the prefix cache) in {:.3}s ({:.1} tok/s); generated {} tokens in {:.3}s ({:.1} tok/s); finish: {}",
                    s.prompt_tokens,
                    s.cached_tokens,
                    s.prefill_secs,
                    s.prompt_tokens as f64 / s.prefill_secs,
                    s.tokens.len(),
                    s.decode_secs,
                    s.tokens.len() as f64 / s.decode_secs.max(1e-9),
                    s.finish.as_str()
                );
                let c = e.counters();
                if c.draft_tokens > 0 {
                    eprintln!(
                        "speculative decoding: {} of {} draft tokens accepted",
                        c.accepted_draft_tokens, c.draft_tokens
                    );
                }
            }
            Ok(())
        }
        Command::Info { model } => info(&model),
        Command::Tokenize {
            model,
            text,
            no_special,
        } => {
            let e = load(&model)?;
            let ids = e.tokenizer.encode(&text, !no_special)?;
            println!("{}", serde_json::json!({ "ids": ids }));
            Ok(())
        }
        Command::Logits {
            model,
            tokens,
            decode,
        } => {
            let mut e = load(&model)?;
            let vocab = e.model().spec.vocab_size;
            let logits = if decode {
                e.decode_logits(&tokens)?
            } else {
                let rows: Vec<usize> = (0..tokens.len()).collect();
                e.forward_sequence(&tokens, &rows, false)?.logits
            };
            let rows: Vec<&[f32]> = logits.chunks(vocab).collect();
            println!("{}", serde_json::json!({ "logits": rows }));
            Ok(())
        }
        Command::Perplexity {
            model,
            file,
            chunks,
            json,
        } => perplexity(&model, &file, chunks, json),
        Command::Train { model, args } => cli::train::run(&load(&model)?, &args),
        Command::Bench {
            model,
            n_prompt,
            n_gen,
            depth,
            batch,
            repetitions,
            json,
        } => bench(&model, &n_prompt, &n_gen, &depth, &batch, repetitions, json),
        Command::Quantize {
            input,
            output,
            ty,
            threads,
            allow_requantize,
        } => cli::quantize::run(
            &input,
            &output,
            if ty.eq_ignore_ascii_case("f16") {
                ruvllm::quant::GgmlType::F16
            } else {
                isq_type(&ty)?
            },
            threads.unwrap_or_else(default_threads).max(1),
            allow_requantize,
        ),
        Command::Serve(a) => serve(*a),
        Command::BenchServe {
            url,
            models,
            clients,
            requests,
            max_tokens,
            shared_prefix,
            label,
            json,
        } => cli::bench_serve::run(cli::bench_serve::BenchServeConfig {
            url: url.trim_end_matches('/').to_string(),
            models,
            clients: clients.max(1),
            requests: requests.unwrap_or(2 * clients.max(1)),
            max_tokens,
            shared_prefix,
            label,
            json,
        }),
        Command::BenchHostile {
            url,
            requests,
            clients,
            bad_fraction,
            pid,
            settle_secs,
            json,
        } => {
            if !(0.0..=1.0).contains(&bad_fraction) {
                return Err(ruvllm::Error::InvalidRequest(format!(
                    "--bad-fraction must be within 0..=1, got {bad_fraction}"
                )));
            }
            cli::bench_hostile::run(cli::bench_hostile::HostileConfig {
                url,
                requests,
                clients: clients.max(1),
                bad_fraction,
                pid,
                settle_secs,
                json,
            })
        }
    }
}

fn perplexity(
    m: &ModelArgs,
    file: &Path,
    max_chunks: Option<usize>,
    json: bool,
) -> ruvllm::Result<()> {
    let text = std::fs::read_to_string(file).map_err(|e| ruvllm::Error::io(file, e))?;
    let mut e = load(m)?;
    let window = m.ctx_size.unwrap_or(512).min(e.context());
    if window < 4 {
        return Err(ruvllm::Error::InvalidRequest(
            "--ctx-size must be at least 4 to score anything".into(),
        ));
    }
    // As llama-perplexity: whole windows of the text tokenized with BOS,
    // each starting with BOS.
    let (windows, n_tokens) =
        e.tokenizer
            .bos_windows(&text, window, max_chunks.unwrap_or(usize::MAX))?;
    let n_chunks = windows.len();
    if n_chunks == 0 {
        return Err(ruvllm::Error::InvalidRequest(format!(
            "{}: {n_tokens} tokens, fewer than one window of {window}",
            file.display(),
        )));
    }
    let start = Instant::now();
    let (mut nll, mut count) = (0f64, 0usize);
    let mut per_chunk = Vec::with_capacity(n_chunks);
    for (c, chunk) in windows.iter().enumerate() {
        let lps = e.token_logprobs(chunk)?;
        // lps[i] is log p(chunk[i + 1] | chunk[..=i]). As llama-perplexity,
        // the logits of positions window/2 ..= window - 2 are scored.
        let first = window / 2;
        for lp in &lps[first..] {
            nll -= *lp as f64;
            count += 1;
        }
        let ppl = (nll / count as f64).exp();
        per_chunk.push(ppl);
        if !json {
            eprint!("[{}]{ppl:.4} ", c + 1);
        }
    }
    let ppl = (nll / count as f64).exp();
    let secs = start.elapsed().as_secs_f64();
    if json {
        println!(
            "{}",
            serde_json::json!({
                "ppl": ppl,
                "tokens": count,
                "windows": n_chunks,
                "window": window,
                "seconds": secs,
                "running": per_chunk,
            })
        );
    } else {
        eprintln!();
        println!(
            "perplexity {ppl:.4} over {count} tokens ({n_chunks} windows of {window}; {:.1} tokens/s)",
            (n_chunks * window) as f64 / secs
        );
    }
    Ok(())
}

fn chat(m: &ModelArgs, s: &SamplingArgs, system: Option<String>) -> ruvllm::Result<()> {
    eprintln!("loading {} ...", m.model.display());
    let mut e = load(m)?;
    eprintln!(
        "{} ({}, {} threads). Type a message; an empty line or Ctrl-D quits.",
        e.provenance.name,
        e.family().name(),
        e.threads()
    );
    let mut messages: Vec<ChatMessage> = system
        .into_iter()
        .map(|s| ChatMessage::new("system", s))
        .collect();
    let stdin = std::io::stdin();
    let mut out = std::io::stdout();
    loop {
        print!("> ");
        let _ = out.flush();
        let mut line = String::new();
        if stdin.lock().read_line(&mut line).unwrap_or(0) == 0 || line.trim().is_empty() {
            println!();
            return Ok(());
        }
        messages.push(ChatMessage::new("user", line.trim_end()));
        let prompt = e.chat_prompt(&messages)?;
        let req = GenerationRequest {
            prompt,
            sampling: s.params(),
            max_tokens: s.max_tokens,
            stop: s.stop.clone(),
            ..Default::default()
        };
        match e.generate(&req, &mut |t| {
            let _ = out.write_all(t.text.as_bytes());
            let _ = out.flush();
            true
        }) {
            Ok(summary) => {
                println!();
                messages.push(ChatMessage::new("assistant", summary.text.trim()));
            }
            Err(err) => {
                // Too long a conversation: start over rather than quit.
                eprintln!("\nerror: {err}; the conversation was reset");
                messages.retain(|m| m.role == "system");
            }
        }
    }
}

fn info(m: &ModelArgs) -> ruvllm::Result<()> {
    let e = load(m)?;
    let s = &e.model().spec;
    let (bytes, mapped) = e.model().weight_bytes();
    let mix: Vec<String> = e
        .type_mix
        .iter()
        .map(|(t, n)| format!("{t}: {n}"))
        .collect();
    let kv_per_tok =
        ruvllm::kv::bytes_per_token(s.n_layers, s.n_kv_heads, s.head_dim, e.kv_dtype());
    println!("model:          {}", e.provenance.name);
    println!(
        "file:           {} ({}, {:.1} MiB)",
        e.provenance.path.display(),
        e.provenance.format,
        e.provenance.file_size as f64 / 1048576.0
    );
    println!("architecture:   {}", s.family.name());
    println!("kernels:        {}", ruvllm::simd::level().name());
    println!("parameters:     {:.1} M", e.model().n_params() as f64 / 1e6);
    println!("layers:         {}", s.n_layers);
    println!("hidden / ffn:   {} / {}", s.hidden, s.ffn);
    println!(
        "heads / kv:     {} / {} (head dim {})",
        s.n_heads, s.n_kv_heads, s.head_dim
    );
    println!(
        "vocabulary:     {} ({} tokenizer, pre '{}')",
        s.vocab_size,
        if e.tokenizer.pre == "hf" {
            "tokenizer.json"
        } else {
            "GGUF"
        },
        e.tokenizer.pre
    );
    println!(
        "context length: {} (KV cache reserved for {})",
        s.context_length,
        e.context()
    );
    if let Some(w) = s.sliding_window {
        let n = s.sliding_layers.iter().filter(|&&b| b).count();
        println!("sliding window: {w} tokens on {n} of {} layers", s.n_layers);
    }
    if !mix.is_empty() {
        println!("tensor types:   {}", mix.join(", "));
    }
    println!(
        "weights:        {:.1} MiB ({:.1} MiB memory-mapped)",
        bytes as f64 / 1048576.0,
        mapped as f64 / 1048576.0
    );
    println!(
        "KV cache:       {:.1} KiB per token, {:.1} MiB at full context",
        kv_per_tok as f64 / 1024.0,
        (kv_per_tok * e.context()) as f64 / 1048576.0
    );
    Ok(())
}

fn mean_std(v: &[f64]) -> (f64, f64) {
    let n = v.len() as f64;
    let mean = v.iter().sum::<f64>() / n;
    let var = if v.len() > 1 {
        v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0)
    } else {
        0.0
    };
    (mean, var.sqrt())
}

fn bench(
    m: &ModelArgs,
    n_prompt: &[usize],
    n_gen: &[usize],
    depths: &[usize],
    batch: &[usize],
    reps: usize,
    json: bool,
) -> ruvllm::Result<()> {
    let mut e = load(m)?;
    // Throughput of the model itself, as llama-bench measures it: no
    // drafting in the batched decode.
    e.set_speculative(None);
    let vocab = e.model().spec.vocab_size as u32;
    // Deterministic pseudo-random tokens, as llama-bench uses random ones.
    let mut rng = ruvllm::sampling::Rng::new(1234);
    let mut tokens = |n: usize| -> Vec<u32> {
        (0..n)
            .map(|_| (rng.next_u64() % vocab as u64) as u32)
            .collect()
    };
    let reps = reps.max(1);
    if !json {
        println!("| model | threads | test | t/s |");
        println!("| --- | ---: | ---: | ---: |");
    }
    let (name, threads) = (e.provenance.name.clone(), e.threads());
    let report = |test: String, rates: &[f64]| {
        let (mean, std) = mean_std(rates);
        if json {
            println!(
                "{}",
                serde_json::json!({"model": name, "threads": threads, "test": test, "avg_ts": mean, "stddev_ts": std, "samples_ts": rates})
            );
        } else {
            println!("| {name} | {threads} | {test} | {mean:.2} ± {std:.2} |");
        }
    };
    for &p in n_prompt.iter().filter(|&&p| p > 0) {
        let ids = tokens(p);
        e.forward_sequence(&ids, &[p - 1], false)?; // warm-up
        let mut rates = Vec::new();
        for _ in 0..reps {
            let t = Instant::now();
            e.forward_sequence(&ids, &[p - 1], false)?;
            rates.push(p as f64 / t.elapsed().as_secs_f64());
        }
        report(format!("pp{p}"), &rates);
    }
    for &n in n_gen.iter().filter(|&&n| n > 0) {
        let ids = tokens(n);
        e.decode_logits(&ids[..n.min(4)])?; // warm-up
        for &d in depths {
            let prefix = tokens(d);
            let mut rates = Vec::new();
            for _ in 0..reps {
                let (_, took) = e.decode_after(&prefix, &ids)?;
                rates.push(n as f64 / took.as_secs_f64());
            }
            let at = if d > 0 {
                format!(" @ d{d}")
            } else {
                String::new()
            };
            report(format!("tg{n}{at}"), &rates);
        }
        for &b in batch.iter().filter(|&&b| b > 1) {
            let mut rates = Vec::new();
            for _ in 0..reps {
                let prompts: Vec<Vec<u32>> = (0..b).map(|_| tokens(32)).collect();
                rates.push(batched_decode_rate(&mut e, prompts, n));
            }
            report(format!("tg{n}x{b}"), &rates);
        }
    }
    Ok(())
}

/// Aggregate tokens/s of `prompts.len()` sequences decoding `n` tokens
/// each in shared steps, counted from when all have their first token.
fn batched_decode_rate(e: &mut Engine, prompts: Vec<Vec<u32>>, n: usize) -> f64 {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    let b = prompts.len();
    let started = Arc::new(AtomicUsize::new(0));
    for prompt in prompts {
        let id = e.new_id();
        let started = started.clone();
        let mut first = true;
        let req = GenerationRequest {
            prompt,
            sampling: SamplingParams::greedy(),
            max_tokens: n,
            ignore_eos: true,
            ..Default::default()
        };
        e.add_request(
            id,
            req,
            None,
            Box::new(move |ev| {
                if matches!(ev, ruvllm::request::SeqEvent::Token(_)) && std::mem::take(&mut first) {
                    started.fetch_add(1, Ordering::Relaxed);
                }
                true
            }),
        );
    }
    while started.load(Ordering::Relaxed) < b {
        e.step();
    }
    let t = Instant::now();
    while e.has_work() {
        e.step();
    }
    (b * (n - 1)) as f64 / t.elapsed().as_secs_f64()
}
