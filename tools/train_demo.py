#!/usr/bin/env python3
"""Trains the demo model: a small DeepSeek-V3-architecture checkpoint (MLA,
one dense layer then MoE layers with a shared expert and group-limited
`noaux_tc` routing, plus one multi-token-prediction module trained jointly
as DeepSeek-V3 does) on English text every Debian machine of this project
has: the Vim documentation, the licence texts under
/usr/share/common-licenses and the READMEs under /usr/share/doc.

Dev-only, like tools/make_fixtures.py (needs torch, transformers,
tokenizers, safetensors; CI does not run it). Seeded; on 2 threads:

    target/llama-venv/bin/python tools/train_demo.py --out model/demo --minutes 25

It writes, in Hugging Face layout and bf16: config.json, model.safetensors
(DeepSeek's tensor names, including the MTP module as layer
`num_hidden_layers`: enorm, hnorm, eh_proj, its decoder layer, shared_head
and its own copy of embed_tokens), tokenizer.json (byte-level BPE),
tokenizer_config.json (the R1-style chat template), generation_config.json,
heldout.txt (text of files never trained on, for `expertmesh eval`) and
train_log.json (the command, the time and the losses).
"""
import argparse
import gzip
import hashlib
import json
import math
import os
import random
import re
import sys
import time

import torch
import torch.nn as nn
import transformers
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers.masking_utils import create_causal_mask

BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
USER, ASSISTANT = "<｜User｜>", "<｜Assistant｜>"
SPECIALS = [BOS, EOS, USER, ASSISTANT, "<think>", "</think>"]
# The same R1-style template as `expertmesh gen-model` writes.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] }}"
    "{% elif m['role'] == 'user' %}<｜User｜>{{ m['content'] }}{% elif m['role'] == 'assistant' %}"
    "<｜Assistant｜>{{ m['content'] }}<｜end▁of▁sentence｜>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<｜Assistant｜><think>\n{% endif %}"
)


def read_text(path):
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8", errors="strict") as f:
            return f.read()
    except (UnicodeDecodeError, OSError, EOFError):
        return None


def corpus_files():
    files = []
    vim = "/usr/share/vim"
    for root, _, names in os.walk(vim):
        if root.endswith("/doc"):
            files += [os.path.join(root, n) for n in names if n.endswith(".txt")]
    lic = "/usr/share/common-licenses"
    files += [os.path.join(lic, n) for n in os.listdir(lic) if os.path.isfile(os.path.join(lic, n))]
    for root, _, names in os.walk("/usr/share/doc"):
        files += [os.path.join(root, n) for n in names if re.match(r"README(\.md|\.txt)?(\.gz)?$", n)]
    return sorted(set(files))


def held_out(path):
    """About 3% of the files, chosen by name, are never trained on."""
    return hashlib.sha256(path.encode()).digest()[0] < 8


def clean(text):
    # Vim help's modelines and form feeds are layout, not language.
    text = re.sub(r"^ vim:.*$", "", text, flags=re.M).replace("\f", "")
    return re.sub(r"\n{3,}", "\n\n", text)


def chat_pairs(text):
    """Questions and answers from Vim help: a `*tag*` heading asks about
    the tag, the paragraph under it answers. R1's format, empty reasoning."""
    pairs = []
    for para in text.split("\n\n"):
        lines = para.strip("\n").split("\n")
        if len(lines) < 2:
            continue
        tags = re.findall(r"\*([^*\s]+)\*", lines[0])
        body = " ".join(l.strip() for l in lines[1:] if l.strip())
        body = re.sub(r"\s+", " ", body)
        if not tags or len(body) < 80 or "|" in body[:3]:
            continue
        answer = body[:600].rsplit(". ", 1)[0] + "." if len(body) > 600 else body
        q = random.choice(["What is {}?", "Tell me about {}.", "Explain {}.", "How does {} work?", "What does {} do?"])
        pairs.append((q.format(tags[0]), answer))
    return pairs


def train_tokenizer(texts, vocab):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab, min_frequency=2, special_tokens=SPECIALS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer)
    return tok


