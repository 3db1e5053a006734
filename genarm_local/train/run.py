"""The training run behind `genarm-local train`: base + LoRA, the optimizer loop and its held-out evaluations, which
choose the weights kept (selection.py), checkpoints (checkpoints.py), outputs, export.

Imported only by train.train(), after it has checked that the `train` extra (torch, transformers, peft) is there.
The data order is a pure function of (seed, optimizer step) and the RNG state is checkpointed, so a resumed run
takes exactly the steps, and produces exactly the weights, of an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import random
import shutil
import signal
import tempfile
import threading
import warnings
from collections.abc import Callable
from pathlib import Path

import peft
import torch
from tqdm import tqdm

from ..convert import (
    FLOAT_TYPES,
    QUANT_TYPES,
    architecture_for,
    checkpoint_from_model,
    export_adapter,
    export_model,
    gguf_architecture,
    load_transformers_model,
    read_adapter,
    read_config,
    run_quantizer,
    test_load,
    test_load_adapter,
)
from ..convert.export import F32
from ..core.atomic import atomic_output, readable
from ..core.errors import InputNotFoundError, InvalidOptionError
from . import checkpoints
from .config import TrainConfig, lr_factor, pick_device, warmup_steps
from .data import PreferenceData, TokenizedPair, chat_renderer, load_tokenizer, tokenize_pairs
from .loss import anchor_penalty, batch_logps, collate, genarm_loss
from .selection import Selection, eval_interval

ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")  # config last: it marks a complete adapter


@contextlib.contextmanager
def deferred_interrupt(notify: Callable[[str], None]):
    """Ctrl-C sets a flag that the loop reads after the current optimizer step (then it checkpoints and stops);
    a second Ctrl-C stops at once. Only the main thread can own signal handlers; elsewhere nothing changes."""
    pressed: list[bool] = []
    if threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return

    def handler(signum, frame):
        if pressed:
            raise KeyboardInterrupt
        pressed.append(True)
        notify("interrupted: finishing this step, then saving a checkpoint (Ctrl-C again stops at once)", True)

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield lambda: bool(pressed)
    finally:
        signal.signal(signal.SIGINT, previous)


class Run:
    """One training run in OUT_DIR. Call load_base, setup, loop, then save_adapter (and export)."""

    def __init__(self, config: TrainConfig, output: Path, notify: Callable[[str], None]):
        self.config, self.output, self.notify = config, output, notify
        self.device = pick_device(config.device)
        self.log_path = output / "train_log.jsonl"
        self.checkpoints = output / "checkpoints"
        self.step = 0
        self.stopped_early: str | None = None  # why the run stopped before its last step (Selection.update)
        self.kept_step = 0  # whose weights the model holds after keep_selected
        self._log_file = None
        self._orders: dict[int, list[int]] = {}
        self._base_logps: dict[tuple[int, ...], float] = {}  # prompt + chosen -> log π_base(chosen | prompt)

    def __enter__(self) -> Run:
        return self

    def __exit__(self, *exc) -> None:
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    # ---- model and data ------------------------------------------------------------------------------------------

    def load_base(self, data: PreferenceData) -> list[TokenizedPair]:
        """Load the tokenizer, tokenize the data (its errors come before the slow model load), then the model."""
        source = self.source = Path(self.config.model)
        if not source.exists():
            raise InputNotFoundError(f"{source}: no such model file or directory")
        # Unsupported architectures fail here, not after training, when the export would refuse them.
        reader = gguf_architecture(source)[0] if source.is_file() else None
        if reader is None:
            architecture_for(read_config(source), str(source))
        tokenizer = load_tokenizer(source)
        pairs = tokenize_pairs(
            data,
            tokenizer,
            self.config.max_length,
            self.config.max_prompt_length,
            chat_renderer(tokenizer),
            model=str(source),
            eos=self.config.eos,
        )
        self.pad_id = next(t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0) if t is not None)
        self.notify(f"loading {source} ({len(pairs)} pairs tokenized)")
        self.base, self.reader = load_transformers_model(source, self.config.progress)
        self.data_hash = hashlib.sha256(
            json.dumps([(p.prompt, p.chosen, p.rejected) for p in pairs]).encode()
        ).hexdigest()
        return pairs

    def setup(self, train_pairs: list[TokenizedPair], eval_pairs: list[TokenizedPair]) -> None:
        config = self.config
        self.train_pairs, self.eval_pairs = train_pairs, eval_pairs
        batches_per_epoch = math.ceil(len(train_pairs) / config.batch_size)
        self.steps_per_epoch = math.ceil(batches_per_epoch / config.grad_accum)
        self.total = config.max_steps or max(config.epochs * self.steps_per_epoch, config.min_steps)
        self.warmup = warmup_steps(config.warmup, self.total)
        self.eval_interval = eval_interval(config.eval_every, self.total)
        self.selection = Selection(config.select if eval_pairs else "last", config.early_stopping_patience)
        torch.manual_seed(config.seed)  # LoRA init, then dropout
        if config.gradient_checkpointing:  # non-reentrant: replays dropout's RNG, so results do not change
            self.base.activation_checkpointing_enable({"use_reentrant": False})
        lora = peft.LoraConfig(
            r=config.lora_r,
            lora_alpha=config.lora_alpha,
            lora_dropout=config.lora_dropout,
            target_modules=config.target_modules or "all-linear",
            task_type="CAUSAL_LM",
        )
        try:
            with warnings.catch_warnings():  # peft's notices about transformers deprecations, not about our run
                warnings.simplefilter("ignore")
                self.model = peft.get_peft_model(self.base, lora).to(self.device)
        except ValueError as exc:
            raise InvalidOptionError(f"--target-modules {config.target_modules}: {exc}") from exc
        self.model.peft_config["default"].base_model_name_or_path = str(self.source)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=config.lr, weight_decay=config.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: lr_factor(step, self.warmup, self.total)
        )
        self.settings = {name: getattr(config, name) for name in checkpoints.RUN_SETTINGS}
        self._resume_or_start()

    # ---- the loop ------------------------------------------------------------------------------------------------

    def _epoch_order(self, epoch: int) -> list[int]:
        if epoch not in self._orders:
            order = list(range(len(self.train_pairs)))
            random.Random(self.config.seed * 1_000_003 + epoch + 1).shuffle(order)
            self._orders = {epoch: order}
        return self._orders[epoch]

    def _step_batches(self, step: int) -> list[list[TokenizedPair]]:
        """The micro-batches of optimizer step ``step``: a pure function of the seed and the step."""
        size, accum = self.config.batch_size, self.config.grad_accum
        order = self._epoch_order(step // self.steps_per_epoch)
        first = (step % self.steps_per_epoch) * accum * size
        chunk = order[first : first + accum * size]
        return [[self.train_pairs[i] for i in chunk[j : j + size]] for j in range(0, len(chunk), size)]

    def _forward(self, pairs: list[TokenizedPair]):
        """(per-pair losses, summed metrics) of one micro-batch: chosen and rejected in one forward pass."""
        input_ids, attention_mask, predict_mask = (t.to(self.device) for t in collate(pairs, self.pad_id))
        logps = batch_logps(self.model, input_ids, attention_mask, predict_mask)
        chosen, rejected = logps[: len(pairs)], logps[len(pairs) :]
        config = self.config
        losses = genarm_loss(chosen, rejected, config.beta, config.gamma, config.label_smoothing)
        if config.anchor > 0:
            n_tokens = torch.tensor([len(p.chosen) for p in pairs], dtype=chosen.dtype).to(self.device)
            over = config.anchor_over_base
            base = self._chosen_base_logps(pairs) if over is not None else None
            losses = losses + config.anchor * anchor_penalty(chosen, n_tokens, base, over or 0.0)
        with torch.no_grad():
            margin = self.config.beta * (chosen - rejected)
            sums = torch.stack([losses.sum(), (margin > 0).float().sum(), margin.sum(), chosen.sum(), rejected.sum()])
        return losses, sums

    def _chosen_base_logps(self, pairs: list[TokenizedPair]):
        """log π_base(y_w|x) of each pair's chosen response, by the model with its adapter disabled, once per
        response."""
        keys = [tuple(p.prompt + p.chosen) for p in pairs]
        missing = [(p, k) for p, k in zip(pairs, keys, strict=True) if k not in self._base_logps]
        if missing:
            training = self.model.training
            self.model.eval()  # no dropout anywhere: the cached value is the base's own
            try:
                with torch.no_grad(), self.model.disable_adapter():
                    # empty rejected rows: no output layer for them
                    chosen_only = [TokenizedPair(p.prompt, p.chosen, []) for p, _ in missing]
                    logps = batch_logps(self.model, *(t.to(self.device) for t in collate(chosen_only, self.pad_id)))
            finally:
                self.model.train(training)
            for (_, key), logp in zip(missing, logps[: len(missing)].tolist(), strict=True):
                self._base_logps[key] = logp
        return torch.tensor([self._base_logps[k] for k in keys], dtype=torch.float32).to(self.device)

    @staticmethod
    def _metrics(sums, n_pairs: int) -> dict[str, float]:
        names = ("loss", "accuracy", "margin", "chosen_logp", "rejected_logp")
        return {name: value / n_pairs for name, value in zip(names, sums.tolist(), strict=True)}

    def _train_step(self) -> dict:
        batches = self._step_batches(self.step)
        n_pairs = sum(len(batch) for batch in batches)
        self.model.train()
        total = torch.zeros(5)
        for batch in batches:
            losses, sums = self._forward(batch)
            (losses.sum() / n_pairs).backward()  # the step's mean over pairs, however they are accumulated
            total += sums.cpu()
        lr = self.scheduler.get_last_lr()[0]
        if self.config.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.config.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"lr": lr, **self._metrics(total, n_pairs)}

    def loop(self, on_step: Callable[[dict], None] | None = None) -> None:
        config = self.config
        bar = tqdm(total=self.total, initial=self.step, desc="training", unit="step", disable=not config.progress)
        with bar, deferred_interrupt(self.notify) as interrupted:
            while self.step < self.total:
                record = self._train_step()
                self.step += 1
                record = {"step": self.step, "epoch": round(self.step / self.steps_per_epoch, 4), **record}
                self.log(record)
                bar.update(1)
                bar.set_postfix(
                    loss=f"{record['loss']:.4f}", acc=f"{record['accuracy']:.2f}", margin=f"{record['margin']:.3f}"
                )
                if on_step is not None:
                    on_step(record)
                last = self.step == self.total
                if self.eval_pairs and (last or self.eval_interval and self.step % self.eval_interval == 0):
                    stop = self._evaluate_and_select(bar.write)
                    self.stopped_early = None if last else stop
                if self.stopped_early:  # before an interrupt's checkpoint, which would resume past the stop
                    break
                if interrupted():
                    path = self.save_checkpoint()
                    self.notify(f"saved {path} at step {self.step}/{self.total}; continue with --resume", True)
                    raise KeyboardInterrupt
                if config.save_every and self.step % config.save_every == 0 and not last:
                    self.save_checkpoint()

    def _evaluate_and_select(self, write: Callable[[str], None]) -> str | None:
        """Evaluate on the held-out pairs, log it, and keep the weights if they are the best so far (only the LoRA
        parameters, copied to the CPU). Why to stop, when the early-stopping patience has run out."""
        metrics = self.evaluate()
        self.log({"step": self.step, **{f"eval_{k}": v for k, v in metrics.items()}})
        stop = self.selection.update(self.step, metrics, self._lora_weights)
        if self.config.progress:
            write(
                f"step {self.step}: held-out accuracy {metrics['accuracy']:.3f}, loss {metrics['loss']:.4f}, "
                f"margin {metrics['margin']:.3f}" + (" (best)" if self.selection.best_step == self.step else "")
            )
        return stop

    def _lora_weights(self) -> dict:
        return {n: p.detach().cpu().clone() for n, p in self.model.named_parameters() if p.requires_grad}

    def keep_selected(self) -> int:
        """Load the selected weights into the model (the best evaluation's, or the last step's) and log the choice;
        the step whose weights the model now holds."""
        selection = self.selection
        kept = self.step
        if selection.select == "best" and selection.best_weights is not None:
            kept = selection.best_step
            with torch.no_grad():
                for name, param in self.model.named_parameters():
                    if param.requires_grad:
                        param.copy_(selection.best_weights[name])
        record = {"step": self.step, "selected_step": kept, "select": selection.select}
        self.log({**record, "best_step": selection.best_step, "stopped_early": self.stopped_early})
        self.kept_step = kept
        return kept

    def evaluate(self) -> dict[str, float]:
        """Mean loss, preference accuracy (share of pairs with log π(y_w|x) > log π(y_l|x)) and reward margin."""
        self.model.eval()
        total = torch.zeros(5)
        size = self.config.batch_size
        with torch.no_grad():
            for start in range(0, len(self.eval_pairs), size):
                total += self._forward(self.eval_pairs[start : start + size])[1].cpu()
        return self._metrics(total, len(self.eval_pairs))

    # ---- log and checkpoints -------------------------------------------------------------------------------------

    def log(self, record: dict) -> None:
        if self._log_file is None:
            self._log_file = self.log_path.open("a", encoding="utf-8")
        self._log_file.write(json.dumps(record) + "\n")
        self._log_file.flush()

    def save_checkpoint(self) -> Path:
        """Everything a resumed run needs to continue exactly as this one would, after ``self.step`` steps."""
        return checkpoints.save(
            self.checkpoints,
            {
                "step": self.step,
                "settings": self.settings,
                "data": self.data_hash,
                "adapter": {n: p.detach().cpu() for n, p in self.model.named_parameters() if p.requires_grad},
                "selection": self.selection.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            },
        )

    def _resume_or_start(self) -> None:
        found = checkpoints.latest(self.checkpoints) if self.config.resume else None
        if found is None:
            if self.config.resume:
                self.notify(f"no checkpoint in {self.checkpoints}; starting from the beginning")
            shutil.rmtree(self.checkpoints, ignore_errors=True)  # a --force restart must not mix with old state
            self.log_path.unlink(missing_ok=True)
            return
        path, state = found
        checkpoints.check_same_run(path, state, self.settings, self.data_hash)
        with torch.no_grad():
            for name, param in self.model.named_parameters():
                if param.requires_grad:
                    param.copy_(state["adapter"][name])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.selection.load_state_dict(state["selection"])
        torch.set_rng_state(state["rng"])
        if state["cuda_rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        self.step = state["step"]
        checkpoints.trim_log(self.log_path, self.step)
        self.notify(f"resuming from {path.name} (step {self.step}/{self.total})")

    # ---- outputs -------------------------------------------------------------------------------------------------

    def save_adapter(self) -> None:
        """The PEFT adapter (the weights the model holds: after keep_selected, the selected ones) into OUT_DIR, each
        file renamed into place complete, and the settings used with the steps trained and the step kept."""
        with tempfile.TemporaryDirectory(dir=self.output, prefix=".adapter-") as tmp, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "could not find a config file": the base may be a GGUF file
            self.model.save_pretrained(tmp)
            for name in ADAPTER_FILES:
                readable(Path(tmp) / name)
                os.replace(Path(tmp) / name, self.output / name)
        settings = {k: v for k, v in vars(self.config).items() if k != "data"}
        settings["data"] = self.config.data if isinstance(self.config.data, str | Path) else "<rows>"
        settings["steps"] = self.step
        settings["selected_step"] = self.kept_step
        settings["stopped_early"] = self.stopped_early
        with atomic_output(self.output / "train_config.json", force=True) as tmp:
            tmp.write_text(json.dumps(settings, indent=2, default=str) + "\n", encoding="utf-8")

    def export(self, path: Path) -> None:
        """The ARM as GGUF from the weights in memory: a LoRA adapter over the base, or merged into a full model."""
        config = self.config
        outtype = config.outtype.lower()
        model = self.model.cpu()
        base = model.merge_and_unload() if config.merge else model.unload()
        ckpt = checkpoint_from_model(base, self.source, self.reader)
        ckpt.weights_changed = config.merge
        with atomic_output(path, config.force) as tmp:
            if not config.merge:
                export_adapter(ckpt, read_adapter(self.output), tmp, FLOAT_TYPES[outtype], config.progress, path.name)
                if self.reader is not None:  # llama.cpp checks the adapter's tensors against the loaded base
                    test_load_adapter(self.source, tmp)
            elif outtype in FLOAT_TYPES:
                export_model(ckpt, tmp, FLOAT_TYPES[outtype], config.progress, path.name)
                test_load(tmp)
            else:
                with tempfile.TemporaryDirectory(dir=path.parent, prefix=".genarm-train-") as work:
                    intermediate = Path(work) / "merged.gguf"
                    export_model(ckpt, intermediate, F32, config.progress, path.name)
                    run_quantizer(intermediate, tmp, QUANT_TYPES[outtype])
                test_load(tmp)
