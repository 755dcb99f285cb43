"""The `xllama` command line: one small function per subcommand; the work lives in the library.

The options several commands share are declared once, in options.py; a command lists them as
`model: Model`, `sample: SamplingOptions`, `load: LoadOptions`, ... Each command opens its
checkpoint once (`LoadOptions.open`) and checks every flag against it before the weights load
and before anything reaches stdout.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

import typer
from typer.core import TyperGroup

from . import report
from .errors import SettingError, XllamaError, read_utf8, require_utf8
from .options import (DEMO_MODEL, Attn, Compile, Device, Dtype, Groups, LoadOptions, Model,
                      Quantize, SamplingOptions, Template, model_path, with_groups)

if TYPE_CHECKING:
    from .checkpoint import Checkpoint

__all__ = ["app", "main", "DEMO_MODEL"]

# the library's settings, as this command line calls them (errors.SettingError)
FLAGS = {"attn": "--attn", "groups": "--groups", "method": "--method", "rope": "--rope",
         "rope_factor": "--rope-factor", "quantize": "--quantize", "dtype": "--dtype",
         "device": "--device", "compile": "--compile"}


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


def command(name: Optional[str] = None) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Register a subcommand: its option groups expanded (options.with_groups), its docstring its
    help with each paragraph on one line (rich shows a docstring's line breaks as they are)."""
    def register(f: Callable[..., None]) -> Callable[..., None]:
        paragraphs = inspect.cleandoc(f.__doc__ or "").split("\n\n")
        text = "\n\n".join(" ".join(p.split()) for p in paragraphs)
        return app.command(name, help=text)(with_groups(f))
    return register


@command()
def generate(
    prompts: Optional[list[str]] = typer.Argument(
        None, help="One or more prompts; several are generated together as one batch."),
    model: Model = None,
    batch_file: Optional[Path] = typer.Option(
        None, "--batch-file", help="A text file of prompts, one a line, added to the batch."),
    max_new_tokens: int = typer.Option(
        128, "--max-new-tokens", "-n",
        help="Most new tokens per prompt (generation also stops at EOS and at the context's end)."),
    sample: SamplingOptions = SamplingOptions(),
    load: LoadOptions = LoadOptions(),
    compile: Compile = False,
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No summary line on stderr."),
) -> None:
    """Generate text from one or more prompts; the text streams to stdout as it is made."""
    from .generation import check_prompts, generate_tokens

    sampling, stop = sample.sampling(), sample.stop_strings()
    texts = [require_utf8(t, "the prompt") for t in prompts or []]
    if batch_file is not None:
        lines = read_utf8(batch_file, "--batch-file").splitlines()
        texts += [line for line in lines if line.strip()]
    if not texts:
        raise XllamaError("no prompt given; pass it as an argument or with --batch-file")
    opened = load.open(model)
    tokenizer = opened.tokenizer
    ids = [tokenizer.encode(t) for t in texts]
    check_prompts(opened.config, ids, max_new_tokens)  # all before the weights load or stdout
    m = opened.load(compile=compile, decode_batch=len(texts))
    one = len(texts) == 1  # one prompt streams as it is made; a batch prints each when all are done
    if one:
        report.write(texts[0])
    result = generate_tokens(m.model, ids, max_new_tokens, sampling, tokenizer.eos_ids,
                             step=m.step, tp=m.tp, tokenizer=tokenizer, stop=stop,
                             on_text=(lambda _row, text: report.write(text)) if one else None)
    if one:
        report.write("\n")
    else:
        for i, (text, new) in enumerate(zip(texts, result.texts)):
            report.write(("\n" if i else "") + text + new + "\n")
    if not quiet:
        report.info(result.stats.summary())


