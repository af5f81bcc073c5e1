"""`selfhost train gpt` (training) and `selfhost gpt export|sample` (using what it trained), as
`selfhost train mnist` and `selfhost mnist predict|eval`. `train export|sample` stay as hidden aliases.
Flags map onto TrainConfig / the core functions; selfhost.cli.output renders."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any

import typer

from selfhost.cli.output import Output, fmt_bytes, fmt_count, fmt_duration
from selfhost.events import Event, Notice, Progress
from selfhost.train.gpt import options
from selfhost.train.gpt.options import Arch, Device, DType, ExportType, OptimizerKind, Schedule, TokenizerKind

JSON_OPTION = typer.Option("--json", help="Print the result as JSON (progress stays on stderr).")
gpt_app = typer.Typer(
    help="Use a GPT trained by `selfhost train gpt`: export it to GGUF, sample from it.", no_args_is_help=True
)
_PRESET_HELP = (f"Base settings: {', '.join(options.preset_names())} (default: {options.DEFAULT_PRESET}; "
                f"{options.FINETUNE_PRESET} with --init).")  # fmt: skip
# `train gpt`'s own options; every other option is a TrainConfig setting
# (tests/train/test_train_gpt_options.py).
RUN_OPTIONS = ("data", "preset", "config", "name", "out", "resume", "estimate", "export", "export_type",
               "chat", "init", "tensorboard", "as_json")  # fmt: skip


def _setting(field: str, help: str | None = None) -> Any:
    """The option of TrainConfig setting `field`, under the flag options.py gives it."""
    return typer.Option(options.declaration(field), help=help)


def register(app: typer.Typer, train: typer.Typer) -> None:
    train.command("gpt")(gpt)
    gpt_app.command("export")(export)
    gpt_app.command("sample")(sample)
    train.command("export", hidden=True)(export)  # the spellings before `selfhost gpt`
    train.command("sample", hidden=True)(sample)
    app.add_typer(gpt_app, name="gpt")


def gpt(
    data: Annotated[
        Path | None, typer.Option("--data", "-d", help="Text file, or folder of documents.")
    ] = None,
    preset: Annotated[str | None, typer.Option(help=_PRESET_HELP)] = None,
    config: Annotated[
        Path | None, typer.Option("--config", "-c", help="TOML file of settings (and `preset`).")
    ] = None,
    name: Annotated[
        str | None, typer.Option("--name", "-n", help="Run and model name (default: <data>-gpt).")
    ] = None,
    out: Annotated[
        Path | None, typer.Option("--out", help="Run folder (default: SELFHOST_HOME/runs/<name>).")
    ] = None,
    resume: Annotated[
        bool,
        typer.Option("--resume", help="Continue the run in the run folder exactly (with its own settings)."),
    ] = False,
    estimate: Annotated[bool, typer.Option("--estimate", help="Print the cost estimate and exit.")] = False,
    export: Annotated[
        bool, typer.Option("--export/--no-export", help="Export to GGUF + store at the end.")
    ] = True,
    export_type: Annotated[
        ExportType, typer.Option("--export-type", case_sensitive=False, help="GGUF tensor type.")
    ] = "f16",
    tokenizer: Annotated[TokenizerKind | None, _setting("tokenizer", "Character or byte-level BPE.")] = None,
    vocab_size: Annotated[int | None, _setting("vocab_size", "BPE vocabulary size.")] = None,
    val_fraction: Annotated[
        float | None, _setting("val_fraction", "Share of tokens held out for validation.")
    ] = None,
    arch: Annotated[
        Arch | None, _setting("arch", "gpt2, or llama (rotary, RMSNorm, SwiGLU; GGUF llama/qwen3).")
    ] = None,
    n_kv_head: Annotated[
        int | None, _setting("n_kv_head", "llama: key/value heads (GQA; 0: n_head).")
    ] = None,
    n_ff: Annotated[int | None, _setting("n_ff", "llama: SwiGLU width (0: 8/3 n_embd).")] = None,
    qk_norm: Annotated[bool | None, _setting("qk_norm", "llama: RMSNorm of q/k heads (qwen3).")] = None,
    tie_embeddings: Annotated[bool | None, _setting("tie_embeddings", "llama: output = embedding.")] = None,
    rope_theta: Annotated[float | None, _setting("rope_theta", "llama: rotary base.")] = None,
    n_layer: Annotated[int | None, _setting("n_layer", "Transformer blocks.")] = None,
    n_head: Annotated[int | None, _setting("n_head", "Attention heads.")] = None,
    n_embd: Annotated[int | None, _setting("n_embd", "Embedding width (a multiple of 32 for Q8_0).")] = None,
    block_size: Annotated[int | None, _setting("block_size", "Context length in tokens.")] = None,
    dropout: Annotated[float | None, _setting("dropout")] = None,
    batch_size: Annotated[
        int | None, _setting("batch_size", "Sequences per micro-batch (per process).")
    ] = None,
    grad_accum: Annotated[int | None, _setting("grad_accum", "Micro-batches per optimizer step.")] = None,
    max_iters: Annotated[int | None, _setting("max_iters", "Optimizer steps.")] = None,
    learning_rate: Annotated[float | None, _setting("learning_rate", "Peak learning rate.")] = None,
    decay_lr: Annotated[
        bool | None, _setting("decay_lr", "Decay the learning rate, or keep it constant.")
    ] = None,
    warmup_iters: Annotated[int | None, _setting("warmup_iters", "Linear warm-up steps.")] = None,
    lr_decay_iters: Annotated[
        int | None, _setting("lr_decay_iters", "Step where the decay ends (default: --iters).")
    ] = None,
    min_lr: Annotated[float | None, _setting("min_lr", "Learning rate at the end of the decay.")] = None,
    weight_decay: Annotated[float | None, _setting("weight_decay")] = None,
    beta1: Annotated[float | None, _setting("beta1")] = None,
    beta2: Annotated[float | None, _setting("beta2")] = None,
    grad_clip: Annotated[float | None, _setting("grad_clip", "Max gradient norm (0: off).")] = None,
    optimizer: Annotated[
        OptimizerKind | None,
        _setting("optimizer", "adamw, or muon (Muon for the blocks' matrices, AdamW for the rest)."),
    ] = None,
    muon_lr: Annotated[float | None, _setting("muon_lr", "Muon's peak learning rate.")] = None,
    muon_momentum: Annotated[float | None, _setting("muon_momentum", "Muon's momentum.")] = None,
    lr_schedule: Annotated[
        Schedule | None, _setting("lr_schedule", "cosine, or wsd (warm-up, stable, linear decay at the end).")
    ] = None,
    cooldown: Annotated[float | None, _setting("cooldown", "wsd: share of the steps spent decaying.")] = None,
    chat: Annotated[
        Path | None, typer.Option("--chat", help='Chat fine-tuning data: JSONL of {"messages": [...]}.')
    ] = None,
    init: Annotated[
        str | None, typer.Option("--init", help="Start from a run, or a llama GGUF (store name).")
    ] = None,
    lora_rank: Annotated[
        int | None, _setting("lora_rank", "LoRA rank for --init fine-tuning (0: full).")
    ] = None,
    lora_alpha: Annotated[
        float | None, _setting("lora_alpha", "LoRA scale numerator (alpha / rank).")
    ] = None,
    eval_interval: Annotated[
        int | None, _setting("eval_interval", "Steps between evals + checkpoints.")
    ] = None,
    eval_iters: Annotated[int | None, _setting("eval_iters", "Batches per eval.")] = None,
    log_interval: Annotated[int | None, _setting("log_interval", "Steps between progress updates.")] = None,
    sample_tokens: Annotated[
        int | None, _setting("sample_tokens", "Tokens of sample text at each eval.")
    ] = None,
    device: Annotated[Device | None, _setting("device", "Where to train (auto: cuda > mps > cpu).")] = None,
    threads: Annotated[
        int | None, _setting("threads", "CPU threads per process (0: the cores other programs leave free).")
    ] = None,
    dtype: Annotated[DType | None, _setting("dtype", "Training precision (auto: bf16/fp16 on CUDA).")] = None,
    compile: Annotated[bool | None, _setting("compile", "torch.compile the model.")] = None,
    seed: Annotated[int | None, _setting("seed")] = None,
    tensorboard: Annotated[
        bool, typer.Option("--tensorboard", help="Also write TensorBoard event files (run/tensorboard).")
    ] = False,
    as_json: Annotated[bool, JSON_OPTION] = False,
) -> None:
    """Train a GPT on your text (default: a llama-style model with Muon); torchrun runs it on several GPUs.

    Metrics go to <run>/metrics.jsonl as training goes; `selfhost train runs` shows them."""
    from selfhost import paths
    from selfhost.errors import UsageError
    from selfhost.train.common import require_torch
    from selfhost.train.gpt.config import TrainConfig, build_config, check_name

    require_torch()
    from selfhost.train.gpt import trainer

    out_ = Output(as_json)
    given = locals()
    overrides = {
        k: given[k] for k in TrainConfig.model_fields if k not in options.NO_FLAG and given[k] is not None
    }
    if resume and (preset is not None or config is not None):
        raise UsageError(
            "--resume continues a run with its own settings; --preset and --config are for new runs",
            hint="drop them; flags such as --iters can still extend the run",
        )
    if init is not None and preset is None and config is None:
        preset = options.FINETUNE_PRESET
    cfg = build_config(preset, config, overrides)
    if name is None:
        source = chat or data
        name = (out.name if out else f"{source.stem}-gpt" if source else "my-gpt").lower()
    check_name(name)
    run_dir = out or paths.runs_dir() / name
    if init is not None or chat is not None:
        if resume or estimate:
            raise UsageError("--resume and --estimate are for training from scratch, not --init fine-tuning")
        _finetune(out_, cfg, init, chat, data, name, run_dir, export_type)
        return
    req = trainer.TrainRequest(config=cfg, run_dir=run_dir, data=data, resume=resume, overrides=overrides,
                               tensorboard=tensorboard)  # fmt: skip
    if estimate:
        _estimate(out_, req)
    else:
        _train_and_export(out_, req, name, export, export_type)


def _finetune(out: Output, cfg: Any, init: str | None, chat: Path | None, data: Path | None, name: str,
              run_dir: Path, export_type: ExportType) -> None:  # fmt: skip
    from selfhost.errors import UsageError
    from selfhost.train.gpt import finetune

    if init is None:
        raise UsageError("--chat fine-tunes a model you have", hint="add --init RUN_OR_MODEL")
    if (chat is None) == (data is None):
        raise UsageError("fine-tuning needs one of --chat FILE.jsonl or --data TEXT")
    req = finetune.FinetuneRequest(cfg, init, chat, name, run_dir, export_type, data=data)
    done = out.run(_with_step_details(finetune.train(req)))
    out.result(done, lambda d: _print_finetuned(out, d))


def _print_finetuned(out: Output, done: Any) -> None:
    took = fmt_duration(done.elapsed_s)
    out.console.print(f"done: {done.step} steps in {took}, loss {done.train_loss:.4f}, "
                      f"{fmt_count(done.trainable)} parameters trained", markup=False)  # fmt: skip
    out.console.print(f"exported {done.gguf} ({fmt_bytes(done.size)})", markup=False)
    if done.name:
        out.console.print(f"registered as '{done.name}': selfhost chat {done.name}", markup=False)


def _estimate(out: Output, req: Any) -> None:
    from selfhost.train.gpt import estimate, trainer

    est = trainer.estimate_run(req)
    metrics = estimate.estimate_metrics(est, req.config)
    lines = "\n".join(_estimate_lines(metrics, est.device))
    out.result({**metrics, "device": est.device}, lambda _: out.console.print(lines, markup=False))


def _train_and_export(out: Output, req: Any, name: str, export: bool, export_type: ExportType) -> None:
    """Train, then (rank 0 only) write the curves, export the best weights and print the result."""
    from selfhost.cli.common import curves_png
    from selfhost.train.gpt import trainer

    done = out.run(_with_step_details(trainer.train(req)), on_event=lambda ev: _show_eval(out, ev))
    if not done.is_master:  # the other ranks of a DDP run: rank 0 reports and exports
        return
    curves = curves_png(done.run_dir)
    exported = None
    if export:
        better = done.best is not None and (done.best_val_loss or math.inf) < done.val_loss
        if better and not out.json_mode:
            out.err.print(f"exporting the best weights: val loss {done.best_val_loss:.4f}", markup=False)
        exported = _export(out, done.best or done.checkpoint, name, export_type)
    out.result({"run": done, "curves": curves, "export": exported}, lambda v: _print_trained(out, v))


def export(
    checkpoint: Annotated[
        Path, typer.Argument(help="Run folder (its best.pt, else ckpt.pt), a .pt file or a run name.")
    ],
    name: Annotated[
        str | None, typer.Option("--name", "-n", help="Store name (default: the run's name).")
    ] = None,
    export_type: Annotated[
        ExportType, typer.Option("--type", "-t", case_sensitive=False, help="GGUF tensor type.")
    ] = "f16",
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="GGUF path (default: models folder).")
    ] = None,
    register: Annotated[
        bool, typer.Option("--register/--no-register", help="Add it to the local store.")
    ] = True,
    as_json: Annotated[bool, JSON_OPTION] = False,
) -> None:
    """Write a checkpoint as a GGUF (llama.cpp `gpt2`) and register it in the store."""
    from selfhost.train import runs
    from selfhost.train.common import require_torch

    require_torch()
    out = Output(as_json)
    ckpt = runs.find_checkpoint(checkpoint)
    run = ckpt if ckpt.is_dir() else ckpt.parent
    exported = _export(out, ckpt, name or run.name.lower(), export_type, output, register)
    out.result(exported, lambda e: _print_exported(out, e))


def sample(
    checkpoint: Annotated[
        Path, typer.Argument(help="Run folder (its best.pt, else ckpt.pt), a .pt file or a run name.")
    ],
    prompt: Annotated[str, typer.Option("--prompt", "-p")] = "",
    max_tokens: Annotated[int, typer.Option("--max-tokens", "-m")] = 200,
    temperature: Annotated[float, typer.Option("--temperature", "-t")] = 0.8,
    top_k: Annotated[int | None, typer.Option("--top-k")] = 200,
    seed: Annotated[int | None, typer.Option()] = None,
    device: Annotated[str, typer.Option()] = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="Print {prompt, text} as JSON at the end.")] = False,
) -> None:
    """Generate text from a PyTorch checkpoint (streamed as it is generated)."""
    from selfhost.train.common import require_torch

    require_torch()
    from selfhost.train import runs
    from selfhost.train.gpt.sample import generate

    out = Output(as_json)
    pieces = generate(runs.find_checkpoint(checkpoint), prompt, max_tokens=max_tokens,
                      temperature=temperature, top_k=top_k, seed=seed, device=device)  # fmt: skip
    text, started = [], False
    for piece in pieces:  # the first piece comes once the model is loaded (and the prompt checked)
        if isinstance(piece, Notice):
            out.notice(piece.message, piece.level)
            continue
        if not as_json and not started:
            out.console.print(prompt, end="", markup=False, highlight=False)
        started = True
        text.append(piece)
        if not as_json:
            out.console.print(piece, end="", markup=False, highlight=False)
    if as_json:
        out.result({"prompt": prompt, "text": "".join(text)})
    else:
        out.console.print(prompt if not started else "", markup=False, highlight=False)


# -- helpers ------------------------------------------------------------------------------------
def _export(
    out: Output,
    ckpt: Path,
    name: str,
    export_type: ExportType,
    output: Path | None = None,
    register: bool = True,
) -> Any:
    from selfhost.train.gpt.export import export_checkpoint

    return out.run(export_checkpoint(ckpt, name, dtype=export_type, dest=output, register=register))


def _print_exported(out: Output, exported: Any) -> None:
    size = fmt_bytes(exported.size)
    out.console.print(f"exported {exported.path} ({size}, {exported.quant})", markup=False)
    if exported.name is not None:
        hint = f'selfhost chat {exported.name} --raw -p "..."'
        out.console.print(f"registered as '{exported.name}': {hint}", markup=False)


def _print_trained(out: Output, summary: dict[str, Any]) -> None:
    """What a finished run leaves on stdout: its summary, where the curves are, the export."""
    from selfhost.cli.common import draw_curves

    done = summary["run"]
    took = fmt_duration(done.elapsed_s)
    out.console.print(f"done: {done.step} steps in {took}, val loss {done.val_loss:.4f}", markup=False)
    draw_curves(out, done.run_dir)
    if summary["curves"] is not None:
        out.console.print(f"curves: {summary['curves']}", markup=False)
    if summary["export"] is not None:
        _print_exported(out, summary["export"])


def _estimate_lines(m: Mapping[str, float], device: str) -> list[str]:
    """The cost estimate (estimate.estimate_metrics) in four lines."""
    arch = f"{m['n_layer']}L/{m['n_head']}H/{m['n_embd']}d, block {m['block_size']}"
    enough = "enough" if m["train_tokens"] >= m["compute_optimal_tokens"] else "less"
    rate = f"{m['tokens_per_s']:,.0f} tokens/s measured" if m.get("tokens_per_s") else "not measured"
    eta = m.get("eta_s")
    return [
        f"model    {fmt_count(m['n_params'])} params ({arch}), {fmt_count(m['flops_per_token'])} FLOPs/token",
        f"run      {m['tokens_per_iter']:,} tokens/iter x {m['iters']:,} iters = "
        f"{fmt_count(m['total_tokens'])} tokens ({m['epochs']:.1f} epochs of "
        f"{fmt_count(m['train_tokens'])} train tokens), "
        f"{m['total_flops']:.2e} FLOPs",
        f"data     compute-optimal ~{fmt_count(m['compute_optimal_tokens'])} tokens (20/param); "
        f"you give {fmt_count(m['train_tokens'])} ({enough})",
        f"speed    {device}: {rate} -> ETA {fmt_duration(eta) if eta is not None else '?'}",
    ]


def _with_step_details(events: Iterable[Event]) -> Iterable[Event]:
    """The training bar's text: loss, lr, tokens/s, MFU and ETA of the last logged step."""
    for ev in events:
        if isinstance(ev, Progress) and ev.task == "train" and "loss" in ev.metrics:
            m = ev.metrics
            mfu = f" | MFU {m['mfu'] * 100:.1f}%" if "mfu" in m else ""
            detail = (f"loss {m['loss']:.4f} | lr {m['lr']:.2e} | {m['tokens_per_s']:,.0f} tok/s{mfu} "
                      f"| ETA {fmt_duration(m['eta_s'])}")  # fmt: skip
            ev = dataclasses.replace(ev, detail=detail)
        yield ev


def _show_eval(out: Output, ev: Event) -> bool:
    """The estimate when the run starts, and one line per eval (with the checkpoint it wrote)."""
    if isinstance(ev, Progress) and ev.task == "train" and "n_params" in ev.metrics:
        out.err.print("\n".join(_estimate_lines(ev.metrics, ev.detail)), markup=False, highlight=False)
        return True
    if isinstance(ev, Progress) and ev.task == "eval":
        saved = f" -> {ev.detail}" if ev.detail else ""
        m = ev.metrics
        losses = f"train loss {m['train_loss']:.4f}, val loss {m['val_loss']:.4f}"
        out.err.print(f"step {int(ev.done)}: {losses}{saved}", markup=False, highlight=False)
        return True
    return False
