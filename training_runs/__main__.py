r"""``python -m training_runs``: run a paper group's training configs × repeats, then its figures.

    python -m training_runs list
    python -m training_runs digits data/digits.npz          # a small real dataset (scikit-learn)
    python -m training_runs run normalization --dataset data/digits.npz --repeats 2 \
        --out training_runs/results                         # small CPU version + figures
    python -m training_runs run resnet56 --size paper --dataset cifar10 --repeats 4 --out runs/p
    python -m training_runs run imagenet --dataset data/digits.npz   # small ResNet-50 group
    python -m training_runs run imagenet --size paper --data-dir DIR --repeats 1 --out runs/p
    python -m training_runs aggregate normalization --out training_runs/results
    python -m training_runs speed --out training_runs/results   # SMN vs BN step time

Each run trains in ``<out>/<group>/<label>/seed<r>`` with ``gne_jax.training``; a finished
run is not repeated (the same command resumes or skips it), so a group can be run in
pieces. ``aggregate`` draws ``<group>_accuracy.png`` (mean test accuracy over repeats,
legend "mean of last 10 ± 2σ"), ``<group>_gradients.png`` (per-layer gradient norms over
the first epochs) and ``<group>_loss.png`` and writes ``<group>_summary.csv``.

Bad arguments (an unknown ``--only`` label, ``--repeats`` below 1, a ``--dataset`` that
does not exist or that a run's config refuses) stop with one ``error:`` line, exit status
2, before anything is trained or created. A training run that fails is reported and the
others still run and are aggregated; the command then exits with status 1, listing them.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from training_runs.figures import aggregate, slug
from training_runs.groups import GROUPS, PAPER_COST, run_config


def make_digits(path: str, seed: int = 0) -> None:
    """scikit-learn's 8×8 handwritten digits (1797 images) as an .npz: 80/20 split, uint8."""
    import numpy as np
    from sklearn.datasets import load_digits

    d = load_digits()
    x = np.round(d.images * (255 / 16)).astype(np.uint8)
    y = d.target.astype(np.int32)
    perm = np.random.default_rng(seed).permutation(len(y))
    n = int(0.8 * len(y))
    tr, te = perm[:n], perm[n:]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    np.savez_compressed(path, x_train=x[tr], y_train=y[tr], x_test=x[te], y_test=y[te])
    print(f"wrote {path}: {len(tr)} train, {len(te)} test, 8x8 grayscale, 10 classes")


def check_runs(group: str, *, dataset: str | None, size: str, only: list[str] | None = None,
               data_dir: str | None = None) -> str | None:
    """A one-line message naming the first run of ``group`` whose config the training would
    refuse (a missing dataset file, a bad value), checked before any training; else None."""
    from gne_jax.training.train import validate_config

    for run in [r for r in GROUPS[group] if not only or r.label in only]:
        config = run_config(group, run, size=size, dataset=dataset, seed=0, data_dir=data_dir)
        try:
            validate_config(config)
        except ValueError as err:
            return f"{group} | {run.label}: " + " ".join(str(err).split())
    return None


def run_group(group: str, *, dataset: str | None, repeats: int, size: str, out: str,
              only: list[str] | None = None, data_dir: str | None = None) -> list[str]:
    """Trains the runs of ``group`` (those labelled in ``only``, default all) × ``repeats``;
    returns one line per run that failed (the others are still run)."""
    from gne_jax._cache import enable_compilation_cache
    from gne_jax.training.train import train_and_evaluate

    enable_compilation_cache()
    runs = [r for r in GROUPS[group] if not only or r.label in only]
    failed = []
    for run in runs:
        for seed in range(repeats):
            workdir = os.path.join(out, group, slug(run.label), f"seed{seed}")
            config = run_config(group, run, size=size, dataset=dataset, seed=seed,
                                data_dir=data_dir)
            t0 = time.perf_counter()
            try:
                result = train_and_evaluate(config, workdir)
                last = result.history[-1] if result.history else {}
                print(f"{group} | {run.label} | seed {seed}: test acc "
                      f"{last.get('eval_accuracy', float('nan')):.4f} "
                      f"({time.perf_counter() - t0:.0f} s)", flush=True)
            except Exception as err:  # noqa: BLE001  (a diverged run is a result too)
                line = (f"{group} | {run.label} | seed {seed}: FAILED {type(err).__name__}: "
                        f"{str(err)[:200]}")
                print(line, flush=True)
                failed.append(line)
    return failed


