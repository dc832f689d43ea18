"""The training loop: AdamW on the trainable tensors only, data-parallel with accelerate, resumable.

Per step every process takes its own ``batch_size`` rows (``grad_accum`` times), backpropagates the
objective, gradients are averaged over processes, clipped (per agent in the inner stage, so agents stay
independent; jointly otherwise), and AdamW + a cosine schedule with linear warm-up take a step.

The rows of step ``s`` are a pure function of ``(seed, s)``, and nothing else in a step is random, so a
run resumed from a checkpoint continues exactly as the uninterrupted run would have.

Outputs under ``run.output``: ``train_log.jsonl`` (one JSON object per logged step and per validation),
``checkpoints/`` (see ``recursivemas.train.state``), ``final/`` (the trained links as a link checkpoint,
loadable with ``RecursiveMAS.from_pretrained``), ``curves.png``, and ``report.json``, written last: it
marks a finished run. ``train.lock`` holds off a second run on the same folder (``OutputLock``).

A resume record also carries ``data_digest`` (a hash of the rows and of each data file), so a run
resumed on edited data is refused instead of silently training on other rows.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from torch import nn
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from recursivemas.checkpoint import load_links
from recursivemas.errors import CheckpointError, ConfigError
from recursivemas.fileio import WRITE_ERRORS, atomic_write, check_writable_dir, write_failure
from recursivemas.links import widen
from recursivemas.loading import DTYPES
from recursivemas.memory import PeakMemory
from recursivemas.presets import build_from_specs, build_preset
from recursivemas.system import RecursiveMAS
from recursivemas.train.config import SystemSection, TrainConfig
from recursivemas.train.curves import plot_curves
from recursivemas.train.data import Splits, TrainRow, build_splits, data_digest
from recursivemas.train.objectives import InnerObjective, LossOutput, build_objective, loss_totals
from recursivemas.train.state import (
    OutputLock,
    TrainState,
    clean_partial,
    latest_checkpoint,
    load_state,
    save_state,
)

logger = logging.getLogger(__name__)
LOG_NAME = "train_log.jsonl"
REPORT_NAME = "report.json"
FINAL_NAME = "final"
DATA_DIGEST = "data_digest"
VALIDATION_KEY_OFFSET = 1 << 40  # precomputed-state keys of validation rows never clash with training rows
RESUME_INVARIANT = ("stage", "trainable", "system", "data", "objective", "optim", "seed", "processes")


# --- building ----------------------------------------------------------------------------------------


def build_system(cfg: SystemSection, device: str) -> RecursiveMAS:
    """The system to train on ``device``: links from ``cfg.links`` if given, else from ``cfg.init``,
    then outer links widened as ``cfg.link_windows`` says."""
    settings = {
        "dtype": DTYPES[cfg.dtype],
        "device": device,
        "init": "identity" if cfg.links else cfg.init,
        "rounds": cfg.rounds,
        "latent_steps": cfg.latent_steps,
    }
    if cfg.agents is not None:
        system = build_from_specs(cfg.agents, cfg.pattern, **settings)
    else:
        system = build_preset(cfg.preset, **settings)
    if cfg.links:
        load_links(system, cfg.links)
    for name, window in cfg.link_windows.items():
        outer = system.links["outer"]
        if name not in outer:
            raise ConfigError(
                f"system.link_windows names {name!r}, but this system's outer links are {list(outer)}"
            )
        system.set_link(widen(outer[name], window))
    return system


def _check_contexts(system: RecursiveMAS, splits: Splits) -> None:
    """Every row's private context must go to an agent of the system."""
    named = {name for row in [*splits.train, *splits.validation] for name in row.context}
    unknown = sorted(named - set(system.agents))
    if unknown:
        raise ConfigError(
            f"training rows give private context to {unknown}, which are not agents of this system "
            f"({', '.join(system.agents)}); fix the rows or the relay source's 'sender'"
        )