def model_config(vocab):
    return transformers.DeepseekV3Config(
        vocab_size=vocab, hidden_size=256, intermediate_size=512, moe_intermediate_size=128,
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1,
        n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2, first_k_dense_replace=1,
        routed_scaling_factor=2.5, norm_topk_prob=True, q_lora_rank=128, kv_lora_rank=64,
        qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, max_position_embeddings=4096,
        rope_theta=10000.0, rope_interleave=True, rms_norm_eps=1e-6, tie_word_embeddings=False,
        bos_token_id=0, eos_token_id=1, initializer_range=0.02, attn_implementation="sdpa",
    )


class Mtp(nn.Module):
    """DeepSeek-V3's MTP module: from the main model's final hidden state at
    position i and the embedding of token i+1 it predicts token i+2, through
    one more decoder layer and the shared output head."""

    def __init__(self, cfg):
        super().__init__()
        self.enorm = transformers.models.deepseek_v3.modeling_deepseek_v3.DeepseekV3RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.hnorm = transformers.models.deepseek_v3.modeling_deepseek_v3.DeepseekV3RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * cfg.hidden_size, cfg.hidden_size, bias=False)
        self.layer = transformers.models.deepseek_v3.modeling_deepseek_v3.DeepseekV3DecoderLayer(cfg, cfg.num_hidden_layers)
        self.norm = transformers.models.deepseek_v3.modeling_deepseek_v3.DeepseekV3RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, main, hidden, next_ids):
        emb = main.model.embed_tokens(next_ids)
        x = self.eh_proj(torch.cat([self.enorm(emb), self.hnorm(hidden)], dim=-1))
        # Positions of the tokens i+1, as at inference.
        pos = torch.arange(1, x.shape[1] + 1).unsqueeze(0)
        mask = create_causal_mask(config=main.config, inputs_embeds=x, attention_mask=None, cache=None, position_ids=pos)
        pe = main.model.rotary_emb(x, pos)
        x = self.layer(x, attention_mask=mask, position_ids=pos, position_embeddings=pe)
        return main.lm_head(self.norm(x))


def routers(module):
    return [m for m in module.modules() if type(m).__name__ == "DeepseekV3TopkRouter"]


def batches(streams, seq, batch, rng):
    """Random windows of the token streams (text and chat), each from BOS."""
    text, chat = streams
    while True:
        rows = []
        for _ in range(batch):
            src = chat if rng.random() < 0.3 else text
            start = rng.randrange(0, len(src) - seq)
            rows.append([0] + src[start:start + seq - 1])
        yield torch.tensor(rows)


def deepseek_state(main, mtp, cfg):
    """The trained weights under DeepSeek-V3's checkpoint names, in bf16."""
    out = {}
    n = cfg.num_hidden_layers
    I = cfg.moe_intermediate_size

    def put(name, t):
        t = t.detach()
        # The routing bias stays f32, as transformers keeps it.
        out[name] = t.float().contiguous() if name.endswith("e_score_correction_bias") else t.to(torch.bfloat16).contiguous()

    def put_layer(prefix, sd):
        for k, v in sd.items():
            if k.endswith("experts.gate_up_proj"):
                base = prefix + k[: -len("gate_up_proj")]
                for e in range(v.shape[0]):
                    put(f"{base}{e}.gate_proj.weight", v[e, :I])
                    put(f"{base}{e}.up_proj.weight", v[e, I:])
            elif k.endswith("experts.down_proj"):
                base = prefix + k[: -len("down_proj")]
                for e in range(v.shape[0]):
                    put(f"{base}{e}.down_proj.weight", v[e])
            else:
                put(prefix + k, v)

    sd = main.state_dict()
    for k in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        put(k, sd[k])
    for i, layer in enumerate(main.model.layers):
        put_layer(f"model.layers.{i}.", layer.state_dict())
    p = f"model.layers.{n}."
    put_layer(p, mtp.layer.state_dict())
    for k in ("enorm", "hnorm", "eh_proj"):
        put(f"{p}{k}.weight", getattr(mtp, k).weight)
    put(f"{p}shared_head.norm.weight", mtp.norm.weight)
    # DeepSeek's checkpoints carry the module's own copies of the shared tensors.
    put(f"{p}shared_head.head.weight", main.lm_head.weight)
    put(f"{p}embed_tokens.weight", main.model.embed_tokens.weight)
    return out