@command()
def convert(
    src: Optional[str] = typer.Argument(
        None, help="Source checkpoint folder (HF or Meta, sharded or not) or a downloaded repo id. "
                   "Default: the built-in demo model."),
    out: Optional[Path] = typer.Option(
        None, "--out", "-o",
        help="Destination folder for the HF checkpoint; must not exist (or --force)."),
    attn: Attn = None,
    groups: Groups = None,
    method: str = typer.Option(
        "mean", "--method",
        help="How a group of K/V heads becomes one: mean (the GQA paper), first (its first head) "
             "or random (new weights at the source's scale)."),
    seed: Optional[int] = typer.Option(
        None, "--seed", help="Seed for --method random (recorded in xllama_convert.json)."),
    dtype: Optional[str] = typer.Option(
        None, "--dtype",
        help="Store weights as float32, bfloat16 or float16. Default: the source's dtype (pooling "
             "is done in float32 either way)."),
    shard_size: str = typer.Option(
        "5GB", "--shard-size", help="Largest safetensors shard, e.g. 5GB, 500MB, 2GiB."),
    force: bool = typer.Option(
        False, "--force",
        help="Replace --out if it exists (only once the new folder is complete)."),
    eval_text: Optional[Path] = typer.Option(
        None, "--eval",
        help="Also print the perplexity of source and result on this text file (as `xllama eval` "
             "computes it)."),
    context: Optional[int] = typer.Option(
        None, "--context",
        help="With --eval: tokens per window, BOS included. Default: the model's context."),
    stride: Optional[int] = typer.Option(
        None, "--stride",
        help="With --eval: text tokens a window moves on by. Default: context // 2."),
    device: str = typer.Option(
        "auto", "--device", help="With --eval: auto (CUDA when present), cpu or cuda[:N]."),
) -> None:
    """Write a checkpoint as an HF folder: MHA -> GQA/MQA (mean-pooled K/V heads), Meta -> HF,
    re-sharding, --dtype."""
    from .convert import convert_checkpoint

    if out is None:
        raise XllamaError("no --out given; pass the destination folder with --out PATH")
    source = model_path(src)
    # with --eval the source is opened once, here: checked, then converted and scored
    opened = _eval_source(source, eval_text, context, stride) if eval_text is not None else None
    result = convert_checkpoint(opened or source, out, attn=attn, groups=groups, method=method,
                                seed=seed, dtype=dtype, shard_size=shard_size, force=force)
    kept = result.kv_heads_after == result.kv_heads_before
    how = f"{result.method}-pooled" if result.method else "kept" if kept else "repeated"
    report.info(f"wrote {result.out}: {len(result.shards)} shard(s), KV heads "
                f"{result.kv_heads_before} -> {result.kv_heads_after} ({how})")
    if opened is not None and eval_text is not None:
        _compare_perplexity(opened, result.out, eval_text, context, stride, device)


def _eval_source(source: str, text: Path, context: Optional[int],
                 stride: Optional[int]) -> Checkpoint:
    """`convert --eval`: the source checkpoint, opened, once the text file and the windows are seen
    to be good: a bad one fails before the conversion, not after it."""
    from .checkpoint import open_checkpoint
    from .evaluate import read_text, window_settings
    from .generation import context_length

    read_text(text)
    ckpt = open_checkpoint(source)
    window_settings(context_length(ckpt.config), context, stride)
    return ckpt


def _compare_perplexity(source: Checkpoint, result: Path, text: Path, context: Optional[int],
                        stride: Optional[int], device: str) -> None:
    """`convert --eval`: the perplexity of the source checkpoint and of the converted one."""
    from .checkpoint import open_checkpoint
    from .evaluate import evaluate_text
    from .loading import load_model
    from .tokenizer import load_tokenizer

    tokenizer = load_tokenizer(source)
    rows = []
    for label, ckpt in (("source", source), ("result", open_checkpoint(result))):
        m = load_model(ckpt, device=device, decode_batch=None)  # perplexity: no decoding
        ppl = evaluate_text(m, tokenizer, text, context, stride, label=f"perplexity of {label}")
        rows.append((label, ckpt.path.name, m.config.n_kv_heads, ppl))
        del m
    report.perplexity_table(rows)


@command("eval")
def eval_(
    model: Model = None,
    text: Optional[Path] = typer.Option(None, "--text", help="UTF-8 text file to score."),
    context: Optional[int] = typer.Option(
        None, "--context", help="Tokens per window, BOS included. Default: the model's context."),
    stride: Optional[int] = typer.Option(
        None, "--stride",
        help="Text tokens a window moves on by; every token is scored once, with at least "
             "context-1-stride tokens before it after the first window. Default: context // 2."),
    as_json: bool = typer.Option(
        False, "--json", help="Print the result as one JSON object on stdout."),
    load: LoadOptions = LoadOptions(),
) -> None:
    """Perplexity of a model on a text file (sliding windows that each start with BOS; every
    token scored once)."""
    from .evaluate import check_text, evaluate_tokens, read_text, text_tokens, window_settings
    from .generation import context_length

    if text is None:
        raise XllamaError("no --text given; pass the text file to score with --text FILE")
    read_text(text)  # a bad file fails before the model is opened
    opened = load.open(model)
    window_settings(context_length(opened.config), context, stride)
    tokens = text_tokens(opened.tokenizer, text)
    check_text(tokens, opened.tokenizer.bos_id, opened.config)  # before the weights load
    m = opened.load(decode_batch=None).model  # perplexity: no decoding
    result = evaluate_tokens(m, tokens, opened.tokenizer.bos_id, context, stride)
    if as_json:
        report.write_json({"model": opened.name, "text": str(text),
                           "kv_heads": m.config.n_kv_heads, **result.as_dict()})
    else:
        report.perplexity_summary(result)