def select_trainable(
    system: RecursiveMAS, stage: str, trainable: str, links: list[str] | None = None
) -> dict[str, nn.Parameter]:
    """Turn gradients on for the stage's links (only those named in ``links`` if given; and, for
    ``full``, every agent weight); off elsewhere.

    An outer stage may also name inner links (by agent, e.g. ``['critic', 'critic->solver']``): the
    answer loss then reaches that agent's inner link through its unrolled latent rollout, so its
    thoughts learn to keep what the receiver needs. Returns the trainable tensors by a stable name
    (``links.inner.planner.proj1.weight``, ``agents.planner.model.layers.0...``); a model shared by
    several agents is listed once.
    """
    system.links.requires_grad_(False)
    groups = [stage, "inner"] if stage == "outer" else [stage]
    known = {n: g for g in groups for n in system.links[g]}  # link name -> its group
    unknown = sorted(set(links or ()) - set(known))
    if unknown:
        extra = f" or inner links {list(system.links['inner'])}" if stage == "outer" else ""
        raise ConfigError(
            f"optim.links names {unknown}, which are not {stage} links of this system; "
            f"choose among {list(system.links[stage])}{extra}"
        )
    chosen = links if links is not None else list(system.links[stage])
    named = {
        f"links.{known[n]}.{n}.{k}": p
        for n in chosen
        for k, p in system.links[known[n]][n].named_parameters()
    }
    if trainable == "full":
        for name, model in system.models().items():
            named |= {f"agents.{name}.{n}": p for n, p in model.named_parameters()}
    for p in named.values():
        p.requires_grad_(True)
    return named


def clip_groups(system: RecursiveMAS, config: TrainConfig, named: dict[str, nn.Parameter]) -> dict:
    """Parameter groups clipped separately: one per agent's inner link (inner stage), else all together."""
    if config.stage == "inner" and config.trainable == "links":
        groups = {
            agent: [p for n, p in named.items() if n.startswith(f"links.inner.{agent}.")]
            for agent in system.agents
        }
        return {agent: params for agent, params in groups.items() if params}
    return {"all": list(named.values())}


# --- the loop ----------------------------------------------------------------------------------------


@dataclass
class TrainReport:
    """The end-of-run summary written to ``report.json``."""

    stage: str
    trainable: str
    steps: int
    processes: int
    seconds: float
    trainable_parameters: int
    frozen_parameters: int
    peak_memory_bytes: int
    memory_kind: str
    final_train_loss: float | None
    final_validation_loss: float | None
    validation: list[dict] = field(default_factory=list)
    replica_digests: list[str] = field(default_factory=list)
    output: str = ""


