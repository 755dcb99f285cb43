"""The command line's options that several commands share, each declared once.

A shared option is a `typing.Annotated` alias (its type and its typer.Option), taken by a command
as `compile: Compile = False`. Options that always travel together form a group, a dataclass of
such fields: a command parameter typed with a group (`load: LoadOptions = LoadOptions()`) stands
for all of the group's options, in the group's order and at that parameter's place in `--help`
(see `with_groups`). A group also says what its options turn into: `LoadOptions.open` opens the
checkpoint once and `OpenedModel.load` builds the model from it; `SamplingOptions.sampling`.

Nothing here imports torch at import time, so `xllama --help` answers at once.
"""

from __future__ import annotations

import dataclasses
import inspect
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Callable, Optional

import typer

from . import report
from .errors import XllamaError

if TYPE_CHECKING:
    from .checkpoint import Checkpoint
    from .config import ModelConfig
    from .loading import Loaded
    from .sampling import Sampling
    from .tokenizer import Tokenizer

DEMO_MODEL = Path(__file__).parent / "demo"

Model = Annotated[Optional[str], typer.Option(
    "--model", "-m",
    help="Checkpoint folder: Hugging Face (config.json + safetensors/.bin) or Meta (params.json + "
         "consolidated.NN.pth); or a Hugging Face repo id (owner/name) fetched with `xllama "
         "download`, found in the local cache without the network. Default: the built-in demo "
         "model.")]
Attn = Annotated[Optional[str], typer.Option(
    "--attn",
    help="K/V layout: MHA (one KV head per query head), GQA (--groups KV heads), MQA (one KV "
         "head). Default: the checkpoint's own. Fewer heads are mean-pooled per group; more are "
         "repeated.")]
Groups = Annotated[Optional[int], typer.Option(
    "--groups", "-g",
    help="Number of KV heads (groups) for --attn GQA; must divide the query heads. Default 8 (or "
         "n_heads if smaller).")]
Rope = Annotated[Optional[str], typer.Option(
    "--rope",
    help="Rotary embedding: rotary (plain), linear (positions / factor), dynamic (NTK-aware past "
         "the trained length), llama3. Default: the checkpoint's rope_scaling.")]
RopeFactor = Annotated[Optional[float], typer.Option(
    "--rope-factor", help="Scaling factor for --rope linear|dynamic|llama3.")]
Device = Annotated[str, typer.Option(
    "--device", help="auto (CUDA when present), cpu or cuda[:N].")]
Dtype = Annotated[str, typer.Option(
    "--dtype",
    help="auto, float32, bfloat16 or float16. auto: bfloat16 on CUDA and with --quantize; on the "
         "CPU bfloat16 for a bfloat16 or float16 checkpoint where the CPU computes bfloat16 "
         "natively (AVX-512 BF16 or AMX; said on stderr), else float32.")]
Quantize = Annotated[Optional[str], typer.Option(
    "--quantize",
    help="int8: weight-only int8 projections and output head, a scale per output channel "
         "(half the bytes of bfloat16 to read per token). int4: 4-bit projections in groups of 32 "
         "weights, a scale and a zero each (the head int8). Quantized at load time; computes in "
         "bfloat16 (or --dtype float16).")]
Compile = Annotated[bool, typer.Option(
    "--compile",
    help="torch.compile the decode step (CUDA graphs on CUDA). Compiling takes tens of seconds "
         "(printed as 'compile' in the summary) and pays back over long generations.")]

Template = Annotated[Optional[str], typer.Option(
    "--template",
    help="auto (the default): the checkpoint's own chat template (tokenizer_config.json, "
         "chat_template.jinja or chat_template.json), Llama 2's [INST] one as llama2; without "
         "one, llama2 when the model's folder or repo name contains 'chat', else plain. "
         "llama2: Meta's [INST] chat format, token for token. plain: the turns joined as "
         "text, for base models. FILE.jinja: that Jinja chat template.")]

Temperature = Annotated[float, typer.Option(
    "--temperature", "-t",
    help="Sampling temperature; 0 means greedy (always the most likely token).")]
TopK = Annotated[Optional[int], typer.Option(
    "--top-k", help="Sample only among the k most likely tokens; 0 means no limit.")]
TopP = Annotated[Optional[float], typer.Option(
    "--top-p",
    help="Sample only among the most likely tokens whose probabilities add up to p (nucleus), "
         "0 < p <= 1; 1 disables.")]
Seed = Annotated[Optional[int], typer.Option(
    "--seed", help="Random seed (0 to 2**64-1): the same seed gives the same text.")]
MinP = Annotated[Optional[float], typer.Option(
    "--min-p",
    help="Sample only among tokens at least p times as likely as the most likely one, "
         "0 <= p <= 1; 0 disables.")]
RepetitionPenalty = Annotated[float, typer.Option(
    "--repetition-penalty",
    help="Divide the logit of every token already in the prompt or the answer by this (multiply "
         "it when negative), > 0; 1 disables, above 1 repeats less (transformers' rule).")]
FrequencyPenalty = Annotated[float, typer.Option(
    "--frequency-penalty",
    help="Lower each token's logit by this times its count in the answer so far, -2 to 2; 0 "
         "disables (OpenAI's rule).")]
PresencePenalty = Annotated[float, typer.Option(
    "--presence-penalty",
    help="Lower the logit of every token already in the answer by this, -2 to 2; 0 disables "
         "(OpenAI's rule).")]