@command()
def bench(
    model: Model = None,
    preset: Optional[str] = typer.Option(
        None, "--preset", "-p",
        help="A named architecture with random weights (no download), e.g. small, llama2-7b, "
             "llama3-8b; --list-presets shows them all."),
    config: Optional[Path] = typer.Option(
        None, "--config",
        help="A JSON architecture with random weights: a Hugging Face config.json, or ModelConfig "
             "fields (over --preset's when both are given)."),
    layers: Optional[int] = typer.Option(
        None, "--layers", help="Override the number of layers of --preset/--config (quick runs)."),
    list_presets: bool = typer.Option(
        False, "--list-presets",
        help="Show the presets with their parameter counts and sizes, and exit."),
    groups: Optional[str] = typer.Option(
        None, "--groups", "-g",
        help="Comma-separated KV group counts, e.g. 1,2,4,8. Default: every power of two from 1 "
             "that divides n_heads, plus n_heads (MHA)."),
    input_len: Optional[int] = typer.Option(
        None, "--input-len",
        help="Prompt tokens per sequence (prefilled in one pass). Default: 512, or what a smaller "
             "context leaves room for."),
    output_len: Optional[int] = typer.Option(
        None, "--output-len",
        help="New tokens per sequence (the first from the prefill, the rest one decode step "
             "each). Default: 128, or a quarter of a smaller context."),
    batch: int = typer.Option(8, "--batch", "-b", help="Sequences generated together."),
    repeats: int = typer.Option(
        3, "--repeats", "-r",
        help="Timed runs per group count, after one warm-up run; medians are reported."),
    device: Device = "auto",
    dtype: Dtype = "auto",
    quantize: Quantize = None,
    compile: Compile = False,
    seed: int = typer.Option(0, "--seed", help="Seed of the random weights and prompt token ids."),
    out: Optional[Path] = typer.Option(
        None, "--out", "-o",
        help="Write every figure, the machine and the settings to FILE.json or FILE.csv."),
    plot: Optional[Path] = typer.Option(
        None, "--plot",
        help="Draw time per sample against groups to FILE.png or FILE.svg (needs: pip install "
             "'xllama-cli\\[plot]')."),
    force: bool = typer.Option(
        False, "--force", "-f", help="Overwrite --out/--plot files that exist."),
) -> None:
    """Time prefill and decode against the number of KV groups (the GQA paper's figure 6)."""
    from . import bench as benchmark

    if list_presets:
        benchmark.show_presets()
        return
    if model is not None or (preset is None and config is None):
        model = model_path(model)
    result = benchmark.run_command(benchmark.BenchOptions(
        model=model, preset=preset, config=config, layers=layers, groups=groups,
        input_len=input_len, output_len=output_len, batch=batch, repeats=repeats, device=device,
        dtype=dtype, seed=seed, quantize=quantize, compile=compile, out=out, plot=plot,
        force=force))
    if result.interrupted:
        raise typer.Exit(130)


@command()
def download(
    repo_id: str = typer.Argument(
        ..., help="Hugging Face repo id (owner/name), e.g. meta-llama/Llama-2-7b-hf."),
    revision: str = typer.Option(
        "main", "--revision", "-r", help="Branch, tag or commit to fetch."),
    token: Optional[str] = typer.Option(
        None, "--token",
        help="Hugging Face access token; default: HF_TOKEN, else the login saved by `hf auth "
             "login`. Gated models (meta-llama/...) need one, and their licence accepted on the "
             "model's page."),
    out: Optional[Path] = typer.Option(
        None, "--out", "-o",
        help="Put the files in this folder (then run with --model DIR). Default: the Hugging Face "
             "cache (HF_HOME / HF_HUB_CACHE), where --model REPO_ID finds them."),
    include: list[str] = typer.Option(
        [], "--include",
        help="Also fetch repo files matching this pattern (repeatable; 'original/' means that "
             "folder, '*' everything)."),
    exclude: list[str] = typer.Option(
        [], "--exclude",
        help="Do not fetch files matching this pattern (repeatable; applies after --include)."),
    force: bool = typer.Option(
        False, "--force",
        help="With --out: replace files there that no download put there (files from an earlier "
             "download are replaced anyway)."),
) -> None:
    """Download a Llama checkpoint from the Hugging Face Hub; prints the local folder on stdout.

    Route 1, the Hugging Face Hub (this command): fetches only what xllama needs (config.json,
    generation_config.json, the safetensors weights and their index, pytorch_model*.bin only when
    the repo has no safetensors, and the tokenizer files), with a progress bar per file. Run it
    again after an interruption and it resumes where it stopped. Every file is checked against
    the hub's size and sha256 (git blob id for small files). Then `xllama generate --model
    REPO_ID` finds it in the cache, offline.

    Route 2, Meta's e-mailed signed URL (consolidated.NN.pth + params.json): use
    scripts/download.sh --url "$SIGNED_URL" --models 7B,7B-chat --dir ./llama-2, then xllama
    generate --model ./llama-2/llama-2-7b.
    """
    from .download import download as download_repo

    folder = download_repo(repo_id, revision=revision, token=token, out=out, include=include,
                           exclude=exclude, force=force)
    report.info(f"run it with: xllama generate --model {folder if out is not None else repo_id} "
                "\"PROMPT\"")
    report.write(f"{folder}\n")