class RowOrder:
    """Row ``k`` of the endless training stream: epoch ``k // n`` is a permutation seeded by (seed, epoch)."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed = n, seed
        self._perms: dict[int, list[int]] = {}

    def __getitem__(self, k: int) -> int:
        epoch = k // self.n
        if epoch not in self._perms:
            perm = list(range(self.n))
            random.Random(f"order:{self.seed}:{epoch}").shuffle(perm)
            self._perms = {epoch: perm}
        return self._perms[epoch][k % self.n]


class Trainer:
    """Train one stage of a system's links (or its full weights) from a ``TrainConfig``."""

    def __init__(self, config: TrainConfig, command: str | None = None) -> None:
        self.config = config
        self.command = command
        self.output = Path(config.run.output)
        trackers = _available_trackers(config.run.trackers)
        self.accelerator = Accelerator(
            cpu=config.system.device == "cpu", log_with=trackers or None, project_dir=str(self.output)
        )
        self.main = self.accelerator.is_main_process
        if self.main:  # before any work: the output folder is writable and no other run uses it
            check_writable_dir(self.output, "the output folder (run.output / --output)")
            OutputLock(self.output).check_free()
        torch.manual_seed(config.run.seed)
        device = str(self.accelerator.device) if config.system.device == "auto" else config.system.device
        self.system = build_system(config.system, device)
        self.named = select_trainable(self.system, config.stage, config.trainable, config.optim.links)
        self.params = list(self.named.values())
        self.groups = clip_groups(self.system, config, self.named)
        self.objective = build_objective(self.system, config)
        self.splits: Splits = build_splits(config.data, sender=self.system.config.order[0])
        _check_contexts(self.system, self.splits)
        self.data_digest = data_digest(config.data, self.splits)
        opt = config.optim
        self.optimizer = torch.optim.AdamW(
            self.params, lr=opt.lr, betas=opt.betas, weight_decay=opt.weight_decay
        )
        self.scheduler = get_cosine_schedule_with_warmup(self.optimizer, opt.warmup_steps, opt.max_steps)
        self.order = RowOrder(len(self.splits.train), config.run.seed)
        self.step = 0
        if trackers:
            self.accelerator.init_trackers("recursivemas", config=_flat(config.model_dump()))

    # --- data ------------------------------------------------------------------------------------

    def rows_for(self, step: int, micro: int) -> tuple[list[TrainRow], list[int]]:
        """This process's rows (and their stable ids) for micro-batch ``micro`` of ``step``."""
        bs, world = self.config.optim.batch_size, self.accelerator.num_processes
        base = ((step * self.config.optim.grad_accum + micro) * world + self.accelerator.process_index) * bs
        ids = [self.order[k] for k in range(base, base + bs)]
        return [self.splits.train[i] for i in ids], ids

    # --- checkpoints -----------------------------------------------------------------------------

    def _resume_config(self) -> dict:
        """Everything a step's rows and update depend on (``optim.max_steps`` may change on resume), and
        the digest of the data itself."""
        dump = self.config.model_dump(mode="json")
        record = {k: dump[k] for k in ("stage", "trainable", "system", "data", "objective")}
        record["optim"] = {k: v for k, v in dump["optim"].items() if k != "max_steps"}
        record["seed"] = self.config.run.seed
        record["processes"] = self.accelerator.num_processes
        record[DATA_DIGEST] = self.data_digest
        return record

    def save(self) -> None:
        if self.main:
            save_state(
                self.output / "checkpoints",
                TrainState(
                    self.step,
                    dict(self.named),
                    self.optimizer.state_dict(),
                    self.scheduler.state_dict(),
                    self._resume_config(),
                ),
                self.config.run.keep_checkpoints,
            )
        self.accelerator.wait_for_everyone()

    def resume(self) -> bool:
        """Restore the newest checkpoint under the output directory; ``False`` if there is none.

        ``CheckpointError`` if the checkpoint was written with another config or other data;
        ``ConfigError`` if the run already finished (nothing is changed then).
        """
        root = self.output / "checkpoints"
        path = latest_checkpoint(root)
        if path is None:
            return False
        state = load_state(path)
        current = self._resume_config()
        changed = [k for k in RESUME_INVARIANT if state.config.get(k) != current[k]]
        if changed:
            raise CheckpointError(
                f"{path} was written with a different config (sections {changed} differ); resume with "
                f"the same config, or pick another --output"
            )
        _check_data(path, state.config.get(DATA_DIGEST), current[DATA_DIGEST])
        missing = sorted(set(self.named) - set(state.tensors))
        if missing:
            raise CheckpointError(
                f"{path} lacks trainable tensors {missing[:3]}...: not this run's checkpoint"
            )
        if state.step > self.config.optim.max_steps:
            raise CheckpointError(
                f"{path} is at step {state.step}, past optim.max_steps = {self.config.optim.max_steps}"
            )
        if state.step == self.config.optim.max_steps and _report_steps(self.output) == state.step:
            raise ConfigError(
                f"{self.output} holds a finished run (step {state.step} of optim.max_steps = "
                f"{state.step}, with its report and final links): nothing left to do, nothing was "
                f"changed. To train further, raise optim.max_steps (--max-steps) and --resume again; "
                f"to train anew, choose another --output"
            )
        with torch.no_grad():
            for name, p in self.named.items():
                p.copy_(state.tensors[name].to(p.device, p.dtype))
        self.optimizer.load_state_dict(state.optimizer)
        self.scheduler.load_state_dict(state.scheduler)
        self.step = state.step
        if self.main:
            _truncate_log(self.output / LOG_NAME, self.step)
        return True

    # --- steps -----------------------------------------------------------------------------------

    def train_step(self) -> dict:
        """One optimizer step; returns the logged record (losses averaged over processes)."""
        cfg = self.config.optim
        start = time.perf_counter()
        losses, metrics, rounds = [], {}, {}
        for micro in range(cfg.grad_accum):
            rows, ids = self.rows_for(self.step, micro)
            out: LossOutput = self.objective.loss(rows, ids)
            (out.loss / cfg.grad_accum).backward()
            losses.append(float(out.loss.detach()))
            for k, v in out.metrics.items():
                metrics[k] = metrics.get(k, 0.0) + v / cfg.grad_accum
            for k, v in out.round_grad_norms().items():
                rounds[k] = rounds.get(k, 0.0) + v / cfg.grad_accum
        self._average_gradients()
        lr = self.scheduler.get_last_lr()[0]  # the rate this update uses
        grad_norms = {
            group: float(nn.utils.clip_grad_norm_(params, cfg.clip if cfg.clip is not None else math.inf))
            for group, params in self.groups.items()
        }
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        record = {
            "kind": "train",
            "step": self.step,
            "loss": self._mean(sum(losses) / len(losses)),
            "lr": lr,
            "grad_norm": grad_norms,
            **{k: self._mean(v) for k, v in metrics.items()},
            "seconds": time.perf_counter() - start,
        }
        if rounds:
            record["round_grad_norm"] = {str(k): self._mean(v) for k, v in rounds.items()}
        return record

    def _average_gradients(self) -> None:
        """Mean of every trainable tensor's gradient over processes (one flat all-reduce per device)."""
        if self.accelerator.num_processes == 1:
            return
        by_device: dict[torch.device, list[nn.Parameter]] = {}
        for p in self.params:
            by_device.setdefault(p.device, []).append(p)
        for params in by_device.values():
            had = torch.tensor(
                [p.grad is not None for p in params], dtype=torch.float32, device=params[0].device
            )
            had = self.accelerator.reduce(had, reduction="sum")  # how many processes produced each gradient
            flat = torch.cat(
                [(p.grad if p.grad is not None else torch.zeros_like(p)).flatten().float() for p in params]
            )
            flat = self.accelerator.reduce(flat, reduction="mean")
            offset = 0
            for p, count in zip(params, had.tolist(), strict=True):
                n = p.numel()
                # a tensor no process reached keeps grad None, as in one process (AdamW then skips it)
                p.grad = flat[offset : offset + n].view_as(p).to(p.dtype) if count else None
                offset += n

    def _mean(self, value: float) -> float:
        if self.accelerator.num_processes == 1:
            return value
        t = torch.tensor(value, dtype=torch.float64, device=self.accelerator.device)
        return float(self.accelerator.reduce(t, reduction="mean"))

    def validate(self) -> float | None:
        """Loss over the validation rows, weighted by target positions, summed over processes."""
        rows = self.splits.validation
        if not rows:
            return None
        mine = list(range(self.accelerator.process_index, len(rows), self.accelerator.num_processes))
        part = loss_totals(
            self.objective,
            [rows[j] for j in mine],
            self.config.optim.batch_size,
            [VALIDATION_KEY_OFFSET + j for j in mine],
        )
        total = torch.tensor(part, dtype=torch.float64, device=self.accelerator.device)
        if self.accelerator.num_processes > 1:
            total = self.accelerator.reduce(total, reduction="sum")
        return float(total[0] / total[1])

    # --- run -------------------------------------------------------------------------------------

    def run(self, resume: bool = False) -> TrainReport:
        """Train to ``optim.max_steps`` (from the last checkpoint if ``resume``); write outputs.

        The main process holds ``OutputLock`` on the output folder for the whole run, resume included:
        a second run on the same folder fails at once with ``ConfigError`` naming the holder.

        ``resume`` of a finished run (its checkpoint at ``optim.max_steps`` and its ``report.json`` for
        that step) raises ``ConfigError`` saying there is nothing left to do, and changes nothing; a run
        whose final save failed (e.g. a full disk) has its final outputs written, with the losses taken
        from its log. ``CheckpointError`` when a checkpoint or the final outputs cannot be written.
        """
        lock = OutputLock(self.output)
        if self.main:
            self.output.mkdir(parents=True, exist_ok=True)
            lock.acquire()
        try:
            return self._run(resume)
        finally:
            lock.release()

    def _run(self, resume: bool) -> TrainReport:
        """``run`` under the lock."""
        if self.main:
            clean_partial(self.output / "checkpoints")
            shutil.rmtree(self.output / f".tmp-{FINAL_NAME}", ignore_errors=True)  # a killed final save's
            if not resume and latest_checkpoint(self.output / "checkpoints") is not None:
                raise ConfigError(
                    f"{self.output} already holds checkpoints; pass --resume to continue, or another --output"
                )
        self.accelerator.wait_for_everyone()
        resumed = self.resume() if resume else False
        if self.main and not resumed:
            (self.output / LOG_NAME).unlink(missing_ok=True)  # a fresh run starts a fresh log
        last, validation = _logged(self.output / LOG_NAME) if resumed else ({}, [])
        start = time.perf_counter()
        with PeakMemory(self.accelerator.device) as memory:
            if isinstance(self.objective, InnerObjective):
                self._precompute()  # counted in the run's time and memory
            last = self._loop(last, validation)
        report = self._finish(last, validation, time.perf_counter() - start, memory)
        self.accelerator.end_training()
        return report

    def _loop(self, last: dict, validation: list[dict]) -> dict:
        """Steps from ``self.step`` to the end, adding to ``validation``; returns the last step's record
        (``last`` if no step is left)."""
        cfg = self.config
        log = _LogWriter(self.output / LOG_NAME, self.main)
        bar = tqdm(
            total=cfg.optim.max_steps, initial=self.step, disable=not self.main, desc=f"train {cfg.stage}"
        )
        if self.step == 0:
            self._validate(log, validation)  # the starting point (e.g. training-free links)
        while self.step < cfg.optim.max_steps:
            last = self.train_step()
            if self.step % cfg.run.log_every == 0 or self.step == cfg.optim.max_steps:
                log.write(last)
                self.accelerator.log({"train/loss": last["loss"], "train/lr": last["lr"]}, step=self.step)
            bar.update(1)
            bar.set_postfix(loss=f"{last['loss']:.4f}")
            if self.step % cfg.run.validate_every == 0 or self.step == cfg.optim.max_steps:
                self._validate(log, validation)
            if self.step % cfg.run.checkpoint_every == 0 or self.step == cfg.optim.max_steps:
                self.save()
        bar.close()
        return last

    def _precompute(self) -> None:
        """Cache the frozen hidden states of the rows this run uses, in fixed chunks of ``batch_size``
        along the first epoch's order (every row appears in it), so cached values, and hence a resumed
        run, do not depend on which batch first met each row."""
        if not self.config.objective.precompute:
            return
        opt, world = self.config.optim, self.accelerator.num_processes
        train, val, bs = self.splits.train, self.splits.validation, opt.batch_size
        first_epoch = min(len(train), opt.max_steps * opt.grad_accum * world * bs)
        for start in range(0, first_epoch, bs):
            ids = [self.order[k] for k in range(start, min(start + bs, len(train)))]
            self.objective.warm([train[i] for i in ids], ids)
        for start in range(0, len(val), bs):
            ids = list(range(start, min(start + bs, len(val))))
            self.objective.warm([val[i] for i in ids], [VALIDATION_KEY_OFFSET + i for i in ids])

    def _validate(self, log: _LogWriter, history: list[dict]) -> None:
        value = self.validate()
        if value is not None:
            entry = {"kind": "validation", "step": self.step, "validation_loss": value}
            history.append(entry)
            log.write(entry)
            self.accelerator.log({"validation/loss": value}, step=self.step)

    def _finish(self, last: dict, validation: list[dict], seconds: float, memory: PeakMemory) -> TrainReport:
        trainable = sum(p.numel() for p in self.params)
        everything = sum(p.numel() for m in self.system.models().values() for p in m.parameters())
        everything += sum(p.numel() for p in self.system.links.parameters())
        report = TrainReport(
            stage=self.config.stage,
            trainable=self.config.trainable,
            steps=self.step,
            processes=self.accelerator.num_processes,
            seconds=seconds,
            trainable_parameters=trainable,
            frozen_parameters=everything - trainable,
            peak_memory_bytes=memory.peak,
            memory_kind=memory.kind,
            final_train_loss=last.get("loss"),
            final_validation_loss=validation[-1]["validation_loss"] if validation else None,
            validation=validation,
            replica_digests=self._replica_digests(),
            output=str(self.output),
        )
        if len(set(report.replica_digests)) > 1:
            logger.warning("processes ended with different trainable weights: %s", report.replica_digests)
        if self.main:
            self._write_outputs(report)
        self.accelerator.wait_for_everyone()
        return report

    def _write_outputs(self, report: TrainReport) -> None:
        """``final/`` (written aside, then swapped in whole), ``curves.png``, then ``report.json``.

        The old report goes first and the new one comes last, so ``report.json`` only ever describes the
        ``final/`` beside it. ``CheckpointError`` if a write fails (a full disk): the checkpoint at this
        step stays, and ``--resume`` writes the outputs again.
        """
        staging, final = self.output / f".tmp-{FINAL_NAME}", self.output / FINAL_NAME
        try:
            (self.output / REPORT_NAME).unlink(missing_ok=True)
            shutil.rmtree(staging, ignore_errors=True)
            self.system.save_pretrained(str(staging), self.command)
            if self.config.trainable == "full":
                self._save_agents(staging / "agents")
            shutil.rmtree(final, ignore_errors=True)
            os.replace(staging, final)
            plot_curves(self.output / LOG_NAME, self.output / "curves.png", f"{self.config.stage} stage")
            text = json.dumps(asdict(report), indent=2) + "\n"
            atomic_write(self.output / REPORT_NAME, lambda p: p.write_text(text))
        except WRITE_ERRORS as err:
            shutil.rmtree(staging, ignore_errors=True)
            raise CheckpointError(
                f"cannot write the final outputs to {self.output} ({write_failure(err, self.output)}); "
                f"the trained state is kept in checkpoints/step-{self.step:06d}: free some space, then "
                f"rerun with --resume to write them"
            ) from None

    def _save_agents(self, root: Path) -> None:
        """Full fine-tuning: each fine-tuned model (once per shared model) as a HuggingFace folder."""
        for name, model in self.system.models().items():
            model.save_pretrained(root / name)
            self.system.agents[name].tokenizer.save_pretrained(root / name)

    def _replica_digests(self) -> list[str]:
        """SHA-256 of this process's trainable tensors, from every process (all equal when in sync)."""
        digest = hashlib.sha256()
        for name in sorted(self.named):
            digest.update(name.encode())
            digest.update(self.named[name].detach().float().cpu().numpy().tobytes())
        mine = digest.hexdigest()[:16]
        if self.accelerator.num_processes == 1:
            return [mine]
        return list(gather_object([mine]))


