//! Subcommands. Every flag can also be set through its `EXPERTMESH_…`
//! environment variable.

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use expertmesh_model::config::Arch;
use expertmesh_model::generate::{SamplingParams, generate};
use expertmesh_model::genmodel::{GenDtype, GenSpec, generate_checkpoint};
use expertmesh_model::model::Model;
use expertmesh_model::mtp::generate_mtp;
use expertmesh_model::options::{SpeculativeArgs, WeightArgs};
use expertmesh_model::tokenizer::{ChatMessage, IncrementalDecoder, TextTokenizer};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Parser)]
#[command(name = "expertmesh", version, about = "ExpertMesh: expert-parallel MoE serving")]
pub struct Cli {
    /// Compute threads (default: all cores).
    #[arg(long, global = true, env = "EXPERTMESH_THREADS")]
    threads: Option<usize>,
    #[command(subcommand)]
    cmd: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate text offline with the model in this process.
    Generate(GenerateArgs),
    /// Write a random checkpoint in Hugging Face layout.
    GenModel(GenModelArgs),
    /// Perplexity of a checkpoint over a text file (sliding windows).
    Eval(crate::eval_cmd::EvalCmd),
    /// Start a local cluster (etcd, coordinator, expert nodes, router) as child processes.
    Up(crate::up::UpCmd),
    /// Load-test a router, or the same engine in this process.
    Bench(BenchCmd),
    /// Plan expert placement offline from a load matrix.
    Placement(crate::placement_cmd::PlacementCmd),
    /// Show the cluster from etcd: leader, live nodes, placement, balance.
    Status(crate::cluster_cmd::StatusCmd),
    /// Move an expert node's experts away, then mark it drained.
    Drain(crate::cluster_cmd::DrainCmd),
    /// Ask the leading coordinator to re-plan placement now.
    Rebalance(crate::cluster_cmd::RebalanceCmd),
}

#[derive(Args)]
struct BenchCmd {
    /// Run the engine in this process (local experts) as the baseline.
    #[arg(long, conflicts_with_all = ["router", "url"], required_unless_present_any = ["router", "url"], env = "EXPERTMESH_MODEL")]
    model: Option<PathBuf>,
    /// A router's gRPC address (its own GenerateService).
    #[arg(long, conflicts_with = "url", env = "EXPERTMESH_ROUTER")]
    router: Option<String>,
    /// A public API endpoint: `http://HOST:PORT` for openai, `HOST:PORT` for kserve.
    #[arg(long, requires = "api", env = "EXPERTMESH_URL")]
    url: Option<String>,
    /// Which public API `--url` speaks.
    #[arg(long, value_enum, env = "EXPERTMESH_API")]
    api: Option<crate::bench::Api>,
    /// Bearer key for an API started with --api-key.
    #[arg(long, env = "EXPERTMESH_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// The served model's name (KServe requests carry it).
    #[arg(long, env = "EXPERTMESH_MODEL_NAME")]
    model_name: Option<String>,
    /// CA (PEM) of a router started with --tls-cert: connect over TLS.
    #[arg(long, env = "EXPERTMESH_TLS_CA")]
    tls_ca: Option<PathBuf>,
    #[arg(long, default_value_t = 8, env = "EXPERTMESH_CONCURRENCY")]
    concurrency: usize,
    #[arg(long, default_value_t = 32, env = "EXPERTMESH_REQUESTS")]
    requests: usize,
    /// Seconds to keep sending requests (instead of --requests): for
    /// throughput over a window, such as while a node is stopped.
    #[arg(long, env = "EXPERTMESH_DURATION")]
    duration: Option<f64>,
    /// Prompt length: token ids, or words with --text-prompts (and for kserve).
    #[arg(long, default_value_t = 64, env = "EXPERTMESH_PROMPT_TOKENS")]
    prompt_tokens: usize,
    /// The first N prompt token ids are the same in every request (a shared
    /// system prompt, for the prefix cache); the rest differ per request.
    #[arg(long, default_value_t = 0, env = "EXPERTMESH_SHARED_PREFIX_TOKENS")]
    shared_prefix_tokens: usize,
    /// Send every API the same text prompt (words), as kserve always does,
    /// so the APIs are compared at equal work.
    #[arg(long, env = "EXPERTMESH_TEXT_PROMPTS")]
    text_prompts: bool,
    #[arg(long, default_value_t = 32, env = "EXPERTMESH_MAX_TOKENS")]
    max_tokens: usize,
    #[arg(long, env = "EXPERTMESH_JSON")]
    json: bool,
}

