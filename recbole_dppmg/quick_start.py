"""The plugin's own run / compare / load functions.

They follow ``recbole.quick_start.run_recbole`` step by step (same seeding points, same
order of dataset, dataloader and model construction), so a RecBole baseline run here gives
exactly RecBole's numbers; but they look models up through the plugin, never import ray,
and write pickle-free checkpoints into one folder per run: ``saved/<dataset>/<model>-<time>/``
holding ``best.pth``, ``last.pth``, ``config.json``, ``history.json`` and ``result.json``.
"""

from __future__ import annotations

import json
import logging
import math
import multiprocessing
import os
import threading
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Iterable, NamedTuple

import psutil
import torch
from recbole.data import create_dataset, data_preparation
from recbole.utils import init_logger, init_seed

from recbole_dppmg import compat, distributed
from recbole_dppmg.config import (
    RECBOLE_BUNDLED_DATASETS,
    apply_threads,
    build_config,
    jsonable_config,
)
from recbole_dppmg.data.prepare import ensure_prepared
from recbole_dppmg.errors import ConfigError, DataError
from recbole_dppmg.paths import check_dataset_name, dataset_root
from recbole_dppmg.plots import write_stage1_plots
from recbole_dppmg.results import RunResult
from recbole_dppmg.runs import new_run_folder
from recbole_dppmg.tables import METRIC_COLUMNS, write_ablation, write_comparison  # noqa: F401 (public)
from recbole_dppmg.trainer import decode_other_parameter, load_checkpoint_file
from recbole_dppmg.utils import get_model, get_trainer
from recbole_dppmg.validation import check_checkpoint, check_settings

compat.apply()
logger = logging.getLogger(__name__)


class PeakMemory:
    """Peak extra memory while a block runs: CUDA allocator peak on a GPU, else the peak
    resident set size above the level at entry (sampled, since RSS peaks are per process)."""

    def __init__(self, device, interval: float = 0.05):
        self.device = torch.device(device)
        self.interval = interval
        self.peak_mb = 0.0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            return self
        self._process = psutil.Process(os.getpid())
        self._base = self._process.memory_info().rss
        self._peak = self._base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(self.interval):
            self._peak = max(self._peak, self._process.memory_info().rss)

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.peak_mb = (torch.cuda.max_memory_allocated(self.device) - self._base) / 2**20
        else:
            self._stop.set()
            self._thread.join()
            self._peak = max(self._peak, self._process.memory_info().rss)
            self.peak_mb = (self._peak - self._base) / 2**20
        return False


def check_dataset(dataset: str, data_path: str | Path | None = None, num_threads: int | None = None) -> None:
    """Fail early, in one line, when RecBole would not find the dataset's atomic files;
    prepare the plugin's multimodal datasets on first use (with ``num_threads`` torch threads)."""
    check_dataset_name(dataset)
    if dataset in RECBOLE_BUNDLED_DATASETS:
        return
    root = Path(data_path) if data_path else dataset_root()
    ensure_prepared(dataset, dataset_dir=root, num_threads=num_threads)
    if not (root / dataset / f"{dataset}.inter").is_file():
        known = (
            sorted(
                {p.name for p in root.iterdir() if p.is_dir() and (p / f"{p.name}.inter").is_file()}
                | set(RECBOLE_BUNDLED_DATASETS)
            )
            if root.is_dir()
            else list(RECBOLE_BUNDLED_DATASETS)
        )
        raise DataError(
            f"unknown dataset '{dataset}': no {root / dataset / (dataset + '.inter')}; "
            f"available: {', '.join(known)} (or prepare one with --stage prepare)"
        )


def prepared_config(
    model_class, dataset: str, config_files: Iterable[str | Path] = (), config_dict: dict | None = None
):
    """The run's RecBole config, read after the dataset is prepared: on first use ``prepare`` writes
    the dataset's own property file (its feature fields, ``load_col``), which the config must include."""
    config = build_config(model_class, dataset, config_files, config_dict)
    check_settings(config)
    own = Path(config["data_path"]) / f"{dataset}.yaml"
    existed = own.is_file()
    check_dataset(dataset, Path(config["data_path"]).parent, config["torch_num_threads"])
    if not existed and own.is_file():
        config = build_config(model_class, dataset, config_files, config_dict)
        check_settings(config)
    return config


