"""The beta sweep and the single- vs multi-scale comparison of issue 10: every training run, then the analyses and
the README's tables, each one command.

    python bench/experiments.py beta --jobs 12            # 4 betas x 3 seeds of sprites32-multi on sprites32
    python bench/experiments.py convergence --jobs 6      # *-single vs *-multi on mnist, fashion-mnist, sprites32
    python bench/experiments.py report                    # analyses -> docs/analysis/{beta,convergence}, README
    python bench/experiments.py all --smoke               # the whole pipeline at toy lengths (a check, minutes)

Runs go to ``--runs`` (default runs/experiments/), one folder per training run with its ``train.log``; finished
runs (with final/) are skipped, so an interrupted batch is restarted by running the same command again. ``--jobs``
training runs go at once, each with ``--threads`` CPU threads (on a GPU machine each run uses the GPU; several
small runs share it well). ``--print`` only prints the commands. ``report`` runs ``python -m nvae_hub.analysis beta``
and ``convergence`` on the finished runs (the full disentanglement protocol unless ``--smoke``), writes their PNG,
JSON and report.md into ``--docs`` and puts the tables between the experiment markers of README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
README_BEGIN, README_END = "<!-- experiments:begin -->", "<!-- experiments:end -->"

BETAS = (1, 2, 4, 8)
SEEDS = (0, 1, 2)
DATASETS = ("mnist", "fashion-mnist", "sprites32")
# Lengths: the beta sweep in steps (sprites32 has 727,280 training images: 2,000 steps are 0.18 epochs), the
# comparison in epochs for the MNISTs (937 steps each) and in steps for sprites32, evaluated 20 times per run.
BETA_STEPS = 2_000
CONVERGENCE_LENGTH = {"mnist": ("--epochs", 10), "fashion-mnist": ("--epochs", 10), "sprites32": ("--max-steps", 8_000)}
STEPS_PER_EPOCH = {"mnist": 60_000 // 64, "fashion-mnist": 60_000 // 64, "sprites32": 727_280 // 64}
# Fashion-MNIST's 8-bit likelihood is in the thousands of nats per image, so the default --skip-threshold 2000 would
# skip many early updates (as for the fashion-mnist-small model in the README).
DATASET_OPTIONS = {"fashion-mnist": ["--skip-threshold", "20000"]}
EVALUATIONS = 20
EVAL_LIMIT = 5_000
SMOKE = {"steps": 12, "evaluations": 3, "eval_limit": 64}


def train_command(preset: str, dataset: str, out: Path, length: tuple[str, int], extra: list[str],
                  args: argparse.Namespace) -> list[str]:
    """A train/run.py command line: the bundled MNIST model's recipe (batch 64, learning-rate warm-up over 5% of
    training, the paper's MNIST recipe otherwise). Smoke runs warm up over half their few steps: the full
    learning rate at once makes the first updates explode."""
    return [sys.executable, "train/run.py", "--preset", preset, "--dataset", dataset, "--output-dir", str(out),
            length[0], str(length[1]), "--batch-size", "64", "--lr-warmup", "0.5" if args.smoke else "0.05",
            "--threads", str(args.threads), "--sample-every", "1000000", *extra]


def beta_runs(args: argparse.Namespace) -> list[tuple[Path, list[str]]]:
    """(run folder, command) of every run of the beta sweep."""
    steps = SMOKE["steps"] if args.smoke else args.beta_steps
    runs = []
    for beta in args.betas:
        for seed in args.seeds:
            out = args.runs / "beta" / f"beta{beta:g}-seed{seed}"
            runs.append((out, train_command("sprites32-multi", "sprites32", out, ("--max-steps", steps),
                                            ["--beta", f"{beta:g}", "--seed", str(seed)], args)))
    return runs


def convergence_runs(args: argparse.Namespace) -> list[tuple[Path, list[str]]]:
    """(run folder, command) of every run of the single- vs multi-scale comparison."""
    runs = []
    for dataset in args.datasets:
        option, value = ("--max-steps", SMOKE["steps"]) if args.smoke else CONVERGENCE_LENGTH[dataset]
        if args.convergence_steps and not args.smoke:
            option, value = "--max-steps", args.convergence_steps
        steps = value if option == "--max-steps" else value * STEPS_PER_EPOCH[dataset]
        evaluations = SMOKE["evaluations"] if args.smoke else EVALUATIONS
        eval_limit = SMOKE["eval_limit"] if args.smoke else args.eval_limit
        for kind in ("single", "multi"):
            for seed in args.seeds[:args.convergence_seeds]:
                out = args.runs / "convergence" / f"{dataset}-{kind}-seed{seed}"
                extra = ["--seed", str(seed), "--eval-every", str(max(1, steps // evaluations)),
                         "--eval-limit", str(eval_limit), *DATASET_OPTIONS.get(dataset, [])]
                runs.append((out, train_command(f"{dataset}-{kind}", dataset, out, (option, value), extra, args)))
    return runs


def run_all(runs: list[tuple[Path, list[str]]], args: argparse.Namespace) -> None:
    """Run the commands ``--jobs`` at a time (finished runs skipped); exit 1 if one fails."""
    todo = [(out, command) for out, command in runs if not (out / "final" / "config.json").is_file()]
    for out, command in runs:
        print(("skip (finished): " if (out, command) not in todo else "") + shlex.join(command), flush=True)
    if args.print or not todo:
        return
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(args.threads), "PYTHONUNBUFFERED": "1"}

    def one(job: tuple[Path, list[str]]) -> tuple[Path, int, float]:
        out, command = job
        out.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        resume = ["--resume"] if (out / "checkpoints").is_dir() else []
        with (out / "train.log").open("a") as log:
            code = subprocess.run(["nice", "-n", str(args.nice), *command, *resume], cwd=REPO, env=env,
                                  stdout=log, stderr=subprocess.STDOUT, check=False).returncode
        return out, code, time.perf_counter() - start

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        results = list(pool.map(one, todo))
    failed = [out for out, code, _ in results if code != 0]
    for out, code, seconds in results:
        print(f"{'FAILED' if code else 'done'} in {seconds / 60:.1f} min: {out} (log: {out / 'train.log'})")
    if failed:
        sys.exit(1)


def analyse(item: str, runs: list[Path], out: Path, args: argparse.Namespace) -> dict:
    """Run one analysis item on finished runs; return its JSON. An ``ITEM.json`` already in ``out`` for exactly
    these runs and the same mode is reused (like finished runs: the full protocol takes hours on a CPU)."""
    missing = [str(r) for r in runs if not (r / "final" / "config.json").is_file()]
    if missing:
        sys.exit(f"unfinished runs (train them first): {', '.join(missing)}")
    done = out / f"{item}.json"
    if done.is_file():
        numbers = json.loads(done.read_text())
        # "models": the run folders, or one entry per run with its folder under "run" (the beta item)
        made_for = [m["run"] if isinstance(m, dict) else m for m in numbers.get("models") or []]
        if made_for == [str(r) for r in runs] and numbers.get("quick") == args.smoke:
            print(f"{item}: reusing {done} (made for these runs; delete it to analyse again)", flush=True)
            return numbers
    command = [sys.executable, "-m", "nvae_hub.analysis", item, "--models", *map(str, runs), "--output-dir",
               str(out), "--jobs", str(args.jobs), *(["--quick"] if args.smoke else []), *args.analysis_options]
    print(shlex.join(command), flush=True)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run(["nice", "-n", str(args.nice), *command], cwd=REPO, env=env, check=True)
    return json.loads(done.read_text())


def report(args: argparse.Namespace) -> None:
    """The analyses of the finished runs of the experiments in ``--items``, and the README tables (an experiment
    left out is said to be not run)."""
    beta = convergence = None
    if "beta" in args.items:
        beta = analyse("beta", [out for out, _ in beta_runs(args)], args.docs / "beta", args)
    if "convergence" in args.items:
        convergence = analyse("convergence", [out for out, _ in convergence_runs(args)], args.docs / "convergence",
                              args)
    text = readme_section(beta, convergence, args)
    (args.docs / "experiments.md").write_text(text)
    readme = (REPO / "README.md").read_text()
    if README_BEGIN in readme and README_END in readme and not args.smoke:
        head, rest = readme.split(README_BEGIN, 1)
        _, tail = rest.split(README_END, 1)
        (REPO / "README.md").write_text(f"{head}{README_BEGIN}\n{text}{README_END}{tail}")
        print("README.md: experiment tables updated")
    print(text)


def readme_section(beta: dict | None, convergence: dict | None, args: argparse.Namespace) -> str:
    """Markdown tables of the two experiments, with their figures (a line saying so for one not analysed)."""
    docs = os.path.relpath(args.docs, REPO)
    return beta_table(beta, docs) + "\n" + convergence_table(convergence, docs)


def beta_table(beta: dict | None, docs: str) -> str:
    """The beta sweep's table and figure."""
    if beta is None:
        return "**Beta sweep**: not run yet (`python bench/experiments.py beta`, then `report`).\n"
    keys = ["elbo", "recon", "kl", "beta_vae", "factor_vae", "mig", "dci", "sap"]
    names = ["ELBO", "recon", "KL", "BetaVAE", "FactorVAE", "MIG", "DCI", "SAP"]

    def cell(stats: dict) -> str:
        if stats is None or stats["mean"] is None:
            return "-"
        return f"{stats['mean']:.3g}" + (f" ± {stats['std']:.2g}" if stats["std"] else "")

    rows = "".join(f"| {s['beta']:g} | {s['normalised_beta']:.3g} | {s['seeds']} | "
                   + " | ".join(cell(s.get(k)) for k in keys) + " |\n" for s in beta["by_beta"].values())
    base = beta.get("baseline_scores") or {}
    rows += "| pixel PCA | | | | | | " + " | ".join(
        "-" if base.get(k) is None else f"{base[k]:.3g}" for k in keys[3:]) + " |\n"
    sizes = beta["sizes"]
    return (f"**Beta sweep** (`sprites32-multi` on sprites32, {sizes['models']} models; ELBO terms in nats on "
            f"{sizes['test_images']} test images; scores of the posterior means, per-group PCA to "
            f"{sizes['pca_components_per_group']} components, on a pool of {sizes['pool_images']} images):\n\n"
            "| beta | normalised beta | seeds | " + " | ".join(names) + " |\n|" + "---|" * (3 + len(keys)) + "\n"
            + rows + f"\n![beta sweep]({docs}/beta/beta.png)\n")