#[derive(Args)]
struct GenerateArgs {
    /// Checkpoint directory (config.json, *.safetensors, tokenizer.json).
    #[arg(long, env = "EXPERTMESH_MODEL", required_unless_present = "router")]
    model: Option<PathBuf>,
    /// Generate through a running router (its gRPC address) instead.
    #[arg(long, conflicts_with = "model", env = "EXPERTMESH_ROUTER")]
    router: Option<String>,
    /// CA (PEM) of a router started with --tls-cert: connect over TLS.
    #[arg(long, env = "EXPERTMESH_TLS_CA")]
    tls_ca: Option<PathBuf>,
    /// Bearer key for a router started with --api-key.
    #[arg(long, env = "EXPERTMESH_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Prompt text.
    #[arg(long, conflicts_with = "prompt_ids", required_unless_present = "prompt_ids", env = "EXPERTMESH_PROMPT")]
    prompt: Option<String>,
    /// Prompt as comma-separated token ids.
    #[arg(long, value_delimiter = ',', env = "EXPERTMESH_PROMPT_IDS")]
    prompt_ids: Option<Vec<u32>>,
    /// Wrap --prompt as a user message in the checkpoint's chat template.
    #[arg(long, requires = "prompt", env = "EXPERTMESH_CHAT")]
    chat: bool,
    #[arg(long, default_value_t = 16, env = "EXPERTMESH_MAX_TOKENS")]
    max_tokens: usize,
    /// 0 means greedy.
    #[arg(long, default_value_t = 0.0, env = "EXPERTMESH_TEMPERATURE")]
    temperature: f32,
    #[arg(long, default_value_t = 1.0, env = "EXPERTMESH_TOP_P")]
    top_p: f32,
    /// 0 disables top-k.
    #[arg(long, default_value_t = 0, env = "EXPERTMESH_TOP_K")]
    top_k: usize,
    #[arg(long, env = "EXPERTMESH_SEED")]
    seed: Option<u64>,
    /// Keep generating past EOS tokens.
    #[arg(long, env = "EXPERTMESH_IGNORE_EOS")]
    ignore_eos: bool,
    /// Print one JSON line instead of text.
    #[arg(long, env = "EXPERTMESH_JSON")]
    json: bool,
    /// Speculative decoding (offline here; a router takes the same flags).
    #[command(flatten)]
    spec: SpeculativeArgs,
    /// Precision and quantization of the weights.
    #[command(flatten)]
    weights: WeightArgs,
}

#[derive(Clone, Copy, ValueEnum)]
enum ArchArg {
    DeepseekV3,
    DeepseekV2,
    Qwen3Moe,
    Mixtral,
    /// Dense, as DeepSeek-R1-Distill-Qwen (q/k/v biases, tied embeddings).
    Qwen2,
    /// Dense, as DeepSeek-R1-Distill-Llama (Llama 3 RoPE scaling).
    Llama,
}

#[derive(Clone, Copy, ValueEnum)]
enum DtypeArg {
    Bf16,
    F32,
}

#[derive(Clone, Copy, ValueEnum)]
enum Preset {
    /// Small: loads and generates in well under a second.
    Demo,
    /// ~0.5B parameters: hidden 1024, 6 layers, 64 experts of width 512, 6 per token.
    Bench,
}

