"""Train stage: fine-tune the run's model on the training JSON with the HF Trainer.

One entry point for the notebook, the CLI and the distributed workers::

    from icmlab.train.stage import run
    result = run(cfg)                # notebook 05_train / ``icmlab train parameters/X.yaml``
    icmlab train runs/demo/config.resolved.yaml [--set train.max_steps=10 ...]   # also the launched workers' command

What it does, in order:

1. Decides how to run (:mod:`icmlab.train.launch`): in this process on CPU or one GPU; for several GPUs
   it saves ``config.resolved.yaml`` and starts ``deepspeed``/``torchrun`` with ``icmlab train``,
   whose workers come back here and train in-process.
2. Loads the model through the family adapter (``load_for_training``: upstream's trainable parts,
   LoRA when enabled, attention kernel), the records of ``paths.training_json(cfg)`` and the lazy
   :class:`icmlab.train.dataset.SupervisedDataset`.
3. Builds ``TrainingArguments`` from the config (:func:`icmlab.train.args.build_training_args`), keeping the global
   batch at ``train.global_batch_size`` whatever the device count (gradient accumulation derived).
4. Trains with :class:`icmlab.train.trainer.IcmTrainer`, resuming from the newest complete checkpoint in
   ``<run_dir>/checkpoints`` with its weights really restored. SIGTERM saves a checkpoint and stops.
5. Saves the final model with the adapter's ``save_bundle`` into ``<run_dir>/model`` (llava-hf
   layout for LLaVA) and optionally pushes it to the hub. Metrics go to ``<run_dir>/metrics.jsonl``.
6. Writes ``<run_dir>/trained.json`` last. A rerun of a finished run does not train again (it would
   resume and add steps to a finished model): it says so and returns the saved result, unless
   ``train.max_steps`` (or ``train.epochs``) was raised, which continues from the last checkpoint,
   or a retrain is asked for (``icmlab train P --force``, ``ICMLAB_RETRAIN=1``), which moves the
   old model, checkpoints and metrics aside into ``<run_dir>/previous/<time>/`` and starts afresh.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from icmlab import paths
from icmlab.config import RunConfig, find_project_root, save_resolved
from icmlab.io import inputs_stamp_path, read_json, read_jsonl, stale_reason
from icmlab.models import get_family
from icmlab.rundir import run_dir_lock
from icmlab.train.args import (  # noqa: F401  (re-exported: the stage's configuration helpers)
    DEEPSPEED_DIR,
    batch_message,
    build_training_args,
    deepspeed_config_path,
    projector_parameters,
    resolve_device,
)
from icmlab.train.build import build_trainer, single_process_group
from icmlab.train.checkpoints import newest_loadable_checkpoint, set_aside
from icmlab.train.launch import (
    STOPPED_BY_SIGTERM,
    build_launch_command,
    is_launched_worker,
    launch_env,
    launch_mode,
    run_launched,
    unblock_sigterm,
)

log = logging.getLogger("icmlab.train.stage")


@dataclass
class TrainResult:
    """What the train stage produced.

    Attributes:
        run_dir: the run directory.
        model_dir: the final model (None when training was interrupted).
        metrics_path: ``metrics.jsonl``.
        global_step: optimizer steps done in total.
        final_loss: last logged training loss.
        resumed_from: the checkpoint training continued from, if any.
        interrupted: SIGTERM stopped training after saving a checkpoint (rerun to resume).
        mode: ``inprocess``, ``deepspeed`` or ``torchrun``.
    """

    run_dir: Path
    model_dir: Path | None
    metrics_path: Path
    global_step: int
    final_loss: float | None
    resumed_from: Path | None = None
    interrupted: bool = False
    mode: str = "inprocess"
    already_trained: bool = False

    def summary(self) -> str:
        """A few lines for the terminal or the notebook."""
        state = "interrupted (checkpoint saved; rerun to resume)" if self.interrupted else "done"
        if self.already_trained:
            state = "already done (not retrained; `icmlab train <params> --force` or ICMLAB_RETRAIN=1 retrains)"
        loss = f"{self.final_loss:.4f}" if self.final_loss is not None else "n/a"
        lines = [f"train {state}: {self.global_step} steps, final loss {loss} ({self.mode})"]
        if self.resumed_from:
            lines.append(f"resumed from {self.resumed_from}")
        lines.append(f"model:   {self.model_dir}")
        lines.append(f"metrics: {self.metrics_path}")
        return "\n".join(lines)


# --------------------------------------------------------------------------- the stage
RETRAIN_ENV = "ICMLAB_RETRAIN"
"""Set to 1 to retrain a finished run (what ``icmlab train --force`` does)."""


def run(cfg: RunConfig, callbacks: Sequence[Any] = (), force: bool | None = None) -> TrainResult:
    """Train the run's model; see the module docstring.

    Args:
        cfg: the run config.
        callbacks: extra ``TrainerCallback`` objects (e.g. a notebook's live plot). A launched job's
            workers cannot receive them: there, those with a ``poll()`` method (``LiveMetricsPlot``)
            are polled about once a second while the job runs and follow ``metrics.jsonl``.
        force: retrain a finished run from scratch, its old outputs moved aside (default: the
            ``ICMLAB_RETRAIN`` environment variable).

    Returns:
        The :class:`TrainResult`.

    Raises:
        FileNotFoundError: the training JSON is missing (run merge/validate first).
        ValueError: an impossible hardware/precision combination (names the key).
        RuntimeError: a launched multi-process job failed.
    """
    _ensure_visible_logging()
    # One writer per run directory; the ranks it launches inherit the lock, and the per-node
    # launchers of a multi-node job share it by design.
    multi_node = cfg.hardware.num_nodes > 1 or is_launched_worker()
    with contextlib.nullcontext() if multi_node else run_dir_lock(cfg, "train"):
        cfg = resolve_device(cfg)
        mode = launch_mode(cfg)
        if not is_launched_worker():  # the launching process decides; its workers just train
            force = os.environ.get(RETRAIN_ENV, "") not in ("", "0") if force is None else force
            done = _finished(cfg, mode, force)
            if done is not None:
                return done
        check_training_data(cfg)  # before any rank is launched
        if mode != "inprocess":
            return _run_launched(cfg, mode, callbacks)
        return _train_inprocess(cfg, callbacks)


def _ensure_visible_logging() -> None:
    """Show the stage's INFO lines (batch arithmetic, resume point) in a notebook or bare script.

    Nothing is changed when the application configured logging itself (root or ``icmlab`` handlers).
    """
    pkg = logging.getLogger("icmlab")
    if not pkg.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
        pkg.addHandler(handler)
        pkg.setLevel(logging.INFO)


def trained_marker(cfg: RunConfig) -> Path:
    """``<run_dir>/trained.json``: written last by a finished training (steps, epochs, model)."""
    return cfg.run_dir / "trained.json"


def _finished(cfg: RunConfig, mode: str, force: bool) -> TrainResult | None:
    """The saved result of a finished run that the config does not ask to extend; None = train.

    With ``force`` the finished run's outputs are moved aside first (nothing is deleted).
    """
    marker = trained_marker(cfg)
    if not marker.is_file():
        return None
    done = read_json(marker)
    if force:
        _move_aside(cfg)
        return None
    t = cfg.train
    if t.max_steps > 0 and t.max_steps > done.get("global_step", 0):
        log.info("train.max_steps raised to %d: continuing from step %d", t.max_steps, done.get("global_step", 0))
        return None
    if t.max_steps <= 0 and t.epochs > done.get("epochs", 0):
        log.info("train.epochs raised to %s: continuing the finished run", t.epochs)
        return None
    result = _result_from_disk(cfg, mode, step=done.get("global_step"))
    result.already_trained = True
    log.warning(
        "%s is already trained (%d steps, finished %s); not training again. To retrain: "
        "`icmlab train <params> --force` or ICMLAB_RETRAIN=1 (old outputs are moved to %s/previous/), "
        "a new run_name, or raise train.max_steps to continue",
        cfg.run_name,
        result.global_step,
        done.get("finished", "?"),
        cfg.run_dir,
    )
    return result


def _move_aside(cfg: RunConfig) -> Path:
    """Move a finished run's training outputs into ``<run_dir>/previous/<time>/``; returns that folder."""
    import time

    dest = cfg.run_dir / "previous" / time.strftime("%Y%m%d-%H%M%S")
    dest.mkdir(parents=True, exist_ok=True)
    for p in (
        paths.final_model_dir(cfg),
        paths.checkpoints_dir(cfg),
        paths.metrics_jsonl(cfg),
        interrupted_marker(cfg),
        trained_marker(cfg),
    ):
        if p.exists():
            p.rename(dest / p.name)
    log.warning("retraining %s: the previous model, checkpoints and metrics are in %s", cfg.run_name, dest)
    return dest


def interrupted_marker(cfg: RunConfig) -> Path:
    """``<run_dir>/interrupted.json``: left by rank 0 when SIGTERM stopped training after a complete checkpoint."""
    return cfg.run_dir / "interrupted.json"


def _run_launched(cfg: RunConfig, mode: str, callbacks: Sequence[Any] = ()) -> TrainResult:
    config_path = save_resolved(cfg)
    log.info(batch_message(cfg))
    pollers = [cb.poll for cb in callbacks if callable(getattr(cb, "poll", None))]
    try:
        rc = run_launched(
            build_launch_command(cfg, config_path, mode),
            cwd=find_project_root(),
            env=launch_env(cfg),
            interrupted_marker=interrupted_marker(cfg),
            on_poll=(lambda: [poll() for poll in pollers]) if pollers else None,
        )
    finally:
        for poll in pollers:  # the final picture, also after a failure or an interruption
            poll(force=True)
    return _result_from_disk(cfg, mode, interrupted=rc == STOPPED_BY_SIGTERM)


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _train_inprocess(cfg: RunConfig, callbacks: Sequence[Any]) -> TrainResult:
    from icmlab.train.callbacks import install_sigterm_flag, uninstall_sigterm_flag

    launched = is_launched_worker()
    if launched:
        # The launcher was started with SIGTERM blocked (icmlab.train.launch); catch it from now on,
        # before the model is loaded, so that a pre-empted rank checkpoints instead of dying.
        install_sigterm_flag()
        unblock_sigterm()
    if launched and int(os.environ["WORLD_SIZE"]) != cfg.world_size:
        raise ValueError(
            f"launched with WORLD_SIZE={os.environ['WORLD_SIZE']} but hardware says {cfg.world_size} "
            "(num_gpus × num_nodes); the global batch arithmetic would be wrong"
        )
    # In this process (notebook kernel, CLI): a one-member process group for DeepSpeed, and the whole
    # environment restored afterwards (DeepSpeed and accelerate leave rank variables behind, and a
    # later run in this kernel must not look like a launched worker or a DeepSpeed run).
    group = contextlib.nullcontext() if launched else single_process_group(cfg)
    try:
        with group:
            result = _train(cfg, callbacks, save_config=not launched)
        if launched and torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()  # every rank is done: a clean, quick exit
        return result
    finally:
        if launched:
            uninstall_sigterm_flag()


def check_training_data(cfg: RunConfig) -> None:
    """Refuse to train on a derived file older than its inputs (a re-merge after validate, a changed source).

    Raises:
        ValueError: naming the stale file, why it is stale and the stage to re-run.
    """
    merged, clean = paths.merged_json(cfg), paths.clean_json(cfg)
    if merged.is_file() and inputs_stamp_path(merged).is_file() and (why := stale_reason(merged)):
        raise ValueError(f"{merged} is out of date: {why}; run the merge stage again (then validate)")
    if clean.is_file() and (why := stale_reason(clean)):
        raise ValueError(
            f"{clean} is out of date: {why}; run the validate stage again (icmlab validate), so that training "
            "never reads the records of an earlier merge"
        )


def _train(cfg: RunConfig, callbacks: Sequence[Any], save_config: bool) -> TrainResult:
    from transformers import set_seed

    from icmlab.inputs.recordstore import RecordStore
    from icmlab.train.callbacks import GracefulStopCallback
    from icmlab.train.dataset import SupervisedDataset

    data_file = paths.training_json(cfg)
    if not data_file.is_file():
        raise FileNotFoundError(f"training data {data_file} not found; run the merge (and validate) stage first")
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    if save_config:  # launched workers were started from the saved file
        save_resolved(cfg)
    set_seed(cfg.seed)
    log.info(batch_message(cfg))

    family = get_family(cfg.model.family)
    args = build_training_args(cfg)  # before the model: ZeRO-3 must know about itself at load time
    _init_distributed(args)
    bundle = family.load_for_training(cfg)
    ds_config = getattr(args, "hf_deepspeed_config", None)  # set only when a ZeRO config is given
    if ds_config is not None and ds_config.is_zero3():
        # transformers 5.24 attaches extra ZeRO-3-only key renames to a model loaded under zero.Init;
        # reversed at save time they write "language_model.model.model.*" keys. Dropping them makes
        # checkpoints and the final model use the same llava-hf layout as a plain run.
        _unwrap_peft(bundle.model)._weight_conversions = None
    dataset = SupervisedDataset.from_bundle(RecordStore.open(data_file), bundle, cfg)
    log.info("%d training samples from %s", len(dataset), data_file)

    if _is_main_process():
        interrupted_marker(cfg).unlink(missing_ok=True)
    stop = GracefulStopCallback(cfg.train.save_every_minutes)
    trainer = build_trainer(cfg, bundle, dataset, args, callbacks=[stop, *callbacks])

    resume = prepare_resume(cfg) if cfg.train.resume else None
    if resume:
        log.info("resuming from %s", resume)
    output = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    if stop.stopped_at is not None:
        _barrier()  # every rank has written its part of the checkpoint
        if _is_main_process():
            from icmlab.io import atomic_write_json

            atomic_write_json(
                interrupted_marker(cfg),
                {
                    "step": stop.stopped_at,
                    "checkpoint": str(paths.checkpoints_dir(cfg) / f"checkpoint-{stop.stopped_at}"),
                },
            )
        _barrier()
        log.warning("stopped by SIGTERM at step %d; checkpoint saved, rerun to resume", stop.stopped_at)
        return _result_from_disk(
            cfg, "inprocess", resumed_from=resume, interrupted=True, step=trainer.state.global_step
        )

    model_dir = _save_final(trainer, bundle, family, cfg)
    if cfg.train.push_to_hub and _is_main_process():
        push_to_hub(model_dir, cfg.train.push_to_hub)
    result = _result_from_disk(cfg, "inprocess", resumed_from=resume, step=trainer.state.global_step)
    result.model_dir = model_dir
    if _is_main_process():
        import time

        from icmlab.io import atomic_write_json

        atomic_write_json(
            trained_marker(cfg),
            {
                "global_step": result.global_step,
                "max_steps": cfg.train.max_steps,
                "epochs": cfg.train.epochs,
                "model": str(model_dir),
                "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
            },
        )
    log.info("train loss %.4f over %d steps", output.training_loss, output.global_step)
    return result


def _init_distributed(args: Any) -> None:
    """Set up the process group before a ZeRO-3 load partitions the weights over it.

    ``args.device`` makes accelerate initialise torch.distributed (gloo for CPU ranks); DeepSpeed's
    own ``deepspeed.comm`` must then adopt that group, or ``zero.Init`` sees a world of 1 on CPU.
    """
    _ = args.device
    if (
        getattr(args, "hf_deepspeed_config", None) is not None
        and torch.distributed.is_available()
        and torch.distributed.is_initialized()
    ):
        import deepspeed
        from deepspeed.accelerator import get_accelerator

        deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name())