def new_run_dir(config, model_name: str) -> Path:
    """A new stage-1 run folder; a second run started in the same second gets ``~2``, ``~3``..."""
    try:
        return new_run_folder(config["checkpoint_dir"], config["dataset"], model_name, separator="~", first=2)
    except OSError as error:
        raise ConfigError(
            f"cannot create the run folder under {config['checkpoint_dir']}: {error.strerror or error}"
        ) from None


def run(
    model: str,
    dataset: str,
    config_files: Iterable[str | Path] = (),
    config_dict: dict | None = None,
    saved: bool = True,
    resume: str | Path | None = None,
) -> RunResult:
    """Train ``model`` on ``dataset`` under the shared protocol and test its best epoch.

    With ``nproc`` > 1 in the config, ``nproc`` data-parallel ranks are spawned that each run
    this function (``recbole_dppmg.distributed``); rank 0 writes the run folder and its result
    is returned."""
    model_class = get_model(model)
    config = prepared_config(model_class, dataset, config_files, config_dict)
    if resume is not None:
        check_checkpoint(resume, model_class.__name__, dataset)
    if distributed.wants_launch(config):
        return distributed.launch(
            run, config, (model, dataset, list(config_files)), {"saved": saved, "resume": resume}, config_dict
        )
    apply_threads(config)
    init_seed(config["seed"], config["reproducibility"])
    distributed.make_shared_dirs(config)  # before RecBole's check-then-create: parallel runs race on log/<model>
    init_logger(config)
    log = logging.getLogger()
    log.info(config)

    with PeakMemory(config["device"]) as memory:
        recbole_dataset = create_dataset(config)
        log.info(recbole_dataset)
        train_data, valid_data, test_data = data_preparation(config, recbole_dataset)

        init_seed(config["seed"] + config["local_rank"], config["reproducibility"])
        net = model_class(config, train_data._dataset).to(config["device"])
        log.info(net)
        trainer = get_trainer(config, model_class)(config, net)

        if resume is not None:
            resume = Path(resume)
            run_dir = resume.parent
            trainer.set_checkpoint_files(run_dir / "best.pth", run_dir / "last.pth")
            trainer.resume_checkpoint(resume)
        else:
            run_dir = distributed.broadcast_object(
                new_run_dir(config, model_class.__name__) if distributed.rank() == 0 else None
            )
            trainer.set_checkpoint_files(run_dir / "best.pth", run_dir / "last.pth")
        if distributed.rank() == 0:
            (run_dir / "config.json").write_text(json.dumps(jsonable_config(config), indent=2))

        best_valid_score, best_valid_result = trainer.fit(
            train_data, valid_data, saved=saved, show_progress=config["show_progress"]
        )
        distributed.barrier()  # rank 0 has written best.pth
        if saved and not Path(trainer.saved_model_file).is_file():
            raise ConfigError(
                f"the run in {run_dir} trained no epoch (epochs={config['epochs']}); "
                "it has no best.pth and is not a result"
            )
        test_result = trainer.evaluate(test_data, load_best_model=saved, show_progress=config["show_progress"])

    trained = [h for h in trainer.history if "train_seconds" in h]
    result = RunResult(
        model=model_class.__name__,
        dataset=dataset,
        best_valid_score=float(best_valid_score),
        best_valid_result={k: float(v) for k, v in (best_valid_result or {}).items()},
        test_result={k: float(v) for k, v in (test_result or {}).items()},
        epochs_trained=len(trained),
        seconds_per_epoch=(sum(h["train_seconds"] for h in trained) / len(trained)) if trained else 0.0,
        peak_memory_mb=memory.peak_mb,
        run_dir=str(run_dir),
        checkpoint=str(trainer.saved_model_file),
        seed=int(config["seed"]),
    )
    extra = getattr(net, "run_summary", None)
    if callable(extra):
        result.extra = extra(test_data=test_data, trainer=trainer) or {}
    if distributed.rank() == 0:
        (run_dir / "history.json").write_text(json.dumps(trainer.history, indent=2))
        (run_dir / "result.json").write_text(json.dumps(finite_or_null(asdict(result)), indent=2, allow_nan=False))
    log.info(f"best valid: {result.best_valid_result}")
    log.info(f"test result: {result.test_result}")
    return result


