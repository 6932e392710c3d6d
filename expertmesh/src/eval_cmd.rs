//! `expertmesh eval`: perplexity of a checkpoint over a text file, with
//! sliding windows (the model crate's `perplexity` module), as llama.cpp's
//! `llama-perplexity` and transformers' perplexity guide report it; offline,
//! or through a router's OpenAI completions (`echo` + `logprobs` with
//! `max_tokens: 0`, which scores a prompt without generating).

use anyhow::{Context, Result, bail};
use clap::Args;
use expertmesh_model::ModelError;
use expertmesh_model::config::ModelConfig;
use expertmesh_model::options::WeightArgs;
use expertmesh_model::perplexity::{Perplexity, perplexity, perplexity_offline};
use expertmesh_model::tokenizer::TextTokenizer;
use serde_json::{Value, json};
use std::path::PathBuf;
use std::time::Instant;

#[derive(Args)]
pub struct EvalCmd {
    /// Checkpoint directory (config.json, tokenizer.json; the weights too
    /// unless --url scores through a router serving it).
    #[arg(long, env = "EXPERTMESH_MODEL")]
    model: PathBuf,
    /// Score through a router's OpenAI API at this URL (`http://HOST:PORT`).
    #[arg(long, env = "EXPERTMESH_URL")]
    url: Option<String>,
    /// Bearer key for a router started with --api-key.
    #[arg(long, requires = "url", env = "EXPERTMESH_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// CA (PEM) of a router serving HTTPS.
    #[arg(long, requires = "url", env = "EXPERTMESH_TLS_CA")]
    tls_ca: Option<PathBuf>,
    /// UTF-8 text to score (tokenized whole, without a chat template).
    #[arg(long, env = "EXPERTMESH_TEXT")]
    text: PathBuf,
    /// Positions per window, BOS included.
    #[arg(long, default_value_t = 512, env = "EXPERTMESH_CONTEXT")]
    context: usize,
    /// Tokens between window starts (default: half the context, so every
    /// scored token after the first window sees at least that many before it).
    #[arg(long, env = "EXPERTMESH_STRIDE")]
    stride: Option<usize>,
    /// Score only the first N tokens of the text.
    #[arg(long, env = "EXPERTMESH_MAX_EVAL_TOKENS")]
    max_tokens: Option<usize>,
    /// Print one JSON line.
    #[arg(long, env = "EXPERTMESH_JSON")]
    json: bool,
    /// Precision and quantization of the weights (offline).
    #[command(flatten)]
    weights: WeightArgs,
}

pub fn cmd_eval(a: EvalCmd) -> Result<()> {
    if a.context < 2 {
        bail!("--context must be at least 2, got {}", a.context);
    }
    let stride = a.stride.unwrap_or(a.context / 2);
    let text = std::fs::read_to_string(&a.text).with_context(|| format!("--text: reading {}", a.text.display()))?;
    let tok = TextTokenizer::from_dir(&a.model).context("--model: eval needs the checkpoint's tokenizer.json")?;
    let mut ids = tok.encode(&text)?;
    if let Some(n) = a.max_tokens {
        ids.truncate(n);
    }
    let quiet = a.json;
    let mut progress = |done: usize, total: usize| {
        if !quiet {
            eprint!("\rwindow {done}/{total}");
        }
    };
    let t0 = Instant::now();
    let p = match &a.url {
        None => {
            let model = crate::cli::load_model(&a.model, &a.weights, a.json)?;
            let t1 = Instant::now();
            let p = perplexity_offline(&model, &ids, a.context, stride, &mut progress).context("--stride/--context")?;
            (p, t1.elapsed().as_secs_f64())
        }
        Some(url) => {
            let cfg = ModelConfig::from_dir(&a.model).context("--model")?;
            let p = remote(&a, url, &cfg, &ids, stride, &mut progress)?;
            (p, t0.elapsed().as_secs_f64())
        }
    };
    report(&a, stride, p.0, p.1);
    Ok(())
}

fn report(a: &EvalCmd, stride: usize, p: Perplexity, eval_s: f64) {
    if a.json {
        let v = json!({"perplexity": p.perplexity, "tokens": p.tokens, "nll": p.nll, "windows": p.windows,
            "context": a.context, "stride": stride, "eval_s": eval_s});
        println!("{v}");
    } else {
        eprintln!();
        println!(
            "perplexity {:.4} over {} tokens ({} windows of {} with stride {stride}; {:.0} tok/s)",
            p.perplexity,
            p.tokens,
            p.windows,
            a.context,
            p.tokens as f64 / eval_s
        );
    }
}

/// Every window scored by the router: its prompt logprobs, nothing generated.
fn remote(
    a: &EvalCmd,
    url: &str,
    cfg: &ModelConfig,
    ids: &[u32],
    stride: usize,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Perplexity> {
    let rt = crate::cli::runtime()?;
    let http = crate::remote::http_client(a.tls_ca.as_deref())?;
    let endpoint = format!("{}/v1/completions", url.trim_end_matches('/'));
    let score = |input: &[u32]| -> expertmesh_model::Result<Vec<f64>> {
        let body = json!({"prompt": input, "max_tokens": 0, "echo": true, "logprobs": 0});
        // A deadline far above any window's scoring time, so a hung router
        // fails the run instead of stalling it.
        let mut req = http.post(&endpoint).json(&body).timeout(std::time::Duration::from_secs(600));
        if let Some(k) = &a.api_key {
            req = req.bearer_auth(k);
        }
        let remote_err = |e: String| ModelError::Executor(format!("--url {url}: {e}"));
        let v: Value = rt.block_on(async {
            let resp = req.send().await.map_err(|e| remote_err(e.to_string()))?;
            let status = resp.status();
            let text = resp.text().await.map_err(|e| remote_err(e.to_string()))?;
            if !status.is_success() {
                return Err(remote_err(format!("{status}: {text}")));
            }
            serde_json::from_str(&text).map_err(|e| remote_err(format!("the answer is not JSON: {e}")))
        })?;
        let lps = v["choices"][0]["logprobs"]["token_logprobs"]
            .as_array()
            .ok_or_else(|| remote_err("the answer has no choices[0].logprobs.token_logprobs".into()))?;
        // The first prompt token has no log-probability (null).
        lps.iter()
            .skip(1)
            .map(|x| x.as_f64().ok_or_else(|| remote_err(format!("logprob {x} is not a number"))))
            .collect()
    };
    perplexity(ids, cfg.bos_token_id, a.context, stride, score, progress).context("--url/--stride/--context")
}
