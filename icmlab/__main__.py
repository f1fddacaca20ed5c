"""Command line: ``icmlab <command> parameters/X.yaml [--set key=value ...]``.

Commands:
    run        execute the stage notebooks with papermill into runs/<run_name>/ (--only, --from, --force)
    setup      check this machine against the recipe
    download   fetch and lay out data and weights (--dry-run lists what and how big)
    merge      merge the recipe's JSONs in the model's image-token dialect
    validate   preflight validation report (and cleaned file with the ``drop`` policy)
    inspect    dataset statistics and figures (PNG) in the run directory
    train      train (launches deepspeed/torchrun for several GPUs or CPU ranks); also the launcher's worker entry
    slurm      write an sbatch script for the run (--nodes, --gpus-per-node, --partition, --time, --submit)
    evaluate   baseline vs fine-tuned evaluation and the HTML/PNG report
    export     the model in llava-hf / PEFT adapter / original mPLUG-Owl2 layouts, model card, serve commands, hub push

Every command loads the config the same way as the notebooks (``load_run_config``).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import sys

from icmlab.config import ConfigError, load_run_config
from icmlab.redact import install_log_redaction, redact_text
from icmlab.rundir import run_dir_lock

# Subcommand -> module whose run(cfg) implements it (litgpt-style table; no branching on names).
STAGE_MODULES = {
    "setup": "icmlab.envinfo",
    "download": "icmlab.download",
    "merge": "icmlab.merge",
    "validate": "icmlab.validate",
    "inspect": "icmlab.inspection",
    "train": "icmlab.train",
    "evaluate": "icmlab.evaluate",
    "export": "icmlab.export",
}


def _overrides(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise SystemExit(f"--set expects key=value (e.g. train.lr=1e-5), got {pair!r}")
        k, v = pair.split("=", 1)
        out[k.strip()] = v
    return out


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for tests and --help)."""
    p = argparse.ArgumentParser(
        prog="icmlab", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="command", required=True)
    for name in ("run", *STAGE_MODULES, "slurm"):
        sp = sub.add_parser(name)
        sp.add_argument("params", help="parameters file (parameters/<model>__<dataset>__<strategy>.yaml)")
        sp.add_argument(
            "--set",
            dest="overrides",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="override a config key, e.g. --set train.lr=1e-5 (repeatable)",
        )
        sp.add_argument(
            "-v",
            "--verbose",
            action="store_true",
            help="debug logging, a failure's traceback; for run also papermill's and the kernel's logs",
        )
        if name == "run":
            sp.add_argument("--only", nargs="+", metavar="STEP", help="run only these stages")
            sp.add_argument("--from", dest="start", metavar="STEP", help="start at this stage")
            sp.add_argument(
                "--force",
                action="store_true",
                help="re-run stages even when up to date (a finished train is kept: `icmlab train --force` retrains)",
            )
        if name == "download":
            sp.add_argument("--dry-run", action="store_true", help="list what would be fetched and how big")
        if name == "slurm":
            sp.add_argument("--nodes", type=int, default=None, help="nodes (default: hardware.num_nodes)")
            sp.add_argument(
                "--gpus-per-node",
                type=int,
                default=None,
                dest="per_node",
                help="ranks per node: GPUs (hardware.num_gpus), or CPU processes with hardware.device: "
                "cpu (hardware.num_processes)",
            )
            sp.add_argument("--partition", default=None, help="#SBATCH --partition")
            sp.add_argument("--time", default=None, help="#SBATCH --time (e.g. 12:00:00)")
            sp.add_argument(
                "--grace",
                type=int,
                default=None,
                metavar="SECONDS",
                help="SIGTERM this long before the time limit (--signal=TERM@SECONDS; default 300)",
            )
            sp.add_argument("--cpus-per-task", type=int, default=None, help="#SBATCH --cpus-per-task")
            sp.add_argument(
                "--srun-ranks",
                action="store_true",
                help="one srun task per rank (rank from SLURM_PROCID) instead of one per node",
            )
            sp.add_argument(
                "--sbatch",
                action="append",
                default=[],
                metavar="OPTION",
                help="extra #SBATCH option, e.g. --sbatch=--account=proj (repeatable)",
            )
            sp.add_argument("--submit", action="store_true", help="submit the script with sbatch")
        if name == "train":
            sp.add_argument(
                "--force",
                action="store_true",
                help="retrain a finished run (its model, checkpoints and metrics are moved to runs/<run>/previous/)",
            )
            # deepspeed's launcher appends --local_rank=N to the worker command line.
            sp.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``icmlab`` console script."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )
    install_log_redaction()  # no token, signed URL or credentials in a log line
    try:
        cfg = load_run_config(args.params, _overrides(args.overrides))
    except (ConfigError, FileNotFoundError) as e:
        print(redact_text(f"error: {e}"), file=sys.stderr)
        return 2
    if args.command == "run":
        from icmlab.runner import StageFailed, StageInterrupted, run_pipeline

        try:
            result = run_pipeline(cfg, only=args.only, start=args.start, force=args.force, verbose=args.verbose)
        except StageInterrupted as e:  # SIGTERM: the checkpoint is saved, a rerun resumes
            print(f"interrupted: {e}", file=sys.stderr)
            return 143
        except (StageFailed, ValueError) as e:
            print(redact_text(f"error: {e}"), file=sys.stderr)
            return 1
        print(result.summary())
        print(f"\nexecuted notebooks: {result.run_dir}")
        if result.report.exists():
            print(f"report: {result.report}")
        return 0
    if args.command == "slurm":
        return _slurm(cfg, args)
    module = importlib.import_module(STAGE_MODULES[args.command])
    if args.command == "train" and args.force:
        from icmlab.train.stage import RETRAIN_ENV

        os.environ[RETRAIN_ENV] = "1"
    try:
        if args.command == "download" and args.dry_run:
            print(redact_text(module.format_plan(module.plan(cfg))))
            return 0
        # evaluate writes eval/ and report/ into the run directory: one writer at a time (merge,
        # validate, inspect and train take the lock themselves, notebooks included). Under torchrun
        # only global rank 0 writes, so only it holds the lock; its sibling ranks must not wait on it.
        writer = args.command == "evaluate" and os.environ.get("RANK", "0") == "0"
        with run_dir_lock(cfg, args.command) if writer else contextlib.nullcontext():
            result = module.run(cfg)
    except (OSError, RuntimeError, ValueError) as e:  # user-facing failures: message, no traceback
        logging.getLogger("icmlab").debug("stage failed", exc_info=True)
        print(redact_text(f"error: {args.command}: {e}"), file=sys.stderr)
        return 1
    text = getattr(result, "summary", None) or getattr(result, "table", None)
    print(redact_text(str(text() if callable(text) else result)))
    # A training job stopped by SIGTERM saved a checkpoint but is not finished: 128 + SIGTERM, so
    # launchers and schedulers see it as interrupted (a rerun resumes). A rank of a job that
    # icmlab launched exits 0 instead, so that the deepspeed/torchrun launcher does not tear the
    # other ranks down; the job's interrupted.json carries the verdict to the launching process.
    if not getattr(result, "interrupted", False):
        return 0
    from icmlab.train.launch import LAUNCHED_ENV, is_launched_worker

    return 0 if is_launched_worker() and os.environ.get(LAUNCHED_ENV) == "1" else 143


def _slurm(cfg, args: argparse.Namespace) -> int:
    """``icmlab slurm``: write (and optionally submit) the run's sbatch script."""
    from icmlab.train import slurm
    from icmlab.train.args import resolve_device

    try:
        if cfg.hardware.device == "auto":  # a login node may have no GPU: decide from the request
            cfg.hardware.device = (
                "cuda" if args.per_node or cfg.hardware.num_gpus > 1 else resolve_device(cfg).hardware.device
            )
        shaped = slurm.cluster_config(cfg, nodes=args.nodes, per_node=args.per_node)
        kwargs = {
            "partition": args.partition,
            "time": args.time,
            "cpus_per_task": args.cpus_per_task,
            "srun_ranks": args.srun_ranks,
            "extra": tuple(args.sbatch),
        }
        if args.grace is not None:
            kwargs["grace_s"] = args.grace
        job = slurm.write_sbatch(shaped, **kwargs)
        if args.submit:
            slurm.submit(job)
    except (RuntimeError, ValueError) as e:
        print(f"error: slurm: {e}", file=sys.stderr)
        return 1
    print(job.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