def _unwrap_peft(model: torch.nn.Module) -> torch.nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def prepare_resume(cfg: RunConfig) -> Path | None:
    """The checkpoint to resume from: the newest whose files are whole (:mod:`icmlab.train.checkpoints`).

    Incomplete ones (killed mid-save, no ``trainer_state.json``) are removed; newer damaged ones are
    reported and set aside as ``corrupt-checkpoint-N`` (by rank 0; every rank makes the same choice).
    """
    ckdir = paths.checkpoints_dir(cfg)
    resume, damaged = newest_loadable_checkpoint(ckdir)
    if _is_main_process() and ckdir.is_dir():
        for d, why in damaged:
            set_aside(d, why)
        for d in ckdir.glob("checkpoint-*"):
            if d.is_dir() and d != resume and not (d / "trainer_state.json").exists():
                log.warning("removing incomplete checkpoint %s (the process was killed while saving it)", d)
                shutil.rmtree(d)
    return resume


def _save_final(trainer: Any, bundle: Any, family: Any, cfg: RunConfig) -> Path:
    """Write the final model with the family's ``save_bundle`` on rank 0.

    Under ZeRO-3 the weights are partitioned over the ranks. Full fine-tunes are consolidated the
    Trainer's memory-frugal way (``save_model``: layer by layer into rank 0's CPU memory, then a
    staging folder) and reloaded on rank 0's CPU for ``save_bundle``; LoRA models (whose adapter
    the Trainer saves alone) gather all weights on every rank for the merge.
    """
    out = paths.final_model_dir(cfg)
    bundle.model = trainer.model
    bundle.model.config.use_cache = True  # inference default for the saved model
    ds_cfg = getattr(trainer.args, "hf_deepspeed_config", None)
    if ds_cfg is None or not ds_cfg.is_zero3():
        if _is_main_process():
            _save_adapter(bundle.model, cfg)
            family.save_bundle(bundle, out)
    elif not hasattr(bundle.model, "get_base_model"):
        from transformers.integrations.deepspeed import set_hf_deepspeed_config, unset_hf_deepspeed_config

        staging = cfg.run_dir / ".model-staging"
        trainer.save_model(str(staging))
        if _is_main_process():
            unset_hf_deepspeed_config()  # load a whole, unpartitioned copy on the CPU
            try:
                full = type(bundle.model).from_pretrained(staging, dtype=next(iter(bundle.model.parameters())).dtype)
            finally:
                set_hf_deepspeed_config(ds_cfg)
            family.save_bundle(dataclasses.replace(bundle, model=full), out)
            shutil.rmtree(staging, ignore_errors=True)
    else:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(bundle.model.parameters()), modifier_rank=None):
            if _is_main_process():
                _save_adapter(bundle.model, cfg)
                family.save_bundle(bundle, out)
    _barrier()
    return out


