"""Train 2-layer fla_gsa models on MQAR and record recall accuracy against recurrent state size.

    python -m benchmarks.recall.train --preset reduced --out results/recall     # GPU, ~8 minutes, a first look
    python -m benchmarks.recall.train --preset full --out results/recall        # GPU, equal steps, ~2.5 h on one GPU
    python -m benchmarks.recall.train --smoke --out /tmp/recall                  # CPU, seconds

Every (model size, learning rate) is one *run*: train on a mixture of MQAR slices, then measure exact-
match accuracy at the labeled (value-recall) positions of each test slice. Each finished run appends one
row per test slice to ``<out>/results.csv`` at once, and a rerun of the same command skips the runs
already there, so a sweep can be spread over several short GPU leases (``--max-total-s`` stops it
before a lease runs out). ``--models``, ``--d-models``, ``--spec`` and ``--lrs`` pick a subset.
See ``benchmarks/recall/README.md``.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import datetime
import hashlib
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

try:
    import fcntl
except ImportError:  # not on Windows: shards there need separate --out folders
    fcntl = None

from benchmarks.recall.models import (DEFAULT_GRID, KINDS, ModelSpec, build_model, conv_state_size, num_params,
                                      state_size)
from benchmarks.recall.mqar import MQARSlice, make_split

CSV_NAME = "results.csv"
PNG_NAME = "mqar_accuracy_vs_state.png"
COLUMNS = [
    "run_id", "setup", "model", "layer_types", "d_model", "num_heads", "head_dim", "num_slots", "params",
    "state_size", "conv_state_size", "lr", "seq_len", "num_kv_pairs", "accuracy", "correct", "total",
    "test_loss", "train_loss", "steps", "train_s", "warmup_s", "eval_s", "device", "dtype", "seed",
    "finished_at",
]

ZOOLOGY_TRAIN_MIX = "64:4,128:8,256:16,256:32,256:64"  # the training mixture of Based's Figure 2
PRESETS = {
    # seconds on 2 CPU cores: every model kind, tiny, a few steps; checks the plumbing, learns nothing
    "smoke": dict(specs=["gsa:32:2:8", "gla:32:2", "abc:32:2:8", "attention:32:2", "hybrid:32:2:8"],
                  lrs=[3e-3], train_slices="64:4", test_slices="64:4,64:8", train_examples=128,
                  test_examples=32, batch_size=8, eval_batch_size=32, steps=3, time_per_run=None,
                  max_total_s=None, device="cpu", threads=1, dtype="fp32"),
    # one GPU, ~8 minutes: 5 kinds x 3 sizes, one learning rate, 20 s of training each
    "reduced": dict(specs=None, lrs=[3e-3], train_slices=ZOOLOGY_TRAIN_MIX, test_slices="256:16,256:64",
                    train_examples=20_000, test_examples=1_000, batch_size=256, eval_batch_size=500,
                    steps=4_000, time_per_run=20.0, max_total_s=450.0, device=None, threads=None, dtype="bf16"),
    # the sweep proper: 4 learning rates, the same 8000 steps for every model (60 runs of 1-3 minutes each
    # in bf16 on an H200; resumable, --shard). A time cap per run is not comparable across sizes: a
    # 2026-11-22 sweep capped at 380 s gave the d_model-256 models 600 steps and the 64 ones 5000.
    "full": dict(specs=None, lrs=[3e-4, 1e-3, 3e-3, 1e-2], train_slices=ZOOLOGY_TRAIN_MIX,
                 test_slices="256:16,256:64", train_examples=20_000, test_examples=1_000, batch_size=128,
                 eval_batch_size=500, steps=8_000, time_per_run=None, max_total_s=540.0, device=None,
                 threads=None, dtype="bf16"),
}


@dataclasses.dataclass(frozen=True)
class Setup:
    """Everything but the model and learning rate that decides a run's result (hashed into ``setup``)."""

    train_slices: tuple
    test_slices: tuple
    train_examples: int
    test_examples: int
    vocab_size: int
    batch_size: int
    steps: int
    time_per_run: float | None
    weight_decay: float
    warmup: float
    grad_clip: float
    short_conv: bool
    dtype: str
    seed: int

    @property
    def tag(self) -> str:
        text = json.dumps(dataclasses.asdict(self), sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:10]


