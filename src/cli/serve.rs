//! `ruvllm serve`: binds first, so that /health answers 503 while the model
//! loads, then serves until Ctrl-C.

use ruvllm::engine::FaultPlan;
use ruvllm::engine::{Engine, EngineOptions};
use ruvllm::engine_loop::{EngineHandle, LoopOptions};
use ruvllm::kv::{bytes_per_token, KvDtype};
use ruvllm::server::{conn, router, AppState, ServerOptions};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

pub struct ServeConfig {
    pub model: PathBuf,
    pub addr: SocketAddr,
    pub engine: EngineOptions,
    pub engine_loop: LoopOptions,
    pub server: ServerOptions,
    /// Deliberate failures, for tests of fault handling.
    pub fault: Option<FaultPlan>,
    /// Learning from feedback, when asked for.
    pub sona: Option<ruvllm::sona::SonaConfig>,
}

pub fn run(cfg: ServeConfig) -> ruvllm::Result<()> {
    let model_id = cfg
        .model
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into());
    let limits = cfg.server.limits;
    let state = AppState::new(model_id.clone(), cfg.server.clone());
    // Two I/O threads keep streams flowing while one is busy; tokenizing
    // and template rendering go to a small blocking pool. The cores belong
    // to the engine's thread pool.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(2)
        .enable_all()
        .build()
        .map_err(|e| ruvllm::Error::io("tokio runtime", e))?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(cfg.addr)
            .await
            .map_err(|e| ruvllm::Error::io(format!("bind {}", cfg.addr), e))?;
        eprintln!(
            "listening on http://{} (loading {}); at most {} connections",
            cfg.addr,
            cfg.model.display(),
            limits.max_connections
        );
        let loader_state = state.clone();
        let (done_tx, done_rx) = tokio::sync::oneshot::channel();
        let fault = cfg.fault;
        let sona = cfg.sona;
        std::thread::spawn(move || {
            let r = load(&cfg.model, &cfg.engine, cfg.engine_loop, fault, sona).map(|(h, s)| {
                if let Some(s) = s {
                    let _ = loader_state.sona.set(std::sync::Arc::new(s));
                }
                let _ = loader_state.engine.set(h);
            });
            let _ = done_tx.send(r);
        });
        let app = router(state.clone());
        let serving = tokio::spawn(conn::serve(
            listener,
            app,
            limits,
            async {
                let _ = tokio::signal::ctrl_c().await;
                eprintln!("shutting down");
            },
            Duration::from_secs(10),
        ));
        // A model that fails to load ends the server with its error.
        match done_rx.await {
            Ok(Ok(())) => eprintln!("ready: serving '{model_id}'"),
            Ok(Err(e)) => return Err(e),
            Err(_) => return Err(ruvllm::Error::Internal("the loader thread died".into())),
        }
        // An engine that stopped for good cannot serve: exit non-zero so
        // that a supervisor restarts the process (/health says 503 meanwhile).
        let engine = state.engine.get().expect("loaded").clone();
        tokio::select! {
            r = serving => r.map_err(|e| ruvllm::Error::Internal(e.to_string())),
            _ = async {
                while engine.is_alive() {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            } => {
                eprintln!("error: the engine stopped after an unrecoverable fault; exiting");
                std::process::exit(70);
            }
        }
    })
}

fn load(
    path: &std::path::Path,
    opts: &EngineOptions,
    loop_opts: LoopOptions,
    fault: Option<FaultPlan>,
    sona: Option<ruvllm::sona::SonaConfig>,
) -> ruvllm::Result<(EngineHandle, Option<ruvllm::sona::SonaEngine>)> {
    let mut engine = Engine::load(path, opts)?;
    engine.fault = fault;
    let s = &engine.model().spec;
    let stats = engine.stats();
    let bs = engine.block_size();
    let mib = (bytes_per_token(s.n_layers, s.n_kv_heads, s.head_dim, engine.kv_dtype())
        * bs
        * stats.blocks_total) as f64
        / (1 << 20) as f64;
    let dtype = engine.kv_dtype();
    // What the same memory would hold in f32, so a quantized cache's gain shows.
    let vs_f32 =
        KvDtype::F32.vector_bytes(s.head_dim) as f64 / dtype.vector_bytes(s.head_dim) as f64;
    let lora = match engine.adapter_blocks() {
        0 => String::new(),
        n => format!(" ({n} of them hold LoRA adapters)"),
    };
    eprintln!(
        "KV cache: {} blocks{lora} × {bs} tokens = {} tokens ({mib:.0} MiB, {dtype}: {vs_f32:.1}× the tokens of f32); context {} tokens; up to {} sequences, {} tokens per step; {} threads",
        stats.blocks_total,
        (stats.blocks_total - engine.adapter_blocks()) * bs,
        engine.context(),
        opts.max_num_seqs,
        opts.max_batched_tokens,
        engine.threads(),
    );
    let model = engine.shared_model();
    let handle = EngineHandle::spawn(engine, loop_opts, opts.max_num_seqs)?;
    let sona = match sona {
        Some(cfg) => {
            let dir = cfg.dir.clone();
            let s = ruvllm::sona::SonaEngine::start(cfg, model, handle.clone())?;
            let st = s.stats();
            eprintln!(
                "SONA: learning from feedback into {} (base version {}, {} trajectories kept)",
                dir.display(),
                st.base_version,
                st.trajectories
            );
            Some(s)
        }
        None => None,
    };
    Ok((handle, sona))
}