def _save_adapter(model: Any, cfg: RunConfig) -> None:
    """Keep a LoRA run's adapter alone (PEFT layout, ``runs/<run>/adapter``) before ``save_bundle``
    merges it; the export stage ships it as the adapter-only release. Written to a staging folder
    and renamed into place."""
    if not hasattr(model, "peft_config"):
        return
    out = paths.adapter_dir(cfg)
    staging = out.with_name(".adapter-staging")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)


def _barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def push_to_hub(model_dir: Path, repo_id: str) -> str:
    """Upload the final model folder to a hub model repo (created private if missing).

    Returns:
        The commit URL.
    """
    from icmlab.export.hub import push_folder

    return push_folder(model_dir, repo_id, private=True, commit_message="icmlab train stage")


def _result_from_disk(
    cfg: RunConfig, mode: str, *, resumed_from: Path | None = None, interrupted: bool = False, step: int | None = None
) -> TrainResult:
    metrics = paths.metrics_jsonl(cfg)
    rows = read_jsonl(metrics) if metrics.exists() else []
    model_dir = paths.final_model_dir(cfg)
    last_loss = next((r["loss"] for r in reversed(rows) if r.get("loss") is not None), None)
    return TrainResult(
        run_dir=cfg.run_dir,
        model_dir=model_dir if model_dir.exists() and not interrupted else None,
        metrics_path=metrics,
        global_step=step if step is not None else (rows[-1]["step"] if rows else 0),
        final_loss=last_loss if last_loss is None or math.isfinite(last_loss) else None,
        resumed_from=resumed_from,
        interrupted=interrupted,
        mode=mode,
    )