@command()
def chat(
    model: Model = None,
    system: Optional[str] = typer.Option(
        None, "--system", "-s",
        help="System prompt (Llama 2 folds it into the first user message)."),
    template: Template = None,
    max_new_tokens: int = typer.Option(
        512, "--max-new-tokens", "-n",
        help="Most new tokens per answer (an answer also stops at EOS and at the context's end)."),
    context: Optional[int] = typer.Option(
        None, "--context",
        help="Most tokens the conversation may hold (default: the model's context); past it the "
             "oldest exchanges are dropped."),
    sample: SamplingOptions = SamplingOptions(),
    load: LoadOptions = LoadOptions(),
    compile: Compile = False,
) -> None:
    """Chat with a model in the terminal; without a terminal, each stdin line is one message and
    the answers go to stdout."""
    import sys

    from .chat import ChatSession, check_settings, choose_template
    from .generation import context_length
    from .repl import run

    system = require_utf8(system, "--system") if system is not None else None
    sampling, stop = sample.sampling(), sample.stop_strings()
    opened = load.open(model)
    check_settings(context_length(opened.config), context, max_new_tokens)
    chosen, why = choose_template(opened.checkpoint.path, template or "auto")
    if template in (None, "auto"):
        report.info(f"template: {chosen} ({why}; --template overrides)")
    m = opened.load(compile=compile)
    session = ChatSession(m.model, opened.tokenizer, chosen, system, sampling, max_new_tokens,
                          context, notify=report.info, step=m.step, tp=m.tp, stop=stop)
    run(session, sys.stdin)


@command()
def serve(
    model: Model = None,
    host: str = typer.Option(
        "127.0.0.1", "--host",
        help="Address to listen on; another than loopback exposes the model to the network (use "
             "--api-key)."),
    port: int = typer.Option(8000, "--port", help="Port to listen on (0: any free port)."),
    api_key: Optional[str] = typer.Option(
        None, "--api-key", envvar="XLLAMA_API_KEY", show_default=False,
        help="Require 'Authorization: Bearer KEY' on /v1 (also from XLLAMA_API_KEY; never "
             "logged)."),
    max_batch: int = typer.Option(
        8, "--max-batch", help="Requests decoded together (sequence slots in the KV cache)."),
    max_queue: int = typer.Option(
        64, "--max-queue", help="Requests that may wait for a slot; past that the server answers "
                                "503."),
    cors: Optional[list[str]] = typer.Option(
        None, "--cors", metavar="ORIGIN",
        help="Let web pages from ORIGIN (e.g. http://localhost:3000, or *) call the API; "
             "repeatable. Default: no cross-origin access."),
    drain_seconds: float = typer.Option(
        30.0, "--drain-seconds",
        help="On Ctrl-C or SIGTERM, how long running requests may finish before they are "
             "cancelled."),
    max_body: str = typer.Option(
        "1MB", "--max-body", help="Largest request body (e.g. 1MB, 256KiB); larger: 413."),
    max_tokens: Optional[int] = typer.Option(
        None, "--max-tokens",
        help="Largest max_tokens a request may ask (default: the model's context)."),
    max_messages: int = typer.Option(
        256, "--max-messages", help="Most messages in one chat request."),
    template: Template = None,
    load: LoadOptions = LoadOptions(),
    compile: Compile = False,
) -> None:
    """Serve a model over HTTP: the OpenAI API (/v1/chat/completions, /v1/completions,
    /v1/models), /health, and the LlamaChat page at /. Requests are decoded together (continuous
    batching); Ctrl-C lets running ones finish (--drain-seconds), then stops.

    Needs the serve extra: pip install 'xllama-cli\\[serve]'."""
    import os

    from .api import Limits
    from .writer import parse_size

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise XllamaError("serve runs in one process; start it without torchrun")
    try:
        body = parse_size(max_body)
    except XllamaError as e:
        raise XllamaError(f"--max-body: {e}") from None
    from . import serve as server  # its missing dependencies are one error line

    settings = server.Settings(host, port, api_key, max_batch, max_queue, tuple(cors or ()),
                               drain_seconds, Limits(body, max_tokens, max_messages))
    opened = load.open(model)
    try:
        signal = server.run(opened, model or "demo", settings, template=template, compile=compile)
    except KeyboardInterrupt:  # Ctrl-C while loading: not an error
        raise typer.Exit(130) from None
    if signal is not None:  # stopped by Ctrl-C or SIGTERM, as a shell reports it
        raise typer.Exit(128 + signal)