class _LogWriter:
    """Appends JSON lines (main process only), flushed per line so a killed run keeps its log.

    A failed append (a full disk) stops the run with a ``CheckpointError`` that says how to go on; a line
    it cut short is dropped when the run resumes (``_truncate_log``)."""

    def __init__(self, path: Path, enabled: bool) -> None:
        self.path, self.enabled = path, enabled

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        try:
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as err:
            raise CheckpointError(
                f"cannot append step {record.get('step')} to {self.path} ({write_failure(err, self.path)}); "
                "training stopped: free some space, then rerun with --resume (it restarts from the newest "
                "checkpoint under checkpoints/)"
            ) from None


def _truncate_log(path: Path, step: int) -> None:
    """Drop log lines past ``step`` (written after the checkpoint a resumed run restarts from) and any
    line cut short by a kill."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
    atomic_write(path, lambda p: p.write_text("".join(line + "\n" for line in kept)))


def _logged(path: Path) -> tuple[dict, list[dict]]:
    """The last training record and every validation record in a (truncated) log: what a resumed run
    carries into its report."""
    last: dict = {}
    validation: list[dict] = []
    if not path.is_file():
        return last, validation
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by a kill (not yet truncated on this process)
            continue
        if not isinstance(record, dict):
            continue
        if record.get("kind") == "train":
            last = record
        elif record.get("kind") == "validation":
            validation.append(record)
    return last, validation


def _report_steps(output: Path) -> int | None:
    """``steps`` of the run's ``report.json`` (written last, so present only for finished runs)."""
    try:
        report = json.loads((output / REPORT_NAME).read_text())
    except (OSError, ValueError):
        return None
    return report.get("steps") if isinstance(report, dict) else None