def finite_or_null(value):
    """JSON has no Infinity or NaN: such floats are written as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_or_null(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_null(v) for v in value]
    return value


class RunTask(NamedTuple):
    """One run of a comparison or ablation: a model, its config overrides, a variant label."""

    model: str
    overrides: dict
    label: str = ""


def run_many(
    tasks: list[RunTask],
    dataset: str,
    config_files: Iterable[str | Path] = (),
    jobs: int = 1,
    on_result: Callable[[list[RunResult]], None] | None = None,
) -> list[RunResult]:
    """Run every task, ``jobs`` at a time in separate processes (spawned, so each has its own
    torch threads and seeds); results in task order, labelled. ``on_result`` gets the finished
    results (in task order) after each run, so tables can be written as they grow."""
    config_files = [str(f) for f in config_files]
    done: dict[int, RunResult] = {}

    def finished(index: int, result: RunResult) -> None:
        result.label = tasks[index].label
        done[index] = result
        if on_result is not None:
            on_result([done[i] for i in sorted(done)])

    if jobs <= 1 or len(tasks) <= 1:
        for index, task in enumerate(tasks):
            finished(index, run(task.model, dataset, config_files, task.overrides))
    else:
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=min(jobs, len(tasks)), mp_context=context) as pool:
            futures = {
                pool.submit(run, task.model, dataset, config_files, task.overrides): index
                for index, task in enumerate(tasks)
            }
            for future in as_completed(futures):
                finished(futures[future], future.result())
    return [done[i] for i in range(len(tasks))]


def _seed_list(seeds: Iterable[int] | None) -> list[int | None]:
    if seeds is None:
        return [None]  # the configured seed
    seeds = list(seeds)
    if not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise ConfigError(f"seeds must be a non-empty list of integers, got {seeds!r}")
    return seeds


def _with_seed(config_dict: dict | None, seed: int | None, extra: dict | None = None) -> dict:
    values = dict(config_dict or {})
    values.update(extra or {})
    if seed is not None:
        values["seed"] = seed
    return values


def compare(
    models: Iterable[str],
    dataset: str,
    config_files: Iterable[str | Path] = (),
    config_dict: dict | None = None,
    out_dir: str | Path | None = None,
    seeds: Iterable[int] | None = None,
    jobs: int = 1,
) -> tuple[list[RunResult], Path]:
    """Train each model with each seed (default: the configured seed) under the same protocol;
    write the comparison tables (median and spread over seeds) and the PNG plots."""
    models = list(models)
    for name in models:  # fail on a typo before hours of training
        get_model(name)
    tasks = [RunTask(name, _with_seed(config_dict, seed)) for seed in _seed_list(seeds) for name in models]
    out_dir = Path(out_dir) if out_dir is not None else _default_out_dir(dataset, config_files, config_dict, "compare")
    results = run_many(tasks, dataset, config_files, jobs, on_result=lambda done: write_comparison(done, out_dir))
    md_path, _ = write_comparison(results, out_dir)
    write_stage1_plots(results, out_dir)
    return results, md_path


def compare_runs(run_dirs: Iterable[str | Path], out_dir: str | Path) -> tuple[list[RunResult], Path]:
    """The comparison tables and plots of finished run folders, e.g. runs of one protocol made
    at different times or on different machines (their seconds per epoch are then not from the
    same machine load: the table's speed ratio is only meaningful within one comparison)."""
    results = [RunResult.load(d) for d in run_dirs]
    if not results:
        raise ConfigError("no run folders given")
    note = (
        "Rebuilt from finished run folders (`--from_runs`); seconds per epoch depend on the "
        "machine's load when each run was made, so a speed ratio is only like for like between "
        "runs of one comparison command (see each run's folder in `runs.csv`)."
    )
    md_path, _ = write_comparison(results, out_dir, note=note)
    write_stage1_plots(results, out_dir)
    return results, md_path


def _default_out_dir(dataset: str, config_files, config_dict: dict | None, kind: str) -> Path:
    """A new ``<checkpoint_dir>/<dataset>/<kind>-<time>``, beside the run folders."""
    config = build_config(get_model("DPPMG"), dataset, config_files, config_dict)
    return new_run_folder(config["checkpoint_dir"], dataset, kind)


ABLATION_FACTORS = ("modalities", "levels", "codebook")


def ablation_variants(
    dataset: str,
    config_files: Iterable[str | Path] = (),
    config_dict: dict | None = None,
    factors: Iterable[str] = ABLATION_FACTORS,
) -> dict[str, dict]:
    """DPPMG variants, one factor at a time from the configured defaults: each feature modality
    alone (and without the id channel when it is on), 1-3 levels, codebooks of 32, 64 and 256;
    ``factors``: which of these groups (the defaults are always in)."""
    factors = set(factors)
    unknown = factors - set(ABLATION_FACTORS)
    if unknown:
        raise ConfigError(f"unknown ablation factor(s) {sorted(unknown)}; choose from {list(ABLATION_FACTORS)}")
    config = build_config(get_model("DPPMG"), dataset, config_files, config_dict)
    modalities = list(config["modalities"])
    features = [m for m in modalities if m != "id"]
    with_id = ["id"] if "id" in modalities else []
    variants: dict[str, dict] = {"defaults": {}}
    if "modalities" in factors and len(features) > 1:
        for modality in features:
            variants[f"{modality} only" + (" + id" if with_id else "")] = {"modalities": [modality, *with_id]}
    if "modalities" in factors and with_id and features:
        variants["without id"] = {"modalities": features}
    for levels in (1, 2, 3) if "levels" in factors else ():
        if levels != config["levels"]:
            variants[f"levels {levels}"] = {"levels": levels}
    for size in (32, 64, 256) if "codebook" in factors else ():
        if size != config["codebook_size"]:
            variants[f"codebook {size}"] = {"codebook_size": size}
    return variants


def ablation(
    dataset: str,
    config_files: Iterable[str | Path] = (),
    config_dict: dict | None = None,
    out_dir: str | Path | None = None,
    seeds: Iterable[int] | None = None,
    jobs: int = 1,
    variants: dict[str, dict] | None = None,
    factors: Iterable[str] = ABLATION_FACTORS,
) -> tuple[list[RunResult], Path]:
    """Train DPPMG for every variant (default: ``ablation_variants`` of ``factors``) and seed;
    write ``ablation.md`` / ``ablation.csv``."""
    if variants is None:
        variants = ablation_variants(dataset, config_files, config_dict, factors)
    tasks = [
        RunTask("DPPMG", _with_seed(config_dict, seed, overrides), label)
        for seed in _seed_list(seeds)
        for label, overrides in variants.items()
    ]
    out_dir = Path(out_dir) if out_dir is not None else _default_out_dir(dataset, config_files, config_dict, "ablation")
    results = run_many(
        tasks, dataset, config_files, jobs, on_result=lambda done: write_ablation(done, variants, out_dir)
    )
    md_path, _ = write_ablation(results, variants, out_dir)
    return results, md_path


def load_data_and_model(checkpoint_file: str | Path, config_dict: dict | None = None):
    """Rebuild config, dataset, dataloaders and the trained model from a plugin checkpoint
    (the replacement for ``recbole.quick_start.load_data_and_model``)."""
    state = load_checkpoint_file(checkpoint_file)
    model_class = get_model(state["model"])
    overrides = json.loads(state["settings_json"])
    overrides.update(config_dict or {})
    config = prepared_config(model_class, state["dataset"], (), overrides)
    init_seed(config["seed"], config["reproducibility"])
    dataset = create_dataset(config)
    train_data, valid_data, test_data = data_preparation(config, dataset)
    init_seed(config["seed"] + config["local_rank"], config["reproducibility"])
    model = model_class(config, train_data._dataset).to(config["device"])
    try:
        model.load_state_dict(state["state_dict"])
    except RuntimeError as error:
        raise ConfigError(
            f"checkpoint {checkpoint_file} does not fit {state['model']}: {str(error).splitlines()[0]}"
        ) from None
    model.load_other_parameter(decode_other_parameter(state.get("other_parameter")))
    model.eval()
    return config, model, dataset, train_data, valid_data, test_data
