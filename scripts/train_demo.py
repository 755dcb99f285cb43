#!/usr/bin/env python3
"""Train xllama's built-in demo model from scratch on Grimms' Fairy Tales.

Everything is fixed (corpus, split, tokenizer, architecture, seed), so the same command rebuilds
the same model:

    python scripts/train_demo.py --corpus ../shared/corpus/grimm_pg2591.txt --out src/xllama_cli/demo

The held-out split (every 20th tale) is never seen by the tokenizer or the training loop.
Output: model.safetensors (bf16), config.json, tokenizer.model, TRAINING.md, heldout.txt.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import shutil
import tempfile
import time
from pathlib import Path

import torch
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from xllama_cli.config import ModelConfig
from xllama_cli.model import Transformer
from xllama_cli.tokenizer import Tokenizer
from xllama_cli.evaluate import evaluate_text
from xllama_cli.train import TrainConfig, encode_text, init_weights, train

ARCHITECTURE = "demo"  # config.ARCHITECTURES
HELD_OUT_EVERY = 20


def grimm_tales(raw: str) -> list[str]:
    """The tales of Project Gutenberg #2591, Gutenberg header, contents and licence removed."""
    body = raw.split("*** START OF THIS PROJECT GUTENBERG EBOOK")[1].split("End of Project Gutenberg")[0]
    lines = body.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == "THE GOLDEN BIRD" and not line.startswith(" "))
    tales, title, buf = [], None, []
    for line in lines[start:]:
        s = line.strip()
        if s and s == s.upper() and re.search("[A-Z]", s) and not line.startswith(" ") and len(s) < 80:
            if buf and title:
                tales.append("\n".join(buf).strip())
            title, buf = s, []
        else:
            buf.append(line)
    if buf:
        tales.append("\n".join(buf).strip())
    return [t for t in tales if len(t) > 200]


def split(tales: list[str]) -> tuple[str, str]:
    train = [t for i, t in enumerate(tales) if i % HELD_OUT_EVERY != HELD_OUT_EVERY - 1]
    held = [t for i, t in enumerate(tales) if i % HELD_OUT_EVERY == HELD_OUT_EVERY - 1]
    return "\n\n".join(train), "\n\n".join(held)


def train_tokenizer(text: str, vocab: int, prefix: Path) -> Path:
    import sentencepiece as spm

    corpus = prefix.with_suffix(".txt")
    corpus.write_text("\n".join(" ".join(p.split()) for p in text.split("\n\n") if p.strip()))
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(prefix), vocab_size=vocab, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        num_threads=1, split_digits=True, max_sentence_length=100000, minloglevel=2,
    )
    return prefix.with_suffix(".model")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", type=Path, default=Path("../shared/corpus/grimm_pg2591.txt"))
    ap.add_argument("--out", type=Path, default=Path("src/xllama_cli/demo"))
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--force", action="store_true", help="replace --out if it exists")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.out.exists() and not args.force:
        raise SystemExit(f"error: {args.out} exists; pass --force to replace it")

    train_text, held_text = split(grimm_tales(args.corpus.read_text(encoding="utf-8-sig")))
    work = Path(tempfile.mkdtemp(prefix=".demo-", dir=args.out.parent))
    cfg = ModelConfig.from_name(ARCHITECTURE)
    tok_path = train_tokenizer(train_text, cfg.vocab_size, work / "tokenizer")
    tok = Tokenizer(tok_path)
    train_ids, held_ids = encode_text(tok, train_text), encode_text(tok, held_text)
    torch.manual_seed(args.seed)
    model = Transformer(cfg)
    init_weights(model, args.seed)
    n_params = sum(p.numel() for p in model.parameters())
    tcfg = TrainConfig(steps=args.steps, lr=args.lr, batch=args.batch, context=cfg.max_seq_len,
                       seed=args.seed, warmup=max(1, args.steps // 30), min_lr_ratio=0.05)
    print(f"params {n_params/1e6:.2f}M | train tokens {len(train_ids)} | held-out tokens {len(held_ids)}")

    t0 = time.time()
    with Progress(TextColumn("training"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TextColumn("{task.fields[info]}"), TimeRemainingColumn()) as bar:
        task = bar.add_task("train", total=tcfg.steps, info="")
        def on_step(s):
            bar.update(task, completed=s.step, info=f"loss {s.loss:.3f} lr {s.lr:.2e} {s.tokens_per_s:,.0f} tok/s")
        losses = train(model, train_ids, tcfg, on_step=on_step)
    minutes = (time.time() - t0) / 60
    model = model.to(torch.bfloat16)
    train_loss = sum(losses[-50:]) / len(losses[-50:])
    (work / "heldout.txt").write_text(held_text + "\n")
    # scored as `xllama eval --text heldout.txt` scores it: the same numbers a user can check
    held = evaluate_text(model.float(), tok, work / "heldout.txt", progress=False)
    held_loss = held.nll
    print(f"train loss (last 50 steps) {train_loss:.3f} | held-out loss {held_loss:.3f} "
          f"(perplexity {held.perplexity:.2f}) | {minutes:.1f} min")

    from safetensors.torch import save_file
    state = {k: v.to(torch.bfloat16).contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(state, work / "model.safetensors", metadata={"format": "pt"})
    hf = cfg.to_hf()
    hf["torch_dtype"] = "bfloat16"
    (work / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    for f in ("tokenizer.txt", "tokenizer.vocab"):
        (work / f).unlink()
    corpus_sha = sha256(args.corpus)
    (work / "TRAINING.md").write_text(f"""# The xllama demo model

Trained from scratch by `scripts/train_demo.py` with xllama's own model and training loop.

    python scripts/train_demo.py --corpus {args.corpus} --steps {args.steps} --batch {args.batch} --lr {args.lr} --seed {args.seed}

- Corpus: Grimms' Fairy Tales (Project Gutenberg #2591, public domain), `{args.corpus.name}`,
  sha256 `{corpus_sha}`; Gutenberg header, contents and licence removed, split into tales.
- Split: every {HELD_OUT_EVERY}th tale is held out (`heldout.txt`, {len(held_ids)} tokens); the
  tokenizer and the training loop saw only the rest ({len(train_ids)} tokens).
- Tokenizer: SentencePiece BPE, {cfg.vocab_size} pieces, byte fallback, trained on the training split.
- Architecture: Llama, dim {cfg.dim}, {cfg.n_layers} layers, {cfg.n_heads} query heads and
  {cfg.n_kv_heads} KV heads (multi-head, so GQA-4, GQA-2 and MQA all apply), FFN {cfg.hidden_dim},
  context {cfg.max_seq_len}, tied embeddings; {n_params/1e6:.2f}M parameters, stored in bfloat16.
- Training: {tcfg.steps} steps of {tcfg.batch} x {tcfg.context} tokens, AdamW (lr {tcfg.lr},
  warm-up {tcfg.warmup_steps} steps, cosine to {tcfg.lr * tcfg.min_lr_ratio:.1e}, weight decay
  {tcfg.weight_decay}, clip {tcfg.clip}), float32 on the CPU, seed {tcfg.seed}; {minutes:.0f} minutes.
- Final training loss (mean of the last 50 steps): {train_loss:.3f}.
- Held-out loss: {held_loss:.3f} (perplexity {held.perplexity:.2f}, as `xllama eval --text heldout.txt`
  scores it: {held.context}-token windows, stride {held.stride}, weights in bfloat16).
""")
    if args.out.exists():
        shutil.rmtree(args.out)
    work.rename(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
