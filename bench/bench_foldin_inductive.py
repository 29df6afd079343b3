"""Fold-in quality for users the model never saw (inductive), against the transductive figure.

The token export's ``foldin_quality.json`` folds in users that were in the graph the item
vectors were propagated over. Here ``--holdout-fraction`` of the users (seeded) are "new":
their training and validation interactions are removed before DPPMG is built and trained
(``recbole_dppmg.tokens.foldin_inductive``), so they are absent from the training graph, the
training batches and early stopping. After training, the export's fold-in map is fitted on the
trained users, the new users are folded in from their own training items and quantized with
the model's codebooks, and their validation and test items are ranked (RecBole's protocol:
earlier splits' items excluded). Reference: the same training with no user held out (same seed
and overrides), the same users scored by their own tokens, and folded in by that model.

    python bench/bench_foldin_inductive.py --torch_num_threads=1
    python bench/bench_foldin_inductive.py --torch_num_threads=1 --override loss_type=bpr \\
        --out saved/foldin_inductive_bpr.json

``--override key=value`` (repeatable) and any ``--key=value`` are DPPMG config overrides, values
read as YAML, as on ``run_dppmg.py``'s command line. Two trainings: about 5-7 minutes each on
one CPU thread for ml-100k-mm (14 minutes in all beside two other runs).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from recbole.data import create_dataset, data_preparation
from recbole.utils import init_logger, init_seed

from recbole_dppmg import distributed
from recbole_dppmg.config import apply_threads, build_config, parse_overrides
from recbole_dppmg.errors import ConfigError
from recbole_dppmg.paths import REPO_ROOT
from recbole_dppmg.quick_start import check_dataset
from recbole_dppmg.tokens.export import token_vectors
from recbole_dppmg.tokens.foldin_inductive import (
    evaluate_new_users,
    evaluate_own_vectors,
    hold_out,
    pick_new_users,
    split_matrix,
)
from recbole_dppmg.utils import get_model, get_trainer
from recbole_dppmg.validation import check_settings

MODEL = "DPPMG"


def train(dataset: str, overrides: dict, new_users_fraction: float, seed: int, checkpoint_dir: Path) -> dict:
    """Train DPPMG as ``quick_start.run`` does (same seeding points and order), with the new
    users' interactions removed from the train and validation loaders when the fraction is > 0;
    the best validation epoch is loaded at the end. Returns the model, the new users, the full
    splits' matrices and the training graph's."""
    model_class = get_model(MODEL)
    config = build_config(model_class, dataset, (), {**overrides, "seed": seed, "checkpoint_dir": str(checkpoint_dir)})
    check_settings(config)
    check_dataset(dataset, Path(config["data_path"]).parent, config["torch_num_threads"])
    if distributed.wants_launch(config):
        raise ConfigError("this benchmark trains in one process: leave nproc at 1")
    apply_threads(config)
    init_seed(config["seed"], config["reproducibility"])
    distributed.make_shared_dirs(config)
    init_logger(config)
    recbole_dataset = create_dataset(config)
    loaders = data_preparation(config, recbole_dataset)
    splits = dict(zip(("train", "valid", "test"), (split_matrix(loader) for loader in loaders)))
    new_users = pick_new_users(recbole_dataset.user_num, new_users_fraction, seed)
    train_data, valid_data, test_data = hold_out(config, recbole_dataset, loaders, new_users)

    init_seed(config["seed"] + config["local_rank"], config["reproducibility"])
    model = model_class(config, train_data._dataset).to(config["device"])
    trainer = get_trainer(config, model_class)(config, model)
    trainer.set_checkpoint_files(checkpoint_dir / "best.pth", checkpoint_dir / "last.pth")
    start = time.time()
    best_score, best_result = trainer.fit(train_data, valid_data, saved=True, show_progress=False)
    seconds = time.time() - start
    trainer.load_best()
    model.eval()
    trained = [h for h in trainer.history if "train_seconds" in h]
    scored = [h for h in trainer.history if "valid_score" in h]
    summary = {
        "epochs_trained": len(trained),
        "best_epoch": max(scored, key=lambda h: h["valid_score"])["epoch"] if scored else None,
        "best_valid_score": float(best_score),
        "best_valid_result": {k: float(v) for k, v in (best_result or {}).items()},
        "train_seconds": round(seconds, 1),
        "graph_users": int(len(model.graph_users)),
        "graph_interactions": int(train_data._dataset.inter_num),
    }
    return {
        "model": model,
        "trainer": trainer,
        "test_data": test_data,
        "new_users": new_users,
        "graph_train": split_matrix(train_data),
        **splits,
        "summary": summary,
    }


def _row(label: str, figures: dict) -> str:
    return (
        f"| {label} | {figures['valid']['ndcg@10']:.4f} | {figures['valid']['recall@10']:.4f} "
        f"| {figures['test']['ndcg@10']:.4f} | {figures['test']['recall@10']:.4f} |"
    )


def table(result: dict) -> str:
    new = result["new_users"]
    lines = [
        f"new users: {result['users']['new']} of {result['users']['total']} (seed {result['seed']}); "
        f"overrides {result['overrides'] or '{}'}",
        "| new users scored by | valid NDCG@10 | valid Recall@10 | test NDCG@10 | test Recall@10 |",
        "|---|---|---|---|---|",
        _row("inductive fold-in, tokens", new["inductive"]["fold_in_tokens"]),
        _row("inductive fold-in, continuous", new["inductive"]["fold_in_continuous"]),
        _row("training popularity", new["inductive"]["popularity"]),
        _row("transductive fold-in, tokens", new["transductive"]["fold_in_tokens"]),
        _row("transductive own tokens", new["transductive"]["own_tokens"]),
        _row("transductive own continuous", new["transductive"]["own_continuous"]),
    ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", "-d", default="ml-100k-mm")
    parser.add_argument("--seed", type=int, default=2020, help="split, hold-out and training seed")
    parser.add_argument("--holdout-fraction", type=float, default=0.1, help="share of users held out (new users)")
    parser.add_argument(
        "--out", default=str(REPO_ROOT / "bench" / "results" / "foldin_inductive_ml-100k-mm.json"), help="JSON file"
    )
    parser.add_argument(
        "--override", action="append", default=[], metavar="KEY=VALUE", help="DPPMG config override (repeatable)"
    )
    args, unknown = parser.parse_known_args(argv)
    try:
        args.overrides = parse_overrides([f"--{item}" for item in args.override] + unknown)
    except ConfigError as error:
        parser.error(str(error))
    if "seed" in args.overrides:
        parser.error("give the seed with --seed")
    if not 0 < args.holdout_fraction < 1:
        parser.error("--holdout-fraction must be in (0, 1)")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    start = time.time()
    runs = {}
    for name, fraction in (("inductive", args.holdout_fraction), ("transductive", 0.0)):
        with tempfile.TemporaryDirectory(prefix=f"foldin-{name}-") as folder:
            runs[name] = train(args.dataset, args.overrides, fraction, args.seed, Path(folder))
        logging.getLogger().info(f"{name} training done: {runs[name]['summary']}")

    inductive, transductive = runs["inductive"], runs["transductive"]
    new_users = inductive["new_users"]
    train_m, valid_m, test_m = inductive["train"], inductive["valid"], inductive["test"]
    for key in ("train", "valid", "test"):  # same seed, same split
        if (transductive[key] != inductive[key]).nnz:
            raise RuntimeError(f"the two trainings' {key} splits differ")
    n_users = train_m.shape[0]
    fit_users = np.setdiff1d(np.arange(1, n_users), new_users)

    def fold_in(run: dict, graph) -> dict:
        vectors = token_vectors(run["model"])
        return evaluate_new_users(run["model"], vectors, new_users, fit_users, graph, train_m, valid_m, test_m)

    figures = {
        "inductive": fold_in(inductive, inductive["graph_train"]),
        "transductive": {
            **evaluate_own_vectors(transductive["model"], new_users, train_m, valid_m, test_m),
            "fold_in_tokens": fold_in(transductive, transductive["train"])["fold_in_tokens"],
        },
    }
    # The trained users of the inductive model by their own tokens, and a check that this
    # scoring is RecBole's: all users' test NDCG@10 of the transductive model, both ways.
    trained_own = evaluate_own_vectors(inductive["model"], fit_users, train_m, valid_m, test_m)["own_tokens"]
    all_users = np.arange(1, n_users)
    ours = evaluate_own_vectors(transductive["model"], all_users, train_m, valid_m, test_m)["own_tokens"]["test"]
    recbole = transductive["trainer"].evaluate(transductive["test_data"], load_best_model=False)
    result = {
        "dataset": args.dataset,
        "seed": args.seed,
        "holdout_fraction": args.holdout_fraction,
        "overrides": args.overrides,
        "users": {
            "total": int(n_users - 1),
            "new": int(len(new_users)),
            "trained": int(len(fit_users)),
            "new_with_valid_items": figures["inductive"]["popularity"]["valid"]["users"],
            "new_with_test_items": figures["inductive"]["popularity"]["test"]["users"],
        },
        "train": {name: run["summary"] for name, run in runs.items()},
        "new_users": figures,
        "trained_users_inductive_own_tokens": trained_own,
        "scoring_check": {
            "transductive_all_users_test_ndcg@10": ours["ndcg@10"],
            "recbole_test_ndcg@10": float(recbole["ndcg@10"]),
        },
        "protocol": (
            "new users: seeded share of users whose train and valid interactions were removed before the model "
            "was built (absent from the graph, the batches and early stopping); fold-in: ridge map "
            "(tokens/foldin.py) from the mean of the propagated item vectors of a user's training items to the "
            "user's continuous vector, fitted on the trained users; tokens: the folded-in vector's residual codes "
            "in the model's codebooks, decoded; valid ranked with training items excluded, test with training "
            "and validation items excluded (RecBole's full ranking); popularity: counts in the training graph; "
            "transductive: the same training (seed, overrides) with no user held out"
        ),
        "seconds": round(time.time() - start, 1),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))
    print(
        f"scoring check (all users, transductive, test NDCG@10): ours {ours['ndcg@10']:.4f}, "
        f"RecBole {float(recbole['ndcg@10']):.4f}"
    )
    print(f"written to {out} ({result['seconds']:.0f} s)")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