Stop = Annotated[Optional[list[str]], typer.Option(
    "--stop", metavar="TEXT",
    help="End the text where this string appears (repeatable); the string itself is not "
         "printed. Matched on the decoded text, also across tokens.")]


def model_path(model: str | None) -> str:
    """--model as given (a repo id: its folder in the local Hugging Face cache), or the built-in
    demo model when none is given (said once on stderr)."""
    if model is not None:
        from .download import resolve_model

        folder = resolve_model(model)
        return model if folder == Path(model).expanduser() else str(folder)
    if not (DEMO_MODEL / "config.json").is_file():
        raise XllamaError("no --model given and the built-in demo model is not installed; "
                          "pass --model PATH")
    report.info(f"no --model given: using the built-in demo model ({DEMO_MODEL})")
    return str(DEMO_MODEL)


@dataclass(frozen=True)
class SamplingOptions:
    """How the next token is chosen and where the text stops: --temperature, --top-k, --top-p,
    --seed, --min-p, the penalties and --stop."""

    temperature: Temperature = 0.8
    top_k: TopK = None
    top_p: TopP = 0.95
    seed: Seed = None
    min_p: MinP = None
    repetition_penalty: RepetitionPenalty = 1.0
    frequency_penalty: FrequencyPenalty = 0.0
    presence_penalty: PresencePenalty = 0.0
    stop: Stop = None

    def sampling(self) -> Sampling:
        """The checked sampling settings (a bad value fails here, before any work)."""
        from .sampling import Sampling

        return Sampling(self.temperature, self.top_k, self.top_p, self.seed, self.min_p,
                        self.repetition_penalty, self.frequency_penalty, self.presence_penalty)

    def stop_strings(self) -> tuple[str, ...]:
        """The checked --stop strings."""
        from .errors import require_utf8

        for text in self.stop or ():
            if not require_utf8(text, "--stop"):
                raise XllamaError("--stop needs a non-empty string")
        return tuple(self.stop or ())


@dataclass(frozen=True)
class LoadOptions:
    """How a checkpoint becomes a model: its K/V layout and RoPE, device, dtype and weights."""

    attn: Attn = None
    groups: Groups = None
    rope: Rope = None
    rope_factor: RopeFactor = None
    device: Device = "auto"
    dtype: Dtype = "auto"
    quantize: Quantize = None

    def open(self, model: str | None) -> OpenedModel:
        """The checkpoint --model names, opened once for the whole command, the config the model
        will have (--attn/--groups and --rope checked and applied) and its tokenizer: what a
        command checks its own flags against before the weights are read."""
        from .checkpoint import open_checkpoint
        from .loading import resolve_device, target_config
        from .tokenizer import load_tokenizer

        resolve_device(self.device)  # a device this machine lacks: refused before any reading
        folder = model_path(model)
        ckpt = open_checkpoint(folder)
        config = target_config(ckpt, self.attn, self.groups, self.rope, self.rope_factor)
        return OpenedModel(self, model or folder, ckpt, config, load_tokenizer(ckpt))


@dataclass(frozen=True)
class OpenedModel:
    """A checkpoint opened by `LoadOptions.open`, ready to load."""

    options: LoadOptions
    name: str  # --model as given (a folder or a repo id), or the demo model's folder
    checkpoint: Checkpoint
    config: ModelConfig  # as the model will be built: the layout and RoPE flags applied
    tokenizer: Tokenizer

    def load(self, *, compile: bool = False, decode_batch: int | None = 1) -> Loaded:
        """The model on the chosen device and dtype, with its decode step and tensor-parallel
        group; see `loading.load`."""
        from .loading import load

        o = self.options
        return load(self.checkpoint, attn=o.attn, groups=o.groups, rope=o.rope,
                    rope_factor=o.rope_factor, device=o.device, dtype=o.dtype,
                    quantize=o.quantize, compile=compile, decode_batch=decode_batch)


def with_groups(command: Callable[..., Any]) -> Callable[..., Any]:
    """`command` as typer should see it: each parameter typed with an option group is replaced, at
    its place, by the group's options, and the command receives the group built from their values.
    (Typer reads a command's options from its signature, one parameter each, and has no groups.)"""
    signature = inspect.signature(command, eval_str=True)
    groups: dict[str, type] = {}
    params: list[inspect.Parameter] = []
    for p in signature.parameters.values():
        if not (isinstance(p.annotation, type) and dataclasses.is_dataclass(p.annotation)):
            params.append(p)
            continue
        groups[p.name] = p.annotation
        hints = typing.get_type_hints(p.annotation, include_extras=True)
        params += [inspect.Parameter(f.name, p.kind, default=f.default, annotation=hints[f.name])
                   for f in dataclasses.fields(p.annotation)]

    def run(**values: Any) -> Any:
        for name, group in groups.items():
            values[name] = group(**{f.name: values.pop(f.name) for f in dataclasses.fields(group)})
        return command(**values)

    names = [p.name for p in params]
    if len(set(names)) != len(names):  # two options of one name: typer would keep one silently
        raise TypeError(f"{command.__name__}: an option group repeats a parameter name: {names}")
    run.__signature__ = signature.replace(parameters=params)  # type: ignore[attr-defined]
    for attr in ("__module__", "__name__", "__qualname__", "__doc__"):
        setattr(run, attr, getattr(command, attr))
    return run