def write_checkpoint(out, main, mtp, cfg, tok, heldout_text, log):
    os.makedirs(out, exist_ok=True)
    save_file(deepseek_state(main, mtp, cfg), os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    c = cfg.to_dict()
    c.update({"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "torch_dtype": "bfloat16",
              "num_nextn_predict_layers": 1, "topk_method": "noaux_tc", "scoring_func": "sigmoid",
              "moe_layer_freq": 1})
    for k in ("dtype", "transformers_version", "attn_implementation", "_attn_implementation_autoset"):
        c.pop(k, None)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(c, f, indent=2, sort_keys=True)
    with open(os.path.join(out, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": 0, "eos_token_id": 1, "do_sample": False}, f, indent=2)
    with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": BOS, "eos_token": EOS, "add_bos_token": False, "chat_template": CHAT_TEMPLATE,
                   "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 4096}, f, indent=2)
    tok.save(os.path.join(out, "tokenizer.json"))
    with open(os.path.join(out, "heldout.txt"), "w") as f:
        f.write(heldout_text)
    with open(os.path.join(out, "train_log.json"), "w") as f:
        json.dump(log, f, indent=1)


def lr_at(step, steps, peak, warmup=100):
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup))))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--minutes", type=float, default=25.0, help="training time budget (the step count is fixed from it)")
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--mtp-weight", type=float, default=0.3, help="DeepSeek-V3's lambda for the MTP loss")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--heldout-bytes", type=int, default=60000)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    rng = random.Random(args.seed)
    t0 = time.time()

    train, held = [], []
    for p in corpus_files():
        t = read_text(p)
        if t and len(t) > 200:
            (held if held_out(p) else train).append((p, clean(t)))
    print(f"{len(train)} training files ({sum(len(t) for _, t in train) / 1e6:.1f} MB), {len(held)} held out", flush=True)
    pairs = [pq for p, t in train if "/vim/" in p for pq in chat_pairs(t)]
    chats = [f"{USER}{q}{ASSISTANT}<think>\n\n</think>\n\n{a}{EOS}" for q, a in pairs]
    tok = train_tokenizer([t for _, t in train] + chats, args.vocab)
    vocab = tok.get_vocab_size()
    text_ids = [i for _, t in train for i in tok.encode(t).ids + [1]]
    chat_ids = [i for c in chats for i in [0] + tok.encode(c).ids]
    heldout_text = "\n\n".join(t for p, t in held if "/vim/" in p or "common-licenses" in p)[: args.heldout_bytes]
    print(f"vocab {vocab}, {len(text_ids)} text tokens, {len(pairs)} chat pairs ({len(chat_ids)} tokens)", flush=True)

    cfg = model_config(vocab)
    main_model = transformers.DeepseekV3ForCausalLM(cfg)
    mtp = Mtp(cfg)
    mtp.layer.apply(main_model._init_weights)
    params = list(main_model.parameters()) + list(mtp.parameters())
    n_params = sum(p.numel() for p in main_model.parameters())
    print(f"{n_params / 1e6:.2f} M parameters in the main model, {sum(p.numel() for p in mtp.parameters()) / 1e6:.2f} M in MTP", flush=True)
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)

    # Auxiliary-loss-free balancing (DeepSeek-V3 section 2.1.2): each step
    # nudges an expert's routing bias down if it was over-loaded, up if under.
    loads = {}
    gates = routers(main_model) + routers(mtp)
    for g in gates:
        g.register_forward_hook(lambda m, _i, out: loads.__setitem__(m, torch.bincount(out[2].flatten(), minlength=cfg.n_routed_experts)))

    data = batches((text_ids, chat_ids), args.seq, args.batch, rng)
    budget = args.minutes * 60
    log = {"command": " ".join(sys.argv), "args": vars(args), "transformers": transformers.__version__,
           "torch": torch.__version__, "params_main": n_params, "steps": []}
    step, steps_est = 0, None
    train_start = time.time()
    while True:
        x = next(data)
        main_model.train()
        outh = main_model.model(input_ids=x)
        h = outh.last_hidden_state
        logits = main_model.lm_head(h)
        ce = nn.functional.cross_entropy
        loss_main = ce(logits[:, :-1].reshape(-1, vocab), x[:, 1:].reshape(-1))
        mtp_logits = mtp(main_model, h[:, :-2], x[:, 1:-1])
        loss_mtp = ce(mtp_logits.reshape(-1, vocab), x[:, 2:].reshape(-1))
        loss = loss_main + args.mtp_weight * loss_mtp
        if steps_est is None and step == 5:
            per = (time.time() - train_start) / 5
            steps_est = int(budget / per)
            print(f"{per:.2f} s/step: {steps_est} steps", flush=True)
        total = steps_est or 10_000
        for g in opt.param_groups:
            g["lr"] = lr_at(step, total, args.lr)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            for g, l in loads.items():
                g.e_score_correction_bias += 1e-3 * torch.sign(l.float().mean() - l.float())
        if step % 50 == 0:
            rec = {"step": step, "loss": round(loss_main.item(), 4), "mtp_loss": round(loss_mtp.item(), 4),
                   "s": round(time.time() - t0, 1)}
            log["steps"].append(rec)
            print(rec, flush=True)
        step += 1
        if steps_est is not None and step >= steps_est:
            break
    log["train_seconds"] = round(time.time() - train_start, 1)
    log["total_seconds"] = round(time.time() - t0, 1)
    log["tokens_seen"] = step * args.batch * args.seq
    with torch.no_grad():
        # What is served is bf16: evaluate exactly that.
        for p in params:
            p.copy_(p.bfloat16().float())
    log["heldout"] = evaluate(main_model, mtp, tok.encode(heldout_text).ids, args.seq)
    print(log["heldout"], flush=True)
    write_checkpoint(args.out, main_model, mtp, cfg, tok, heldout_text, log)
    log["reload_max_abs_dlogit"] = reload_check(args.out, main_model)
    with open(os.path.join(args.out, "train_log.json"), "w") as f:
        json.dump(log, f, indent=1)
    print(f"wrote {args.out} after {log['total_seconds']} s; reloaded, max |dlogit| {log['reload_max_abs_dlogit']:.2e}", flush=True)