#[derive(Args)]
struct GenModelArgs {
    #[arg(long, value_enum, default_value = "deepseek-v3", env = "EXPERTMESH_ARCH")]
    arch: ArchArg,
    #[arg(long, env = "EXPERTMESH_OUT")]
    out: PathBuf,
    #[arg(long, default_value_t = 0, env = "EXPERTMESH_SEED")]
    seed: u64,
    #[arg(long, value_enum, default_value = "bf16", env = "EXPERTMESH_DTYPE")]
    dtype: DtypeArg,
    /// Starting sizes; the flags below override single fields.
    #[arg(long, value_enum, default_value = "demo", env = "EXPERTMESH_PRESET")]
    preset: Preset,
    /// Upper bound; the trained tokenizer's size is used when smaller.
    #[arg(long, env = "EXPERTMESH_VOCAB_SIZE")]
    vocab_size: Option<usize>,
    #[arg(long, env = "EXPERTMESH_HIDDEN_SIZE")]
    hidden_size: Option<usize>,
    #[arg(long, env = "EXPERTMESH_LAYERS")]
    layers: Option<usize>,
    #[arg(long, env = "EXPERTMESH_HEADS")]
    heads: Option<usize>,
    /// KV heads (GQA architectures).
    #[arg(long, env = "EXPERTMESH_KV_HEADS")]
    kv_heads: Option<usize>,
    /// Head size (GQA architectures).
    #[arg(long, env = "EXPERTMESH_HEAD_DIM")]
    head_dim: Option<usize>,
    /// Dense-layer FFN width.
    #[arg(long, env = "EXPERTMESH_INTERMEDIATE_SIZE")]
    intermediate_size: Option<usize>,
    /// Routed-expert FFN width.
    #[arg(long, env = "EXPERTMESH_MOE_INTERMEDIATE_SIZE")]
    moe_intermediate_size: Option<usize>,
    #[arg(long, env = "EXPERTMESH_EXPERTS")]
    experts: Option<usize>,
    #[arg(long, env = "EXPERTMESH_EXPERTS_PER_TOK")]
    experts_per_tok: Option<usize>,
    #[arg(long, env = "EXPERTMESH_SHARED_EXPERTS")]
    shared_experts: Option<usize>,
    /// Leading dense layers.
    #[arg(long, env = "EXPERTMESH_FIRST_DENSE")]
    first_dense: Option<usize>,
    /// Expert groups (group-limited routing).
    #[arg(long, env = "EXPERTMESH_GROUPS")]
    groups: Option<usize>,
    #[arg(long, env = "EXPERTMESH_TOPK_GROUPS")]
    topk_groups: Option<usize>,
    /// MLA query LoRA rank; 0 writes `q_lora_rank: null`.
    #[arg(long, env = "EXPERTMESH_Q_LORA_RANK")]
    q_lora_rank: Option<usize>,
    #[arg(long, env = "EXPERTMESH_KV_LORA_RANK")]
    kv_lora_rank: Option<usize>,
    #[arg(long, env = "EXPERTMESH_MAX_POSITION_EMBEDDINGS")]
    max_position_embeddings: Option<usize>,
    /// Add a (random) MTP module as DeepSeek-V3 stores it
    /// (`num_nextn_predict_layers: 1`, layer `--layers`); deepseek-v3 only.
    #[arg(long, env = "EXPERTMESH_MTP")]
    mtp: bool,
    /// A text file to train the tokenizer on instead of the built-in
    /// corpus, for a vocabulary as large as `--vocab-size` asks (DeepSeek's
    /// 129,280 needs tens of megabytes of text).
    #[arg(long, env = "EXPERTMESH_TOKENIZER_CORPUS")]
    tokenizer_corpus: Option<PathBuf>,
}

pub fn run(cli: Cli) -> Result<()> {
    expertmesh_plumbing::process::set_compute_threads(cli.threads).map_err(anyhow::Error::msg)?;
    match cli.cmd {
        Command::Generate(a) if a.router.is_some() => cmd_generate_remote(a),
        Command::Generate(a) => cmd_generate(a),
        Command::GenModel(a) => cmd_gen_model(a),
        Command::Eval(a) => crate::eval_cmd::cmd_eval(a),
        Command::Up(a) => cmd_up(a),
        Command::Bench(a) => cmd_bench(a),
        Command::Placement(a) => crate::placement_cmd::cmd_placement(a),
        Command::Status(a) => crate::cluster_cmd::cmd_status(a),
        Command::Drain(a) => crate::cluster_cmd::cmd_drain(a),
        Command::Rebalance(a) => crate::cluster_cmd::cmd_rebalance(a),
    }
}

/// Loads a model, with a progress bar on stderr unless `quiet`.
pub(crate) fn load_model(dir: &Path, weights: &WeightArgs, quiet: bool) -> Result<Model> {
    let bar = if quiet {
        ProgressBar::hidden()
    } else {
        let b = ProgressBar::new(0);
        b.set_style(
            ProgressStyle::with_template("loading {msg} [{bar:30}] {pos}/{len} layers")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        b.set_message(dir.display().to_string());
        b
    };
    let m = Model::load(dir, weights.clone(), &mut |done, total| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
    })
    .with_context(|| format!("loading model from {}", dir.display()))?;
    bar.finish_and_clear();
    Ok(m)
}