class _Parser(argparse.ArgumentParser):
    """Argument errors as one ``error: ...`` line (exit status 2), without the usage block."""

    def error(self, message):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _check_run_args(q: argparse.ArgumentParser, args) -> None:
    """The ``run`` arguments that argparse cannot check alone, before anything is created."""
    labels = [r.label for r in GROUPS[args.group]]
    unknown = [o for o in args.only or [] if o not in labels]
    if unknown:
        q.error(f"argument --only: {', '.join(map(repr, unknown))} is not a run of group "
                f"{args.group!r}; expected labels among {labels}")
    d = args.dataset
    if d is not None and (d.endswith(".npz") or os.sep in d) and not os.path.exists(d):
        q.error(f"argument --dataset: {d!r} does not exist; expected an .npz file, an image "
                "folder or the name of a TFDS dataset")
    message = check_runs(args.group, dataset=d, size=args.size, only=args.only,
                         data_dir=args.data_dir)
    if message is not None:
        q.error(f"{message} (from --dataset/--size/--data-dir)")


def main(argv=None):
    p = _Parser(prog="python -m training_runs", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list")
    d = sub.add_parser("digits")
    d.add_argument("path")
    run_parser = None
    for name in ("run", "aggregate"):
        q = sub.add_parser(name)
        if name == "run":
            run_parser = q
        q.add_argument("group", choices=sorted(GROUPS))
        q.add_argument("--out", default="training_runs/results")
        if name == "run":
            q.add_argument("--dataset", default=None,
                           help=".npz file, image folder, or a TFDS name (default: the "
                                "config's own dataset)")
            q.add_argument("--data-dir", default=None,
                           help="TFDS data_dir of a prepared TFDS dataset (e.g. imagenet2012)")
            q.add_argument("--repeats", type=_positive_int, default=2,
                           help="seeds per run (a positive integer)")
            q.add_argument("--size", choices=("small", "paper"), default="small")
            q.add_argument("--only", nargs="*", help="run labels to run (default: all)")
    s = sub.add_parser("speed")
    s.add_argument("--out", default="training_runs/results")
    s.add_argument("--depth", type=_positive_int, default=20)
    s.add_argument("--batch", type=_positive_int, default=64)
    s.add_argument("--repeats", type=_positive_int, default=5)
    args = p.parse_args(argv)
    if args.cmd == "list":
        for g, runs in GROUPS.items():
            print(f"{g}: {', '.join(r.label for r in runs)}  [paper size: {PAPER_COST[g]}]")
        return
    if args.cmd == "digits":
        make_digits(args.path)
        return
    if args.cmd == "speed":
        from training_runs.speed import speed_figure

        print(speed_figure(args.out, depth=args.depth, batch=args.batch, repeats=args.repeats))
        return
    failed = []
    if args.cmd == "run":
        _check_run_args(run_parser, args)
        failed = run_group(args.group, dataset=args.dataset, repeats=args.repeats,
                           size=args.size, out=args.out, only=args.only,
                           data_dir=args.data_dir)
    paths = aggregate(args.out, args.group, [r.label for r in GROUPS[args.group]])
    for k, v in paths.items():
        print(f"{k}: {v}")
    if failed:
        print(f"error: {len(failed)} training run(s) of {args.group!r} failed:", *failed,
              sep="\n", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
