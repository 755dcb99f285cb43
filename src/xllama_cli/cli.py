"""The `xllama` command line: one small function per subcommand; the work lives in the library."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from typer.core import TyperGroup

from . import report
from .errors import SettingError, XllamaError, read_utf8, require_utf8

# the library's settings, as this command line calls them (errors.SettingError)
FLAGS = {"attn": "--attn", "groups": "--groups", "method": "--method", "rope": "--rope",
         "rope_factor": "--rope-factor", "quantize": "--quantize", "dtype": "--dtype", "device": "--device",
         "compile": "--compile"}


class _Group(TyperGroup):
    """Turns an XllamaError anywhere below into one `error:` line and exit code 2, the settings it
    names worded as this command line's flags."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except XllamaError as e:
            report.error(e.worded(FLAGS) if isinstance(e, SettingError) else str(e))
            raise typer.Exit(2) from None


app = typer.Typer(
    cls=_Group,
    name="xllama",
    help="Run, convert and measure Llama-family checkpoints (HF or Meta layout) on CPU or CUDA.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

@app.callback()
def _root() -> None:
    """Run, convert and measure Llama-family checkpoints (HF or Meta layout) on CPU or CUDA."""


# ---- options shared by the commands that load a model ----
ModelOpt = typer.Option(None, "--model", "-m", help="Checkpoint folder: Hugging Face (config.json + safetensors/.bin) or Meta (params.json + consolidated.NN.pth); or a Hugging Face repo id (owner/name) fetched with `xllama download`, found in the local cache without the network. Default: the built-in demo model.")
AttnOpt = typer.Option(None, "--attn", help="K/V layout: MHA (one KV head per query head), GQA (--groups KV heads), MQA (one KV head). Default: the checkpoint's own. Fewer heads are mean-pooled per group; more are repeated.")
GroupsOpt = typer.Option(None, "--groups", "-g", help="Number of KV heads (groups) for --attn GQA; must divide the query heads. Default 8 (or n_heads if smaller).")
RopeOpt = typer.Option(None, "--rope", help="Rotary embedding: rotary (plain), linear (positions / factor), dynamic (NTK-aware past the trained length), llama3. Default: the checkpoint's rope_scaling.")
RopeFactorOpt = typer.Option(None, "--rope-factor", help="Scaling factor for --rope linear|dynamic|llama3.")
DeviceOpt = typer.Option("auto", "--device", help="auto (CUDA when present), cpu or cuda[:N].")
DtypeOpt = typer.Option("auto", "--dtype", help="auto (bfloat16 on CUDA or with --quantize, float32 on CPU), float32, bfloat16 or float16.")
QuantizeOpt = typer.Option(None, "--quantize", help="int8: weight-only int8 projections and output head, a scale per output channel, quantized at load time (half the bytes of bfloat16 to read per token); computes in bfloat16 (or --dtype float16).")
CompileOpt = typer.Option(False, "--compile", help="torch.compile the decode step (CUDA graphs on CUDA). Compiling takes tens of seconds (printed as 'compile' in the summary) and pays back over long generations.")

TemperatureOpt = typer.Option(0.8, "--temperature", "-t", help="Sampling temperature; 0 means greedy (always the most likely token).")
TopKOpt = typer.Option(None, "--top-k", help="Sample only among the k most likely tokens.")
TopPOpt = typer.Option(0.95, "--top-p", help="Sample only among the most likely tokens whose probabilities add up to p (nucleus); 1 disables.")
SeedOpt = typer.Option(None, "--seed", help="Random seed: the same seed gives the same text.")


DEMO_MODEL = Path(__file__).parent / "demo"


def _model_path(model: Optional[str]) -> str:
    """--model as given (a repo id: its folder in the local Hugging Face cache), or the built-in
    demo model when none is given (said once on stderr)."""
    if model is not None:
        from .download import resolve_model

        folder = resolve_model(model)
        return model if folder == Path(model).expanduser() else str(folder)
    if not (DEMO_MODEL / "config.json").is_file():
        raise XllamaError("no --model given and the built-in demo model is not installed; pass --model PATH")
    report.info(f"no --model given: using the built-in demo model ({DEMO_MODEL})")
    return str(DEMO_MODEL)


@app.command()
def generate(
    prompts: Optional[list[str]] = typer.Argument(None, help="One or more prompts; several are generated together as one batch."),
    model: Optional[str] = ModelOpt,
    batch_file: Optional[Path] = typer.Option(None, "--batch-file", help="A text file of prompts, one a line, added to the batch."),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens", "-n", help="Most new tokens per prompt (generation also stops at EOS and at the context's end)."),
    temperature: float = TemperatureOpt,
    top_k: Optional[int] = TopKOpt,
    top_p: Optional[float] = TopPOpt,
    seed: Optional[int] = SeedOpt,
    attn: Optional[str] = AttnOpt,
    groups: Optional[int] = GroupsOpt,
    rope: Optional[str] = RopeOpt,
    rope_factor: Optional[float] = RopeFactorOpt,
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    quantize: Optional[str] = QuantizeOpt,
    compile: bool = CompileOpt,
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No summary line on stderr."),
) -> None:
    """Generate text from one or more prompts; the text streams to stdout as it is made."""
    from .checkpoint import open_checkpoint
    from .generation import check_prompts, continuation_text, generate_tokens
    from .loading import load, target_config
    from .sampling import Sampling
    from .tokenizer import load_tokenizer

    sampling = Sampling(temperature, top_k, top_p, seed)
    texts = [require_utf8(t, "the prompt") for t in prompts or []]
    if batch_file is not None:
        texts += [line for line in read_utf8(batch_file, "--batch-file").splitlines() if line.strip()]
    if not texts:
        raise XllamaError("no prompt given; pass it as an argument or with --batch-file")
    path = _model_path(model)
    tokenizer = load_tokenizer(path)
    ids = [tokenizer.encode(t) for t in texts]
    # every check before the model loads and before anything reaches stdout
    check_prompts(target_config(open_checkpoint(path), attn, groups, rope, rope_factor), ids, max_new_tokens)
    m = load(path, attn=attn, groups=groups, rope=rope, rope_factor=rope_factor, device=device, dtype=dtype,
             quantize=quantize, compile=compile, decode_batch=len(texts))
    if len(texts) == 1:  # one prompt: stream it token by token
        stream = tokenizer.stream()
        report.write(texts[0])
        result = generate_tokens(m.model, ids, max_new_tokens, sampling, tokenizer.eos_ids,
                                 on_token=lambda _row, tok: report.write(stream.push(tok)), step=m.step, tp=m.tp)
        report.write(stream.flush() + "\n")
    else:  # a batch: each text when all are done, in order
        result = generate_tokens(m.model, ids, max_new_tokens, sampling, tokenizer.eos_ids, step=m.step, tp=m.tp)
        for i, (text, new) in enumerate(zip(texts, result.tokens)):
            report.write(("\n" if i else "") + text + continuation_text(tokenizer, new) + "\n")
    if not quiet:
        report.info(result.stats.summary())


ContextOpt = typer.Option(None, "--context", help="Tokens per window, BOS included. Default: the model's context.")
StrideOpt = typer.Option(None, "--stride", help="Text tokens a window moves on by; every token is scored once, with at least context-1-stride tokens before it after the first window. Default: context // 2.")


@app.command()
def convert(
    src: Optional[str] = typer.Argument(None, help="Source checkpoint folder (HF or Meta, sharded or not) or a downloaded repo id. Default: the built-in demo model."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Destination folder for the HF checkpoint; must not exist (or --force)."),
    attn: Optional[str] = AttnOpt,
    groups: Optional[int] = GroupsOpt,
    method: str = typer.Option("mean", "--method", help="How a group of K/V heads becomes one: mean (the GQA paper), first (its first head) or random (new weights at the source's scale)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed for --method random (recorded in xllama_convert.json)."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="Store weights as float32, bfloat16 or float16. Default: the source's dtype (pooling is done in float32 either way)."),
    shard_size: str = typer.Option("5GB", "--shard-size", help="Largest safetensors shard, e.g. 5GB, 500MB, 2GiB."),
    force: bool = typer.Option(False, "--force", help="Replace --out if it exists (only once the new folder is complete)."),
    eval_text: Optional[Path] = typer.Option(None, "--eval", help="Also print the perplexity of source and result on this text file (as `xllama eval` computes it)."),
    context: Optional[int] = typer.Option(None, "--context", help="With --eval: tokens per window, BOS included. Default: the model's context."),
    stride: Optional[int] = typer.Option(None, "--stride", help="With --eval: text tokens a window moves on by. Default: context // 2."),
    device: str = typer.Option("auto", "--device", help="With --eval: auto (CUDA when present), cpu or cuda[:N]."),
) -> None:
    """Write a checkpoint as an HF folder: MHA -> GQA/MQA (mean-pooled K/V heads), Meta -> HF, re-sharding, --dtype."""
    from .convert import convert_checkpoint

    if out is None:
        raise XllamaError("no --out given; pass the destination folder with --out PATH")
    src = _model_path(src)
    if eval_text is not None:  # a bad text file or window fails before the conversion, not after it
        from .checkpoint import open_checkpoint
        from .evaluate import read_text, window_settings
        from .generation import context_length

        read_text(eval_text)
        window_settings(context_length(open_checkpoint(src).config), context, stride)
    result = convert_checkpoint(src, out, attn=attn, groups=groups, method=method, seed=seed, dtype=dtype,
                                shard_size=shard_size, force=force)
    how = f"{result.method}-pooled" if result.method else "kept" if result.kv_heads_after == result.kv_heads_before else "repeated"
    report.info(f"wrote {result.out}: {len(result.shards)} shard(s), KV heads {result.kv_heads_before} -> "
                f"{result.kv_heads_after} ({how})")
    if eval_text is not None:
        from .evaluate import evaluate_text
        from .loading import load_model
        from .tokenizer import load_tokenizer

        tokenizer = load_tokenizer(src)
        rows = []
        for label, path in (("source", src), ("result", result.out)):
            m = load_model(path, device=device, decode_batch=None)  # perplexity: no decoding
            rows.append((label, Path(path).name, m.config.n_kv_heads,
                         evaluate_text(m, tokenizer, eval_text, context, stride, label=f"perplexity of {label}")))
            del m
        report.perplexity_table(rows)


@app.command("eval")
def eval_(
    model: Optional[str] = ModelOpt,
    text: Optional[Path] = typer.Option(None, "--text", help="UTF-8 text file to score."),
    context: Optional[int] = ContextOpt,
    stride: Optional[int] = StrideOpt,
    as_json: bool = typer.Option(False, "--json", help="Print the result as one JSON object on stdout."),
    attn: Optional[str] = AttnOpt,
    groups: Optional[int] = GroupsOpt,
    rope: Optional[str] = RopeOpt,
    rope_factor: Optional[float] = RopeFactorOpt,
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    quantize: Optional[str] = QuantizeOpt,
) -> None:
    """Perplexity of a model on a text file (sliding windows that each start with BOS; every token scored once)."""
    from .checkpoint import open_checkpoint
    from .evaluate import evaluate_text, read_text, window_settings
    from .generation import context_length
    from .loading import load_model, target_config
    from .tokenizer import load_tokenizer

    if text is None:
        raise XllamaError("no --text given; pass the text file to score with --text FILE")
    read_text(text)  # a bad file fails before the model loads
    path = _model_path(model)
    window_settings(context_length(target_config(open_checkpoint(path), attn, groups, rope, rope_factor)),
                    context, stride)
    tokenizer = load_tokenizer(path)
    m = load_model(path, attn=attn, groups=groups, rope=rope, rope_factor=rope_factor, device=device, dtype=dtype,
                   quantize=quantize, decode_batch=None)  # perplexity: no decoding
    result = evaluate_text(m, tokenizer, text, context, stride)
    if as_json:
        report.write_json({"model": path, "text": str(text), "kv_heads": m.config.n_kv_heads, **result.as_dict()})
    else:
        report.perplexity_summary(result)


@app.command()
def bench(
    model: Optional[str] = ModelOpt,
    preset: Optional[str] = typer.Option(None, "--preset", "-p", help="An architecture with random weights (no download): small, tinyllama-1.1b, llama2-7b, llama2-13b, llama2-70b, llama3-8b. See --list-presets."),
    config: Optional[Path] = typer.Option(None, "--config", help="A JSON architecture with random weights: a Hugging Face config.json, or ModelConfig fields (over --preset's when both are given)."),
    layers: Optional[int] = typer.Option(None, "--layers", help="Override the number of layers of --preset/--config (quick runs)."),
    list_presets: bool = typer.Option(False, "--list-presets", help="Show the presets with their parameter counts and sizes, and exit."),
    groups: Optional[str] = typer.Option(None, "--groups", "-g", help="Comma-separated KV group counts, e.g. 1,2,4,8. Default: every power of two from 1 that divides n_heads, plus n_heads (MHA)."),
    input_len: Optional[int] = typer.Option(None, "--input-len", help="Prompt tokens per sequence (prefilled in one pass). Default: 512, or what a smaller context leaves room for."),
    output_len: Optional[int] = typer.Option(None, "--output-len", help="New tokens per sequence (the first from the prefill, the rest one decode step each). Default: 128, or a quarter of a smaller context."),
    batch: int = typer.Option(8, "--batch", "-b", help="Sequences generated together."),
    repeats: int = typer.Option(3, "--repeats", "-r", help="Timed runs per group count, after one warm-up run; medians are reported."),
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    quantize: Optional[str] = QuantizeOpt,
    compile: bool = CompileOpt,
    seed: int = typer.Option(0, "--seed", help="Seed of the random weights and prompt token ids."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Write every figure, the machine and the settings to FILE.json or FILE.csv."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Draw time per sample against groups to FILE.png or FILE.svg (needs: pip install 'xllama-cli\\[plot]')."),
    force: bool = typer.Option(False, "--force", "-f", help="Overwrite --out/--plot files that exist."),
) -> None:
    """Time prefill and decode against the number of KV groups (the GQA paper's figure 6)."""
    from . import bench as benchmark

    if list_presets:
        benchmark.show_presets()
        return
    if model is not None or (preset is None and config is None):
        model = _model_path(model)
    result = benchmark.run_command(benchmark.BenchOptions(
        model=model, preset=preset, config=config, layers=layers, groups=groups, input_len=input_len,
        output_len=output_len, batch=batch, repeats=repeats, device=device, dtype=dtype, seed=seed,
        quantize=quantize, compile=compile,
        out=out, plot=plot, force=force))
    if result.interrupted:
        raise typer.Exit(130)

@app.command()
def download(
    repo_id: str = typer.Argument(..., help="Hugging Face repo id (owner/name), e.g. meta-llama/Llama-2-7b-hf."),
    revision: str = typer.Option("main", "--revision", "-r", help="Branch, tag or commit to fetch."),
    token: Optional[str] = typer.Option(None, "--token", help="Hugging Face access token; default: HF_TOKEN, else the login saved by `hf auth login`. Gated models (meta-llama/...) need one, and their licence accepted on the model's page."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Put the files in this folder (then run with --model DIR). Default: the Hugging Face cache (HF_HOME / HF_HUB_CACHE), where --model REPO_ID finds them."),
    include: list[str] = typer.Option([], "--include", help="Also fetch repo files matching this pattern (repeatable; 'original/' means that folder, '*' everything)."),
    exclude: list[str] = typer.Option([], "--exclude", help="Do not fetch files matching this pattern (repeatable; applies after --include)."),
    force: bool = typer.Option(False, "--force", help="With --out: replace files there that no download put there (files from an earlier download are replaced anyway)."),
) -> None:
    """Download a Llama checkpoint from the Hugging Face Hub; prints the local folder on stdout.

    Route 1, the Hugging Face Hub (this command): fetches only what xllama needs (config.json, generation_config.json, the safetensors weights and their index, pytorch_model*.bin only when the repo has no safetensors, and the tokenizer files), with a progress bar per file. Run it again after an interruption and it resumes where it stopped. Every file is checked against the hub's size and sha256 (git blob id for small files). Then `xllama generate --model REPO_ID` finds it in the cache, offline.

    Route 2, Meta's e-mailed signed URL (consolidated.NN.pth + params.json): use scripts/download.sh --url "$SIGNED_URL" --models 7B,7B-chat --dir ./llama-2, then xllama generate --model ./llama-2/llama-2-7b.
    """
    from .download import download as download_repo

    folder = download_repo(repo_id, revision=revision, token=token, out=out, include=include, exclude=exclude,
                           force=force)
    report.info(f"run it with: xllama generate --model {folder if out is not None else repo_id} \"PROMPT\"")
    report.write(f"{folder}\n")


@app.command()
def chat(
    model: Optional[str] = ModelOpt,
    system: Optional[str] = typer.Option(None, "--system", "-s", help="System prompt (Llama 2 folds it into the first user message)."),
    template: Optional[str] = typer.Option(None, "--template", help="auto (the default): the checkpoint's own chat template (tokenizer_config.json, chat_template.jinja or chat_template.json), Llama 2's [INST] one as llama2; without one, llama2 when the model's folder or repo name contains 'chat', else plain. llama2: Meta's [INST] chat format, token for token. plain: the turns joined as text, for base models. FILE.jinja: that Jinja chat template."),
    max_new_tokens: int = typer.Option(512, "--max-new-tokens", "-n", help="Most new tokens per answer (an answer also stops at EOS and at the context's end)."),
    context: Optional[int] = typer.Option(None, "--context", help="Most tokens the conversation may hold (default: the model's context); past it the oldest exchanges are dropped."),
    temperature: float = TemperatureOpt,
    top_k: Optional[int] = TopKOpt,
    top_p: Optional[float] = TopPOpt,
    seed: Optional[int] = SeedOpt,
    attn: Optional[str] = AttnOpt,
    groups: Optional[int] = GroupsOpt,
    rope: Optional[str] = RopeOpt,
    rope_factor: Optional[float] = RopeFactorOpt,
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    quantize: Optional[str] = QuantizeOpt,
    compile: bool = CompileOpt,
) -> None:
    """Chat with a model in the terminal; without a terminal, each stdin line is one message and the answers go to stdout."""
    import sys

    from .chat import ChatSession, check_settings, choose_template
    from .checkpoint import open_checkpoint
    from .generation import context_length
    from .loading import load, target_config
    from .repl import run
    from .sampling import Sampling
    from .tokenizer import load_tokenizer

    system = require_utf8(system, "--system") if system is not None else None
    sampling = Sampling(temperature, top_k, top_p, seed)
    path = _model_path(model)
    check_settings(context_length(target_config(open_checkpoint(path), attn, groups, rope, rope_factor)),
                   context, max_new_tokens)
    chosen, why = choose_template(path, template or "auto")
    if template in (None, "auto"):
        report.info(f"template: {chosen} ({why}; --template overrides)")
    tokenizer = load_tokenizer(path)
    m = load(path, attn=attn, groups=groups, rope=rope, rope_factor=rope_factor, device=device, dtype=dtype,
             quantize=quantize, compile=compile)
    session = ChatSession(m.model, tokenizer, chosen, system, sampling, max_new_tokens, context, notify=report.info,
                          step=m.step, tp=m.tp)
    run(session, sys.stdin)


@app.command()
def uptrain(
    model: Optional[str] = ModelOpt,
    text: Optional[Path] = typer.Option(None, "--text", help="UTF-8 text file to train on (paragraphs, blank-line separated, each start with BOS)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Destination folder for the trained HF checkpoint; must not exist (or --force)."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Optimizer steps (default 300)."),
    tokens: Optional[int] = typer.Option(None, "--tokens", help="Train on about this many tokens instead of --steps (steps = tokens / (batch x context))."),
    lr: float = typer.Option(3e-4, "--lr", help="Peak learning rate (AdamW), reached after a 5% linear warm-up, then cosine decay to 10%."),
    batch: int = typer.Option(8, "--batch", "-b", help="Sequences per step."),
    context: Optional[int] = typer.Option(None, "--context", help="Tokens per sequence. Default: the model's context, at most 256."),
    seed: int = typer.Option(0, "--seed", help="Seed of the data order: the same seed gives the same weights."),
    save_every: int = typer.Option(50, "--save-every", help="Save a resumable state every N steps (next to --out)."),
    resume: bool = typer.Option(False, "--resume", help="Continue a killed run from its saved state (same settings)."),
    eval_text: Optional[Path] = typer.Option(None, "--eval", help="Print the perplexity on this text file before and after training."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="Store the result as float32, bfloat16 or float16. Default: the source's dtype (training runs in float32)."),
    device: str = DeviceOpt,
    force: bool = typer.Option(False, "--force", help="Replace --out if it exists (once the new folder is complete)."),
) -> None:
    """Continue pre-training a checkpoint on a text file ("uptraining" after a GQA/MQA conversion)."""
    from .checkpoint import open_checkpoint
    from .train import TrainConfig, uptrain as run_uptrain

    if text is None or out is None:
        raise XllamaError("uptrain needs --text FILE and --out DST")
    if steps is not None and tokens is not None:
        raise XllamaError("give --steps or --tokens, not both")
    path = _model_path(model)
    ctx = context if context is not None else min(256, open_checkpoint(path).config.max_seq_len)
    if tokens is not None and (tokens < 1 or batch < 1 or ctx < 1):
        raise XllamaError(f"--tokens {tokens}, --batch {batch} and --context {ctx} must be at least 1")
    n_steps = steps if steps is not None else (-(-tokens // (batch * ctx)) if tokens is not None else 300)
    cfg = TrainConfig(steps=n_steps, lr=lr, batch=batch, context=ctx, seed=seed, save_every=save_every)
    r = run_uptrain(path, text, out, cfg, eval_path=eval_text, resume=resume, force=force, device=device, dtype=dtype)
    line = f"wrote {r.out}: {r.steps} steps, loss {r.first_loss:.3f} -> {r.last_loss:.3f}, {r.minutes:.1f} min"
    if r.perplexity_before is not None:
        line += f"; perplexity {r.perplexity_before:.3f} -> {r.perplexity_after:.3f}"
    report.write(line + "\n")


def main() -> None:
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # started by torchrun: one rank of several
        from .parallel import run_command

        run_command(app)
    app()


if __name__ == "__main__":
    main()