# -- data -----------------------------------------------------------------------------------------

class EpochSampler:
    """Batches of indices into ``n`` examples, a fresh random order every epoch (as a shuffling DataLoader)."""

    def __init__(self, n: int, batch_size: int, gen: torch.Generator):
        self.n, self.batch_size, self.gen = n, min(batch_size, n), gen
        self.order, self.pos = torch.randperm(n, generator=gen), 0

    def next(self) -> torch.Tensor:
        if self.pos + self.batch_size > self.n:
            self.order, self.pos = torch.randperm(self.n, generator=self.gen), 0
        idx = self.order[self.pos:self.pos + self.batch_size]
        self.pos += self.batch_size
        return idx


class TrainStream:
    """Batches from a mixture of slices: each batch comes from one slice (one sequence length), picked
    with probability proportional to its number of examples. ``data``: per slice, ``(inputs, query
    positions, values)`` already on the training device; yields the same triple for a batch."""

    def __init__(self, data, batch_size: int, seed: int):
        self.gen = torch.Generator().manual_seed(seed)
        self.data = data
        self.samplers = [EpochSampler(len(d[0]), batch_size, self.gen) for d in data]
        self.weights = torch.tensor([float(len(d[0])) for d in data])

    def next(self):
        i = int(torch.multinomial(self.weights, 1, generator=self.gen))
        idx = self.samplers[i].next().to(self.data[i][0].device)
        return tuple(x[idx] for x in self.data[i])

    def one_batch_per_slice(self):
        """The first batch of every slice (for warming up), leaving the sampling stream untouched."""
        for (inputs, positions, values), sampler in zip(self.data, self.samplers):
            yield inputs[:sampler.batch_size], positions[:sampler.batch_size], values[:sampler.batch_size]


# -- training and evaluation ------------------------------------------------------------------------