@torch.no_grad()
def evaluate(main, mtp, ids, seq):
    """Held-out perplexity of the main model (disjoint windows from BOS), and
    how often the MTP module's top-1 guess for token i+2 is the main model's
    own greedy choice there (what speculative decoding would accept)."""
    main.eval()
    nll, n, hits, tries = 0.0, 0, 0, 0
    for s in range(0, len(ids) - seq, seq):
        x = torch.tensor([[0] + ids[s:s + seq - 1]])
        h = main.model(input_ids=x).last_hidden_state
        logits = main.lm_head(h)
        nll += nn.functional.cross_entropy(logits[0, :-1], x[0, 1:], reduction="sum").item()
        n += x.shape[1] - 1
        guess = mtp(main, h[:, :-2], x[:, 1:-1]).argmax(-1)[0]
        greedy = logits[0, 1:-1].argmax(-1)
        hits += int((guess == greedy).sum())
        tries += guess.numel()
    return {"tokens": n, "perplexity": round(math.exp(nll / n), 3), "mtp_top1_vs_greedy": round(hits / tries, 4)}


@torch.no_grad()
def reload_check(out, main):
    """transformers, loading the written files, gives the trained logits."""
    again = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    again.eval()
    main.eval()
    x = torch.arange(2, 66).unsqueeze(0)
    return float((again(x).logits - main(x).logits).abs().max())


if __name__ == "__main__":
    main()