def convergence_table(convergence: dict | None, docs: str) -> str:
    """The single- vs multi-scale comparison's table and figure."""
    if convergence is None:
        return ("**Single- vs multi-scale**: not run yet (`python bench/experiments.py convergence`, then "
                "`report`).\n")

    def fmt(value: float | None) -> str:
        return "not reached" if value is None else f"{value:.3g}"

    text = ("**Single- vs multi-scale** (test negative ELBO, nats; epochs to reach the single-scale model's final "
            "test loss; the reference is users' reports of about 15% fewer epochs, ratio "
            f"{convergence['reference_ratio']}):\n\n"
            "| data set | parameters (single / multi) | final loss single | final loss multi | epochs single | "
            "epochs multi | ratio | geometric mean ratio over levels |\n|---|---|---|---|---|---|---|---|\n")
    for name, data in convergence["datasets"].items():
        epochs = data["epochs_to_single_final_loss"]
        final = {kind: data["curves"][kind]["test_neg_elbo_nats"][-1] for kind in ("single", "multi")}
        text += (f"| {name} | {data['parameters']['single']:,} / {data['parameters']['multi']:,} | "
                 f"{final['single']:.2f} | {final['multi']:.2f} | "
                 f"{fmt(epochs['single'])} | {fmt(epochs['multi'])} | {fmt(data['ratio_at_single_final_loss'])} | "
                 f"{fmt(data['geometric_mean_ratio'])} |\n")
    return text + f"\n![single- vs multi-scale]({docs}/convergence/convergence.png)\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["beta", "convergence", "report", "all"])
    parser.add_argument("--runs", type=Path, default=REPO / "runs" / "experiments", help="folder of the runs")
    parser.add_argument("--docs", type=Path, default=REPO / "docs" / "analysis",
                        help="folder of the analyses' outputs (default: docs/analysis)")
    parser.add_argument("--betas", type=float, nargs="+", default=list(BETAS))
    parser.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    parser.add_argument("--convergence-seeds", type=int, default=1, help="seeds per model in the comparison")
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=DATASETS)
    parser.add_argument("--beta-steps", type=int, default=BETA_STEPS, help="training steps per beta-sweep run")
    parser.add_argument("--convergence-steps", type=int, default=None,
                        help="training steps of every comparison run (default: 10 epochs of the MNISTs, 8,000 steps "
                             "of sprites32)")
    parser.add_argument("--eval-limit", type=int, default=EVAL_LIMIT,
                        help=f"test images of each evaluation in the comparison (default: {EVAL_LIMIT:,})")
    parser.add_argument("--jobs", type=int, default=1,
                        help="training runs at once; for report, processes for DCI's classifiers (default: 1)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads per run (default: 1)")
    parser.add_argument("--nice", type=int, default=10, help="niceness of every process (default: 10)")
    parser.add_argument("--smoke", action="store_true", help="toy lengths and quick analyses: checks the pipeline")
    parser.add_argument("--print", action="store_true", help="print the training commands, run nothing")
    parser.add_argument("--items", nargs="+", default=["beta", "convergence"], choices=["beta", "convergence"],
                        help="report: the experiments to analyse (default: both; one left out is reported not run)")
    parser.add_argument("--analysis-options", nargs=argparse.REMAINDER, default=[],
                        help="passed on to python -m nvae_hub.analysis (e.g. --num-images 737280 --device cuda)")
    args = parser.parse_args()
    if args.smoke:
        args.runs = args.runs.with_name(args.runs.name + "-smoke")
        args.docs = args.runs / "docs"
    if args.what in ("beta", "all"):
        run_all(beta_runs(args), args)
    if args.what in ("convergence", "all"):
        run_all(convergence_runs(args), args)
    if args.what in ("report", "all") and not args.print:
        report(args)


if __name__ == "__main__":
    main()