fn cmd_generate(a: GenerateArgs) -> Result<()> {
    let params = SamplingParams { temperature: a.temperature, top_p: a.top_p, top_k: a.top_k, seed: a.seed };
    params.validate().context("--temperature/--top-p")?;
    let t0 = Instant::now();
    let dir = a.model.clone().context("--model is required")?;
    let model = load_model(&dir, &a.weights, a.json)?;
    let tok = TextTokenizer::open(&dir)?;
    let load_s = t0.elapsed().as_secs_f64();
    let prompt_ids = match (&a.prompt_ids, &a.prompt) {
        (Some(ids), _) => ids.clone(),
        (None, Some(text)) => {
            let tok = tok.as_ref().context("--prompt needs the checkpoint's tokenizer.json (or use --prompt-ids)")?;
            let text = if a.chat {
                tok.apply_chat_template(&[ChatMessage::new("user", text.clone())], true)?
            } else {
                text.clone()
            };
            tok.encode(&text)?
        }
        (None, None) => bail!("one of --prompt or --prompt-ids is required"),
    };
    let stream = !a.json && tok.is_some();
    let mut decoder = IncrementalDecoder::default();
    let on_token = |t, _| {
        if let (true, Some(tok)) = (stream, &tok)
            && let Some(piece) = decoder.push(tok, t)
        {
            print!("{piece}");
            let _ = std::io::stdout().flush();
        }
    };
    let mtp = a.spec.mtp(&model).map_err(|(flag, why)| anyhow::anyhow!("{flag}: {why} ({})", dir.display()))?;
    let (g, spec) = if mtp {
        let (g, s) = generate_mtp(&model, &prompt_ids, a.max_tokens, params, a.ignore_eos, on_token)?;
        (g, Some(s))
    } else {
        (generate(&model, &prompt_ids, a.max_tokens, params, a.ignore_eos, on_token)?, None)
    };
    if let Some(s) = spec {
        eprintln!(
            "[speculative mtp: {} of {} drafts accepted ({:.1}%), {:.2} tokens per step]",
            s.accepted,
            s.drafted,
            100.0 * s.acceptance(),
            g.token_ids.len() as f64 / (s.steps + 1) as f64
        );
    }
    let text = match &tok {
        Some(t) => t.decode(&g.token_ids, true)?,
        None => String::new(),
    };
    if a.json {
        let timing = [load_s, g.prefill_s, g.decode_s];
        print_json(&prompt_ids, &g.token_ids, &g.logprobs, &text, g.finish_reason.as_str(), timing);
    } else {
        if !stream {
            println!("{}", g.token_ids.iter().map(u32::to_string).collect::<Vec<_>>().join(","));
        } else {
            println!();
        }
        let n = g.token_ids.len();
        eprintln!(
            "[{n} tokens, finish_reason={}, prefill {:.3}s, decode {:.1} tok/s]",
            g.finish_reason.as_str(),
            g.prefill_s,
            if n > 1 { (n - 1) as f64 / g.decode_s } else { 0.0 }
        );
    }
    Ok(())
}

