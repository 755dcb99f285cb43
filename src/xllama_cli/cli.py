"""The `xllama` command line: one small function per subcommand; the work lives in the library."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from typer.core import TyperGroup

from . import report
from .errors import XllamaError


class _Group(TyperGroup):
    """Turns an XllamaError anywhere below into one `error:` line and exit code 2."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except XllamaError as e:
            report.error(str(e))
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
ModelOpt = typer.Option(None, "--model", "-m", help="Checkpoint folder: Hugging Face (config.json + safetensors/.bin) or Meta (params.json + consolidated.NN.pth). Default: the built-in demo model.")
AttnOpt = typer.Option(None, "--attn", help="K/V layout: MHA (one KV head per query head), GQA (--groups KV heads), MQA (one KV head). Default: the checkpoint's own. Fewer heads are mean-pooled per group; more are repeated.")
GroupsOpt = typer.Option(None, "--groups", "-g", help="Number of KV heads (groups) for --attn GQA; must divide the query heads. Default 8 (or n_heads if smaller).")
RopeOpt = typer.Option(None, "--rope", help="Rotary embedding: rotary (plain), linear (positions / factor), dynamic (NTK-aware past the trained length), llama3. Default: the checkpoint's rope_scaling.")
RopeFactorOpt = typer.Option(None, "--rope-factor", help="Scaling factor for --rope linear|dynamic|llama3.")
DeviceOpt = typer.Option("auto", "--device", help="auto (CUDA when present), cpu or cuda[:N].")
DtypeOpt = typer.Option("auto", "--dtype", help="auto (bfloat16 on CUDA, float32 on CPU), float32, bfloat16 or float16.")


DEMO_MODEL = Path(__file__).parent / "demo"


def _model_path(model: Optional[str]) -> str:
    """--model as given, or the built-in demo model when none is given (said once on stderr)."""
    if model is not None:
        return model
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
    temperature: float = typer.Option(0.8, "--temperature", "-t", help="Sampling temperature; 0 means greedy (always the most likely token)."),
    top_k: Optional[int] = typer.Option(None, "--top-k", help="Sample only among the k most likely tokens."),
    top_p: Optional[float] = typer.Option(0.95, "--top-p", help="Sample only among the most likely tokens whose probabilities add up to p (nucleus); 1 disables."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Random seed: the same seed gives the same text."),
    attn: Optional[str] = AttnOpt,
    groups: Optional[int] = GroupsOpt,
    rope: Optional[str] = RopeOpt,
    rope_factor: Optional[float] = RopeFactorOpt,
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No summary line on stderr."),
) -> None:
    """Generate text from one or more prompts; the text streams to stdout as it is made."""
    from .generation import continuation_text, generate_tokens
    from .loading import load_model
    from .sampling import Sampling
    from .tokenizer import load_tokenizer

    texts = list(prompts or [])
    if batch_file is not None:
        try:
            texts += [line for line in batch_file.read_text().splitlines() if line.strip()]
        except OSError as e:
            raise XllamaError(f"cannot read --batch-file {batch_file}: {e.strerror}") from None
    if not texts:
        raise XllamaError("no prompt given; pass it as an argument or with --batch-file")
    path = _model_path(model)
    tokenizer = load_tokenizer(path)
    m = load_model(path, attn=attn, groups=groups, rope=rope, rope_factor=rope_factor, device=device, dtype=dtype)
    ids = [tokenizer.encode(t) for t in texts]
    sampling = Sampling(temperature, top_k, top_p, seed)
    if len(texts) == 1:  # one prompt: stream it token by token
        stream = tokenizer.stream()
        report.write(texts[0])
        result = generate_tokens(m, ids, max_new_tokens, sampling, tokenizer.eos_ids,
                                 on_token=lambda _row, tok: report.write(stream.push(tok)))
        report.write(stream.flush() + "\n")
    else:  # a batch: each text when all are done, in order
        result = generate_tokens(m, ids, max_new_tokens, sampling, tokenizer.eos_ids)
        for i, (text, new) in enumerate(zip(texts, result.tokens)):
            report.write(("\n" if i else "") + text + continuation_text(tokenizer, new) + "\n")
    if not quiet:
        report.info(result.stats.summary())


def main() -> None:
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # started by torchrun: one rank of several
        from .parallel import run_command

        run_command(app)
    app()


if __name__ == "__main__":
    main()