def _check_data(path: Path, saved: object, current: dict) -> None:
    """``CheckpointError`` naming what changed when the data differs from the checkpoint's."""
    if saved is None:
        logger.warning("%s records no data digest (older version): cannot check the data is unchanged", path)
        return
    if saved == current:
        return
    old_files = saved.get("files") if isinstance(saved, dict) else None
    old_files, new_files = old_files if isinstance(old_files, dict) else {}, current["files"]
    edited = sorted(f for f in {*old_files, *new_files} if old_files.get(f) != new_files.get(f))
    what = (
        f"data file(s) {', '.join(edited)} changed"
        if edited
        else "the training rows differ (a generated or hub source now yields other rows)"
    )
    raise CheckpointError(
        f"{path} was trained on other data: {what} since it was written. Restore the data as it was "
        f"to resume, or start a new --output folder to train on the new data"
    )


def _available_trackers(names: Sequence[str]) -> list[str]:
    """The requested trackers whose packages are installed (others are skipped with a warning)."""
    modules = {"tensorboard": "tensorboard", "wandb": "wandb"}
    found = []
    for name in names:
        try:
            __import__(modules[name])
            found.append(name)
        except ImportError:
            logger.warning(
                "tracker %r requested but its package is not installed; logging to JSONL only", name
            )
    return found


def _flat(data: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in data.items():
        if isinstance(v, dict):
            out |= _flat(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = v if isinstance(v, int | float | str | bool) else str(v)
    return out