fn cmd_gen_model(a: GenModelArgs) -> Result<()> {
    let arch = match a.arch {
        ArchArg::DeepseekV3 => Arch::DeepseekV3,
        ArchArg::DeepseekV2 => Arch::DeepseekV2,
        ArchArg::Qwen3Moe => Arch::Qwen3Moe,
        ArchArg::Mixtral => Arch::Mixtral,
        ArchArg::Qwen2 => Arch::Qwen2,
        ArchArg::Llama => Arch::Llama,
    };
    let mut s = GenSpec::demo(arch);
    if let Preset::Bench = a.preset {
        s.vocab_size = 32000;
        s.hidden_size = 1024;
        s.num_layers = 6;
        s.num_heads = 8;
        s.num_kv_heads = 4;
        s.head_dim = 128;
        s.intermediate_size = 2816;
        s.moe_intermediate_size = 512;
        s.n_experts = 64;
        s.experts_per_tok = 6;
        s.n_group = 8;
        s.topk_group = 4;
        s.q_lora_rank = Some(384);
        s.kv_lora_rank = 256;
        s.qk_nope_head_dim = 64;
        s.qk_rope_head_dim = 32;
        s.v_head_dim = 64;
    }
    s.seed = a.seed;
    s.dtype = match a.dtype {
        DtypeArg::Bf16 => GenDtype::Bf16,
        DtypeArg::F32 => GenDtype::F32,
    };
    let set = |dst: &mut usize, v: Option<usize>| {
        if let Some(v) = v {
            *dst = v;
        }
    };
    set(&mut s.vocab_size, a.vocab_size);
    set(&mut s.hidden_size, a.hidden_size);
    set(&mut s.num_layers, a.layers);
    set(&mut s.num_heads, a.heads);
    set(&mut s.num_kv_heads, a.kv_heads);
    set(&mut s.head_dim, a.head_dim);
    set(&mut s.intermediate_size, a.intermediate_size);
    set(&mut s.moe_intermediate_size, a.moe_intermediate_size);
    set(&mut s.n_experts, a.experts);
    set(&mut s.experts_per_tok, a.experts_per_tok);
    set(&mut s.n_shared_experts, a.shared_experts);
    set(&mut s.first_k_dense, a.first_dense);
    set(&mut s.n_group, a.groups);
    set(&mut s.topk_group, a.topk_groups);
    set(&mut s.kv_lora_rank, a.kv_lora_rank);
    set(&mut s.max_position_embeddings, a.max_position_embeddings);
    if let Some(r) = a.q_lora_rank {
        s.q_lora_rank = (r > 0).then_some(r);
    }
    if a.mtp && arch != Arch::DeepseekV3 {
        bail!("--mtp: only deepseek-v3 checkpoints carry an MTP module");
    }
    s.mtp = a.mtp;
    s.tokenizer_corpus = a.tokenizer_corpus;
    for (flag, v) in [
        ("--hidden-size", s.hidden_size),
        ("--layers", s.num_layers),
        ("--heads", s.num_heads),
        ("--experts", s.n_experts),
        ("--experts-per-tok", s.experts_per_tok),
        ("--vocab-size", s.vocab_size),
    ] {
        if v == 0 {
            bail!("{flag} must be positive");
        }
    }
    if s.experts_per_tok > s.n_experts {
        bail!("--experts-per-tok ({}) exceeds --experts ({})", s.experts_per_tok, s.n_experts);
    }
    if s.n_group == 0 || !s.n_experts.is_multiple_of(s.n_group) {
        bail!("--groups ({}) must divide --experts ({})", s.n_group, s.n_experts);
    }
    if s.num_kv_heads == 0 || !s.num_heads.is_multiple_of(s.num_kv_heads) {
        bail!("--heads ({}) must be a multiple of --kv-heads ({})", s.num_heads, s.num_kv_heads);
    }
    let t0 = Instant::now();
    generate_checkpoint(&s, &a.out).with_context(|| format!("writing {}", a.out.display()))?;
    // Read it back: a written checkpoint must parse.
    expertmesh_model::config::ModelConfig::from_dir(&a.out).context("re-reading the generated config")?;
    eprintln!("wrote {} ({}) in {:.1}s", a.out.display(), arch.name(), t0.elapsed().as_secs_f64());
    Ok(())
}

pub(crate) fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?)
}

fn cmd_generate_remote(a: GenerateArgs) -> Result<()> {
    use expertmesh_proto::v1::generate_request::Prompt;
    let addr = a.router.clone().context("--router")?;
    if a.spec.speculative.is_some() {
        bail!("--speculative: a router speculates for every request; start it with --speculative mtp");
    }
    let prompt = match (&a.prompt_ids, &a.prompt) {
        (Some(ids), _) => Prompt::TokenIds(expertmesh_proto::v1::TokenIds { ids: ids.clone() }),
        (None, Some(t)) => Prompt::Text(t.clone()),
        (None, None) => bail!("one of --prompt or --prompt-ids is required"),
    };
    let sampling = expertmesh_proto::v1::SamplingParams {
        temperature: a.temperature,
        top_p: a.top_p,
        top_k: a.top_k as u32,
        seed: a.seed,
    };
    let rt = runtime()?;
    let t0 = Instant::now();
    let (o, load_s) = rt.block_on(async {
        let mut client = crate::remote::connect(&addr, a.tls_ca.as_deref()).await?;
        let load_s = t0.elapsed().as_secs_f64();
        let mut req = tonic::Request::new(crate::remote::request(prompt, a.chat, a.max_tokens, sampling, a.ignore_eos));
        crate::bench::authorize(&mut req, &a.api_key)?;
        crate::remote::run_one(&mut client, req).await.map(|o| (o, load_s))
    })?;
    let first = o.token_times.first().map_or(0.0, |d| d.as_secs_f64());
    let last = o.token_times.last().map_or(0.0, |d| d.as_secs_f64());
    if a.json {
        print_json(&o.prompt_ids, &o.token_ids, &o.logprobs, &o.text, o.finish_reason, [load_s, first, last - first]);
    } else {
        println!(
            "{}",
            if o.text.is_empty() {
                o.token_ids.iter().map(u32::to_string).collect::<Vec<_>>().join(",")
            } else {
                o.text
            }
        );
        eprintln!("[{} tokens, finish_reason={}, first token {first:.3}s]", o.token_ids.len(), o.finish_reason);
    }
    Ok(())
}