def recall_logits(model, inputs: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Logits ``[B, n, vocab]`` at the query positions ``[B, n]`` only: the LM head is applied to the
    hidden states there, never to the whole ``[B, T, vocab]`` (and the fixed shape needs no host sync)."""
    hidden = model.model(input_ids=inputs, use_cache=False).last_hidden_state
    index = positions.unsqueeze(-1).expand(-1, -1, hidden.shape[-1])
    return model.lm_head(hidden.gather(1, index)).float()


def lr_factor(progress: float, warmup: float) -> float:
    """Linear warmup over the first ``warmup`` of the run, then cosine decay to 0."""
    if progress < warmup:
        return max(progress / warmup, 1e-3)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (progress - warmup) / max(1e-9, 1 - warmup))))


def autocast(device: torch.device, dtype: str):
    if dtype == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype={"bf16": torch.bfloat16, "fp16": torch.float16}[dtype])


def _loss(model, batch, device, dtype):
    inputs, positions, values = batch
    with autocast(device, dtype):
        logits = recall_logits(model, inputs, positions)
    return F.cross_entropy(logits.flatten(0, 1), values.flatten())


def warm_up(model, stream: "TrainStream", device: torch.device, dtype: str) -> float:
    """One forward and backward per training sequence length, gradients thrown away: the kernels are
    compiled (Triton) before the clock of the run starts. Returns the seconds it took."""
    t0 = time.perf_counter()
    model.train()
    for batch in stream.one_batch_per_slice():
        _loss(model, batch, device, dtype).backward()
    model.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def train_run(model, stream: TrainStream, setup: Setup, lr: float, device: torch.device):
    """Train ``model`` for ``setup.steps`` steps or ``setup.time_per_run`` seconds, whichever ends first;
    the learning-rate schedule follows the larger of the two progress fractions. Returns
    ``(steps, train_s, last_loss)``."""
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embeddings" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embeddings" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": setup.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr,
                            fused=device.type == "cuda")  # one kernel for all parameters, not one per tensor
    model.train()
    step, losses, last_loss = 0, [], float("nan")
    start = time.perf_counter()
    while step < setup.steps:
        progress = step / setup.steps
        if setup.time_per_run is not None:
            progress = max(progress, (time.perf_counter() - start) / setup.time_per_run)
        if progress >= 1:
            break
        for group in opt.param_groups:
            group["lr"] = lr * lr_factor(progress, setup.warmup)
        loss = _loss(model, stream.next(), device, setup.dtype)
        loss.backward()
        if setup.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), setup.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach())
        step += 1
        if step % 20 == 0:  # sync now and then: the clock must see the GPU's work
            last_loss = torch.stack(losses).mean().item()
            losses = []
    if losses:
        last_loss = torch.stack(losses).mean().item()
    return step, time.perf_counter() - start, last_loss


@torch.no_grad()
def evaluate(model, data, batch_size: int, device: torch.device, dtype: str):
    """Exact-match accuracy at the labeled positions: ``(correct, total, mean loss)``."""
    model.eval()
    correct, total, loss_sum = 0, 0, 0.0
    for i in range(0, len(data), batch_size):
        inputs = data.inputs[i:i + batch_size].to(device)
        positions = data.query_positions[i:i + batch_size].to(device)
        values = data.values[i:i + batch_size].to(device)
        with autocast(device, dtype):
            logits = recall_logits(model, inputs, positions)
        correct += int((logits.argmax(-1) == values).sum())
        total += values.numel()
        loss_sum += float(F.cross_entropy(logits.flatten(0, 1), values.flatten(), reduction="sum"))
    return correct, total, loss_sum / max(total, 1)


# -- the sweep --------------------------------------------------------------------------------------

def read_done(csv_path: str) -> set:
    """``(run_id, setup, seq_len, num_kv_pairs)`` of the rows already in the CSV."""
    if not os.path.exists(csv_path):
        return set()
    with open(csv_path, newline="") as f:
        return {(r["run_id"], r["setup"], int(r["seq_len"]), int(r["num_kv_pairs"])) for r in csv.DictReader(f)}


def append_rows(csv_path: str, rows: list[dict]) -> None:
    """Append ``rows`` (with the header if the file is new) under an exclusive lock: the shards of a
    sweep (``--shard``) write one CSV from several processes."""
    with open(csv_path, "a", newline="") as f:
        if fcntl is not None:
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            writer = csv.DictWriter(f, fieldnames=COLUMNS)
            # the position is the file's end as of open(): another shard may have written since, so
            # look again under the lock before deciding on the header
            if f.seek(0, os.SEEK_END) == 0:
                writer.writeheader()
            writer.writerows(rows)
            f.flush()
            os.fsync(f.fileno())
        finally:
            if fcntl is not None:
                fcntl.flock(f, fcntl.LOCK_UN)


def _fmt_s(s: float) -> str:
    return f"{int(s // 60)}m{int(s % 60):02d}s"


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.recall.train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="reduced",
                   help="defaults for everything below (default: reduced)")
    p.add_argument("--smoke", action="store_true", help="same as --preset smoke")
    p.add_argument("--out", default="results/recall", help="folder for results.csv and the plot")
    p.add_argument("--models", help=f"comma-separated kinds to keep, from {','.join(KINDS)}")
    p.add_argument("--d-models", help="comma-separated d_model values to keep (e.g. 64,128)")
    p.add_argument("--spec", action="append",
                   help="a model kind:d_model:heads[:slots] (repeatable; replaces the default grid)")
    p.add_argument("--lrs", help="comma-separated learning rates")
    p.add_argument("--train-slices", help="seq_len:num_kv_pairs,... of the training mixture")
    p.add_argument("--test-slices", help="seq_len:num_kv_pairs,... to measure accuracy on")
    p.add_argument("--train-examples", type=int, help="training sequences per training slice")
    p.add_argument("--test-examples", type=int, help="test sequences per test slice")
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--eval-batch-size", type=int)
    p.add_argument("--steps", type=int, help="most optimizer steps per run")
    p.add_argument("--time-per-run", type=float, help="most seconds of training per run (0: no limit)")
    p.add_argument("--max-total-s", type=float,
                   help="start no run that would end after this many seconds (0: no limit); rerun to continue")
    p.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay (torch's default)")
    p.add_argument("--warmup", type=float, default=0.02, help="fraction of a run spent warming up the lr")
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--no-short-conv", action="store_true", help="no short convolutions in recurrent layers")
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"),
                   help="autocast dtype (fp32: none; default: bf16 on the GPU presets, fp32 for smoke)")
    p.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    p.add_argument("--seed", type=int, default=0, help="data and initialization seed")
    p.add_argument("--threads", type=int, help="torch CPU threads (smoke: 1, robust on a busy machine)")
    p.add_argument("--shard", help="I/N: run only every N-th run, starting at I (0-based); start N processes "
                   "with the same arguments and I = 0..N-1 to share one GPU or several, all writing one CSV")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--dry-run", action="store_true", help="list the runs (and whether done) and exit")
    args = p.parse_args(argv)
    if args.smoke:
        args.preset = "smoke"
    preset = PRESETS[args.preset]
    for key, value in preset.items():
        if key == "specs":
            continue
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if isinstance(args.lrs, str):
        args.lrs = [float(x) for x in args.lrs.split(",")]
    if args.time_per_run is not None and args.time_per_run <= 0:
        args.time_per_run = None
    if args.max_total_s is not None and args.max_total_s <= 0:
        args.max_total_s = None
    if args.spec:
        specs = [ModelSpec.parse(s) for s in args.spec]
    elif preset["specs"] is not None:
        specs = [ModelSpec.parse(s) for s in preset["specs"]]
    else:
        specs = list(DEFAULT_GRID)
    if args.models:
        kinds = args.models.split(",")
        bad = [k for k in kinds if k not in KINDS]
        if bad:
            p.error(f"--models: unknown kinds {bad}; choose from {list(KINDS)}")
        specs = [s for s in specs if s.kind in kinds]
    if args.d_models:
        ds = {int(x) for x in args.d_models.split(",")}
        specs = [s for s in specs if s.d_model in ds]
    if not specs:
        p.error("no model left after --models/--d-models")
    args.specs = specs
    args.shard_index, args.shard_count = 0, 1
    if args.shard:
        try:
            args.shard_index, args.shard_count = (int(x) for x in args.shard.split("/"))
        except ValueError:
            p.error(f"--shard must be I/N, got {args.shard!r}")
        if not 0 <= args.shard_index < args.shard_count:
            p.error(f"--shard I/N needs 0 <= I < N, got {args.shard!r}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return sweep(args)
    finally:
        torch.set_num_threads(threads)  # called in-process (tests), leave the caller's setting alone


def sweep(args) -> int:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    train_slices = tuple(MQARSlice.parse(s) for s in args.train_slices.split(","))
    test_slices = tuple(MQARSlice.parse(s) for s in args.test_slices.split(","))
    setup = Setup(train_slices=tuple(map(str, train_slices)), test_slices=tuple(map(str, test_slices)),
                  train_examples=args.train_examples, test_examples=args.test_examples,
                  vocab_size=args.vocab_size, batch_size=args.batch_size, steps=args.steps,
                  time_per_run=args.time_per_run, weight_decay=args.weight_decay, warmup=args.warmup,
                  grad_clip=args.grad_clip, short_conv=not args.no_short_conv, dtype=args.dtype, seed=args.seed)
    os.makedirs(args.out, exist_ok=True)
    csv_path = os.path.join(args.out, CSV_NAME)
    done = read_done(csv_path)

    # learning-rate-major: a sweep cut short (or the first wave of shards) has every model at the first lr
    runs = [(spec, lr) for lr in args.lrs for spec in args.specs]
    runs = runs[args.shard_index::args.shard_count]
    todo = []
    for spec, lr in runs:
        run_id = f"{spec.name}-lr{lr:g}-s{args.seed}"
        finished = all((run_id, setup.tag, sl.seq_len, sl.num_kv_pairs) in done for sl in test_slices)
        if args.dry_run:
            print(f"{'done' if finished else 'todo'}  {run_id}")
        if not finished:
            todo.append((spec, lr, run_id))
    print(f"[recall] {len(runs)} runs ({len(runs) - len(todo)} already in {csv_path}), setup {setup.tag}, "
          f"device {device}, train {args.train_slices} x{args.train_examples}, test {args.test_slices} "
          f"x{args.test_examples}, steps <= {args.steps}"
          + (f", <= {args.time_per_run:g} s/run" if args.time_per_run else ""), flush=True)
    if args.dry_run:
        return 0

    t_start = time.perf_counter()
    if todo:
        max_len = max(sl.seq_len for sl in train_slices + test_slices)
        train_data = make_split("train", train_slices, args.train_examples, args.vocab_size, args.seed)
        test_data = make_split("test", test_slices, args.test_examples, args.vocab_size, args.seed)
        # on the device once for the whole sweep
        stream_data = [(d.inputs.to(device), d.query_positions.to(device), d.values.to(device)) for d in train_data]
        print(f"[recall] data ready in {time.perf_counter() - t_start:.1f}s", flush=True)
    durations = []
    for n, (spec, lr, run_id) in enumerate(todo, 1):
        elapsed = time.perf_counter() - t_start
        if args.max_total_s is not None and durations:
            expected = max(durations)
            if elapsed + expected > args.max_total_s:
                print(f"[recall] stopping before run {n}/{len(todo)}: {_fmt_s(elapsed)} spent, a run takes "
                      f"~{expected:.0f}s, --max-total-s {args.max_total_s:g}. {len(todo) - n + 1} runs left: "
                      f"rerun the same command to continue.", flush=True)
                break
        t_run = time.perf_counter()
        torch.manual_seed(args.seed)
        model = build_model(spec, args.vocab_size, max_len, short_conv=setup.short_conv).to(device)
        stream = TrainStream(stream_data, args.batch_size, args.seed)
        warmup_s = warm_up(model, stream, device, args.dtype)
        steps, train_s, train_loss = train_run(model, stream, setup, lr, device)
        t_eval = time.perf_counter()
        rows = []
        for data in test_data:
            correct, total, test_loss = evaluate(model, data, args.eval_batch_size, device, args.dtype)
            sl = data.slice
            rows.append(dict(
                run_id=run_id, setup=setup.tag, model=spec.kind, layer_types="+".join(model.config.layer_types),
                d_model=spec.d_model, num_heads=spec.num_heads, head_dim=spec.head_dim,
                num_slots=spec.num_slots if spec.num_slots is not None else "", params=num_params(model),
                state_size=state_size(model, sl.seq_len), conv_state_size=conv_state_size(model), lr=f"{lr:g}",
                seq_len=sl.seq_len, num_kv_pairs=sl.num_kv_pairs, accuracy=f"{correct / max(total, 1):.5f}",
                correct=correct, total=total, test_loss=f"{test_loss:.5f}", train_loss=f"{train_loss:.5f}",
                steps=steps, train_s=f"{train_s:.2f}", warmup_s=f"{warmup_s:.2f}", eval_s="",
                device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                dtype=args.dtype, seed=args.seed,
                finished_at=datetime.datetime.now().isoformat(timespec="seconds")))
        eval_s = time.perf_counter() - t_eval
        for row in rows:
            row["eval_s"] = f"{eval_s:.2f}"
        append_rows(csv_path, rows)
        durations.append(time.perf_counter() - t_run)
        del model, stream
        total_elapsed = time.perf_counter() - t_start
        eta = (len(todo) - n) * sum(durations) / len(durations)
        accs = " | ".join(f"{r['seq_len']}:{r['num_kv_pairs']} acc {float(r['accuracy']):.3f}" for r in rows)
        print(f"[{n}/{len(todo)}] {spec.name} state {rows[0]['state_size']} lr {lr:g}: {steps} steps "
              f"{train_s:.1f}s (warm-up {warmup_s:.1f}s) loss {train_loss:.3f} | {accs} "
              f"[{_fmt_s(total_elapsed)} elapsed, eta {_fmt_s(eta)}]", flush=True)

    if os.path.exists(csv_path):
        from benchmarks.recall.plot import load_rows, plot, summarize
        rows = [r for r in load_rows(csv_path) if r["setup"] == setup.tag]
        print(summarize(rows))
        if not args.no_plot:
            png = os.path.join(args.out, PNG_NAME)
            if plot(rows, png):
                print(f"[recall] plot: {png}")
    print(f"[recall] done in {_fmt_s(time.perf_counter() - t_start)}; csv: {csv_path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
