"""RecBole's stock trainer, for checking that the plugin leaves baseline numbers unchanged.

``stock_run`` follows ``recbole.quick_start.run_recbole`` exactly, with RecBole's own
``Trainer`` class. The only difference: RecBole's best-epoch checkpoint is a pickle that
torch>=2.6 will not load safely, so the best state dict is kept in memory at the moment
RecBole would have written it, and loaded back before the test evaluation, which is what
``evaluate(load_best_model=True)`` does.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Iterable

from recbole.data import create_dataset, data_preparation
from recbole.utils import get_trainer, init_seed

from recbole_dppmg.config import apply_threads, build_config
from recbole_dppmg.utils import get_model


def stock_run(
    model: str, dataset: str, config_files: Iterable[str | Path] = (), config_dict: dict | None = None
) -> dict:
    """Train and test with RecBole's own trainer; returns valid and test results."""
    model_class = get_model(model)
    config = build_config(model_class, dataset, config_files, config_dict)
    apply_threads(config)
    init_seed(config["seed"], config["reproducibility"])
    recbole_dataset = create_dataset(config)
    train_data, valid_data, test_data = data_preparation(config, recbole_dataset)
    init_seed(config["seed"] + config["local_rank"], config["reproducibility"])
    net = model_class(config, train_data._dataset).to(config["device"])
    trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, net)

    best = {}

    def keep_best_in_memory(epoch, verbose=True, **kwargs):
        best["state_dict"] = copy.deepcopy(net.state_dict())
        best["other_parameter"] = copy.deepcopy(net.other_parameter())
        best["epoch"] = epoch

    trainer._save_checkpoint = keep_best_in_memory
    best_valid_score, best_valid_result = trainer.fit(train_data, valid_data, saved=True, show_progress=False)
    net.load_state_dict(best["state_dict"])
    net.load_other_parameter(best["other_parameter"])
    test_result = trainer.evaluate(test_data, load_best_model=False, show_progress=False)
    return {
        "best_valid_score": float(best_valid_score),
        "best_valid_result": {k: float(v) for k, v in best_valid_result.items()},
        "test_result": {k: float(v) for k, v in test_result.items()},
        "best_epoch": best.get("epoch"),
    }