@command()
def uptrain(
    model: Model = None,
    text: Optional[Path] = typer.Option(
        None, "--text",
        help="UTF-8 text file to train on (paragraphs, blank-line separated, each start with "
             "BOS)."),
    out: Optional[Path] = typer.Option(
        None, "--out", "-o",
        help="Destination folder for the trained HF checkpoint; must not exist (or --force)."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Optimizer steps (default 300)."),
    tokens: Optional[int] = typer.Option(
        None, "--tokens",
        help="Train on about this many tokens instead of --steps (steps = tokens / (batch x "
             "context))."),
    lr: float = typer.Option(
        3e-4, "--lr",
        help="Peak learning rate (AdamW), reached after a 5% linear warm-up, then cosine decay to "
             "10%."),
    batch: int = typer.Option(8, "--batch", "-b", help="Sequences per step."),
    context: Optional[int] = typer.Option(
        None, "--context", help="Tokens per sequence. Default: the model's context, at most 256."),
    seed: int = typer.Option(
        0, "--seed", help="Seed of the data order: the same seed gives the same weights."),
    save_every: int = typer.Option(
        50, "--save-every", help="Save a resumable state every N steps (next to --out)."),
    resume: bool = typer.Option(
        False, "--resume", help="Continue a killed run from its saved state (same settings)."),
    eval_text: Optional[Path] = typer.Option(
        None, "--eval", help="Print the perplexity on this text file before and after training."),
    dtype: Optional[str] = typer.Option(
        None, "--dtype",
        help="Store the result as float32, bfloat16 or float16. Default: the source's dtype "
             "(training runs in float32)."),
    device: Device = "auto",
    force: bool = typer.Option(
        False, "--force", help="Replace --out if it exists (once the new folder is complete)."),
) -> None:
    """Continue pre-training a checkpoint on a text file ("uptraining" after a GQA/MQA
    conversion)."""
    from .checkpoint import open_checkpoint
    from .train import Stopped, TrainConfig, uptrain as run_uptrain

    if text is None or out is None:
        raise XllamaError("uptrain needs --text FILE and --out DST")
    if steps is not None and tokens is not None:
        raise XllamaError("give --steps or --tokens, not both")
    source = open_checkpoint(model_path(model))
    ctx = context if context is not None else min(256, source.config.max_seq_len)
    if tokens is not None and (tokens < 1 or batch < 1 or ctx < 1):
        raise XllamaError(f"--tokens {tokens}, --batch {batch} and --context {ctx} must be at "
                          "least 1")
    n_steps = steps if steps is not None else -(-tokens // (batch * ctx)) if tokens is not None \
        else 300
    cfg = TrainConfig(steps=n_steps, lr=lr, batch=batch, context=ctx, seed=seed,
                      save_every=save_every)
    try:
        r = run_uptrain(source, text, out, cfg, eval_path=eval_text, resume=resume, force=force,
                        device=device, dtype=dtype)
    except Stopped as stop:  # Ctrl-C or SIGTERM: not an error, and no traceback
        then = ("its state is saved next to --out; the same command with --resume continues it"
                if stop.saved else "no state was saved (--save-every 0)")
        report.info(f"{stop}; {then}")
        raise typer.Exit(128 + stop.signum) from None
    line = (f"wrote {r.out}: {r.steps} steps, loss {r.first_loss:.3f} -> {r.last_loss:.3f}, "
            f"{r.minutes:.1f} min")
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