fn cmd_up(a: crate::up::UpCmd) -> Result<()> {
    let model = match &a.model {
        Some(m) => m.clone(),
        None => crate::up::demo_model()?,
    };
    static STOP: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    extern "C" fn on_signal(_: libc::c_int) {
        STOP.store(true, std::sync::atomic::Ordering::Relaxed);
    }
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    crate::up::up(a, model, &STOP)
}

fn cmd_bench(a: BenchCmd) -> Result<()> {
    use clap::Parser as _;
    let rt = runtime()?;
    let load = crate::bench::Load {
        concurrency: a.concurrency,
        requests: a.requests,
        prompt_tokens: a.prompt_tokens,
        shared_prefix: a.shared_prefix_tokens,
        text: a.text_prompts,
        max_tokens: a.max_tokens,
        duration: match a.duration {
            Some(d) if d > 0.0 && d.is_finite() => Some(std::time::Duration::from_secs_f64(d)),
            Some(_) => bail!("--duration must be a positive number of seconds"),
            None => None,
        },
    };
    let target = |api, addr: String| crate::bench::Target {
        api,
        addr,
        api_key: a.api_key.clone(),
        model_name: a.model_name.clone(),
        tls_ca: a.tls_ca.clone(),
    };
    let report = rt.block_on(async {
        match (&a.url, &a.router, &a.model) {
            (Some(u), _, _) => {
                crate::bench::bench(target(a.api.unwrap_or(crate::bench::Api::Grpc), u.clone()), load).await
            }
            (None, Some(r), _) => crate::bench::bench(target(crate::bench::Api::Grpc, r.clone()), load).await,
            (None, None, Some(m)) => {
                // The same engine and API in this process, with local experts.
                let m = m.to_string_lossy().into_owned();
                let seqs = a.concurrency.max(1).to_string();
                let cfg = expertmesh_router::Config::try_parse_from([
                    "router",
                    "--model",
                    &m,
                    "--grpc",
                    "127.0.0.1:0",
                    "--http",
                    "127.0.0.1:0",
                    "--max-num-seqs",
                    &seqs,
                ])?;
                let stop = tokio_util::sync::CancellationToken::new();
                let (tx, rx) = tokio::sync::oneshot::channel();
                let server = tokio::spawn(expertmesh_router::run(cfg, stop.clone(), Some(tx)));
                let bound = rx.await.context("the in-process engine failed to start")?;
                let r = crate::bench::bench(target(crate::bench::Api::Grpc, bound.grpc.to_string()), load).await;
                stop.cancel();
                server.await??;
                r
            }
            (None, None, None) => bail!("one of --model, --router or --url is required"),
        }
    })?;
    if a.json {
        println!("{report}");
    } else {
        println!("{}", serde_json::to_string_pretty(&report)?);
    }
    Ok(())
}

/// The `generate --json` line, the same offline and through a router.
fn print_json(
    prompt: &[u32],
    tokens: &[u32],
    logprobs: &[f32],
    text: &str,
    finish: &str,
    [load_s, prefill_s, decode_s]: [f64; 3],
) {
    let out = json!({
        "prompt_token_ids": prompt,
        "token_ids": tokens,
        "logprobs": logprobs,
        "text": text,
        "finish_reason": finish,
        "timing": {"load_s": load_s, "prefill_s": prefill_s, "decode_s": decode_s},
    });
    println!("{out}");
}
