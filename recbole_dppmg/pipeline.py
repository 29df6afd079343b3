"""``--stage all``: prepare -> train -> export -> text warm-up -> image training -> text RL ->
image RL -> evaluate, each stage skipped when its output is already there and valid.

Valid means made from the same inputs with the same settings:

- prepare: the dataset cache (``data/prepare.py`` checks its key; a hit costs seconds);
- train + export: a finished DPPMG run (``result.json``) whose final RecBole config equals the
  one requested (machine keys such as paths and threads aside) and whose token export was made
  from this build of the dataset (``dataset_fingerprint``); a run without an export is exported;
- text / image: a generator run trained on that token export with the same settings (runtime
  keys such as threads, progress bars and time budgets aside); an unfinished one is resumed (a
  Stable Diffusion image run, ``image.backbone``, is written only once finished: the same backbone
  folder, ``image.sd`` settings and export make it valid);
- text RL / image RL (``generation/rl/text.py`` / ``rl/image.py``): an RL run made from that
  generator, rewarded against the other modality's generator of this pipeline, with the same
  ``rl:`` settings and all its steps done; an unfinished one is resumed.
- evaluate: a report of exactly these runs with the same ``evaluate:`` / ``reward:`` settings.

``--stage rl`` runs the two RL steps alone (``Pipeline.run_rl``), from the newest finished
warm-up generators or those given, with the same checks. The steps come from the stage table
(``recbole_dppmg/stages.py``) the command line reads too.

Each call writes ``saved/<dataset>/Pipeline-<time>/pipeline.json`` (profile, per-stage status,
wall seconds and output, rewritten after every stage) and, when evaluate runs, the report in
its ``report/`` subfolder. Profiles: ``properties/profiles/<name>.yaml`` (sections ``recbole``,
``text``, ``image``, ``rl``, ``reward``, ``evaluate`` over the defaults); ``full`` = the defaults.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict
from pathlib import Path

import yaml

from recbole_dppmg.config import MACHINE_KEYS, build_config, jsonable_config
from recbole_dppmg.data.cache import read_manifest
from recbole_dppmg.data.item_content import ItemContent, MissingContentError
from recbole_dppmg.data.prepare import KNOWN_DATASETS, find_spec_file, prepare_dataset
from recbole_dppmg.errors import ConfigError, DPPMGError
from recbole_dppmg.generation.common.settings import (
    load_settings,
    merge,
    rl_phase_settings,
    sd_backbone,
)
from recbole_dppmg.generation.image.checkpoint import FORMAT, SD_FORMAT, is_sd_run
from recbole_dppmg.generation.image.train import recorded_model, run_record, train_image_generator
from recbole_dppmg.generation.report.build import build_report, resolve_runs
from recbole_dppmg.generation.reward.judge import PreferenceJudge
from recbole_dppmg.generation.rl import image as rl_image
from recbole_dppmg.generation.rl import text as rl_text
from recbole_dppmg.generation.rl.common import next_phase, recorded_settings
from recbole_dppmg.generation.text.config import saved_root
from recbole_dppmg.generation.text.pipeline import train_text_generator
from recbole_dppmg.paths import PROPERTIES_DIR, SAVED_DIR, dataset_root
from recbole_dppmg.quick_start import run
from recbole_dppmg.runs import (
    DPPMG_RESULT,
    IMAGE_GEN,
    IMAGE_KINDS,
    PIPELINE_REPORT,
    REPORT,
    RL_KINDS,
    RL_SECTION,
    TEXT_GEN,
    TEXT_KINDS,
    finished_runs,
    new_run_folder,
    read_run_meta,
    recorded_runs,
)
from recbole_dppmg.stages import PIPELINE_STEPS
from recbole_dppmg.stages import stage as stage_entry
from recbole_dppmg.tokens import PreferenceTokens
from recbole_dppmg.tokens.export import dataset_fingerprint, export_tokens
from recbole_dppmg.tokens.format import read_manifest as read_token_manifest
from recbole_dppmg.utils import get_model

logger = logging.getLogger(__name__)

STAGES = PIPELINE_STEPS  # the steps of --stage all, from the stage table (recbole_dppmg/stages.py)
PROFILE_SECTIONS = ("recbole", "text", "image", "rl", "reward", "evaluate")
PROFILES_DIR = PROPERTIES_DIR / "profiles"
# settings that change how a stage runs on this machine, not what it produces
TEXT_RUNTIME_KEYS = {
    "num_threads",
    "progress",
    "resume",
    "generator",
    "output_dir",
    "tokens",
    "checkpoint_dir",
    "generate",
    "evaluate",
    "device",
}
IMAGE_RUNTIME_KEYS = {
    "num_threads",
    "progress",
    "max_minutes",
    "save_every",
    "log_every",
    "device",
    "cache_dir",
    "autoencoder_path",
    "poster_dir",
}
RL_RUNTIME_KEYS = {"num_threads", "progress", "max_minutes", "save_steps", "resume", "partner", "device"}
EVALUATE_RUNTIME_KEYS = {"num_threads", "progress", "output_dir"}


def load_profile(name: str | None) -> dict:
    """``{section: overrides}`` of ``properties/profiles/<name>.yaml`` or of a YAML file given by
    path (a profile of one's own); ``full`` or None = none."""
    if name in (None, "full"):
        return {s: {} for s in PROFILE_SECTIONS}
    path = Path(name) if str(name).endswith((".yaml", ".yml")) else PROFILES_DIR / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in PROFILES_DIR.glob("*.yaml"))
        raise ConfigError(f"unknown profile {name!r}: no {path} (known: full, {', '.join(known)})")
    data = yaml.safe_load(path.read_text()) or {}
    unknown = set(data) - set(PROFILE_SECTIONS)
    if unknown:
        raise ConfigError(
            f"{path}: unknown section(s) {', '.join(sorted(unknown))} (known: {', '.join(PROFILE_SECTIONS)})"
        )
    return {s: data.get(s) or {} for s in PROFILE_SECTIONS}


def _without(settings: dict, keys: set) -> dict:
    return {k: v for k, v in settings.items() if k not in keys}


def _same_path(a, b) -> bool:
    return a is not None and b is not None and Path(a).resolve() == Path(b).resolve()


# ---------------------------------------------------------------------------- validity
def valid_stage1_run(dataset: str, config, data_dir: Path) -> tuple[Path | None, Path | None]:
    """``(run folder, token export or None)``: the newest finished DPPMG run trained with this
    exact config on this build of the dataset, and its export when that export was made from
    this build (``dataset_fingerprint``). A run without a usable export counts when it finished
    after the dataset was prepared (then it only needs exporting)."""

    wanted = _without(jsonable_config(config), set(MACHINE_KEYS))
    fingerprint = dataset_fingerprint(data_dir)
    prepared = (data_dir / "manifest.json").stat().st_mtime if (data_dir / "manifest.json").is_file() else None
    for result in (r / DPPMG_RESULT.done for r in finished_runs(config["checkpoint_dir"], dataset, DPPMG_RESULT)[::-1]):
        run = result.parent
        try:
            saved = json.loads((run / "config.json").read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if _without(saved, set(MACHINE_KEYS)) != wanted or not (run / "best.pth").is_file():
            continue
        try:
            exported = read_token_manifest(run / "tokens", dataset=dataset).get("dataset_fingerprint") == fingerprint
        except DPPMGError:  # no export, or an unusable one
            exported = False
        if exported:
            return run, run / "tokens"
        if prepared is not None and result.stat().st_mtime > prepared:
            return run, None
    return None, None


def valid_text_run(dataset: str, tokens: Path, cfg: dict, root: Path) -> tuple[Path | None, bool]:
    """``(run, finished)``: the newest TextGen run on ``tokens`` with these settings."""
    wanted = _without(cfg, TEXT_RUNTIME_KEYS)
    for folder in recorded_runs(root, dataset, TEXT_GEN.name):
        saved = read_run_meta(folder, TEXT_KINDS)
        if _same_path(saved.get("tokens"), tokens) and _without(saved.get("text", {}), TEXT_RUNTIME_KEYS) == wanted:
            return folder, (folder / "warmup.json").is_file() and (folder / TEXT_GEN.done).is_file()
    return None, False


def valid_image_run(dataset: str, tokens: Path, settings: dict, root: Path) -> tuple[Path | None, bool]:
    """``(run, finished)``: the newest ImageGen run on ``tokens`` with these settings."""

    wanted_format, wanted_model, wanted_train = run_record(settings)
    wanted_train = _without(wanted_train, IMAGE_RUNTIME_KEYS)
    for folder in recorded_runs(root, dataset, IMAGE_GEN.name):
        meta = read_run_meta(folder, IMAGE_KINDS)
        if (
            _same_path(meta.get("tokens_folder"), tokens)
            and (SD_FORMAT if is_sd_run(meta) else FORMAT) == wanted_format
            and recorded_model(meta) == wanted_model
            and _without({"split_seed": None, **meta.get("train", {})}, IMAGE_RUNTIME_KEYS) == wanted_train
        ):
            # a Stable Diffusion run is written when its training ended (it does not resume)
            return folder, is_sd_run(meta) or int(meta.get("trained_steps", 0)) >= int(settings["max_steps"])
    return None, False


def valid_rl_run(
    dataset: str,
    prefix: str,
    source: Path,
    cfg: dict,
    root: Path,
    partner: Path | None = None,
    reward: dict | None = None,
) -> tuple[Path | None, bool]:
    """``(run, finished)``: the newest RL run made from ``source`` (and, when given, rewarded
    against the other modality's ``partner`` generator, and by the ``reward`` settings) with these
    settings."""
    kind = "text" if prefix == rl_text.RUN_PREFIX else "image"
    wanted = _without(recorded_settings(kind, cfg), RL_RUNTIME_KEYS)
    for folder in recorded_runs(root, dataset, prefix, RL_SECTION):
        saved = read_run_meta(folder, RL_KINDS, RL_SECTION)
        if partner is not None and not _same_path(saved.get("partner_run"), partner):
            continue
        if reward is not None and recorded_settings("reward", saved.get("reward")) != recorded_settings(
            "reward", reward
        ):
            continue
        settings = _without(recorded_settings(kind, saved.get("rl", {})), RL_RUNTIME_KEYS)
        if _same_path(saved.get("source_run"), source) and settings == wanted:
            return folder, int(saved.get("steps_done", -1)) >= int(cfg["steps"])
    return None, False


def _weights_time(run: str | None) -> float:
    """When a run's weights last changed (an RL or resumed run keeps its folder)."""
    if not run:
        return 0.0
    files = [p for p in Path(run).glob("dppmg/*") if p.is_file()] + [
        p for p in (Path(run) / "model.safetensors",) if p.is_file()
    ]
    return max((p.stat().st_mtime for p in files), default=0.0)


def valid_report(dataset: str, runs, cfg: dict, reward: dict, root: Path) -> Path | None:
    """The newest report of exactly ``runs`` (written after their weights last changed) with
    these evaluate / reward settings."""
    wanted = (asdict(runs), _without(cfg, EVALUATE_RUNTIME_KEYS), reward)
    newest_weights = max(_weights_time(r) for r in (runs.text, runs.image, runs.text_rl, runs.image_rl))
    for kind in (PIPELINE_REPORT, REPORT):
        for path in (folder / kind.done for folder in finished_runs(root, dataset, kind)[::-1]):
            result = json.loads(path.read_text())
            same = (
                result.get("runs"),
                _without(result.get("evaluate", {}), EVALUATE_RUNTIME_KEYS),
                result.get("reward"),
            ) == wanted
            if same and path.stat().st_mtime > newest_weights:
                return path.parent
    return None


# ---------------------------------------------------------------------------- the pipeline
class Pipeline:
    """Runs the stages in order and records each in ``pipeline.json``."""

    def __init__(
        self,
        dataset: str,
        profile: str | None = None,
        config_files=(),
        overrides: dict | None = None,
        generation: dict | None = None,
        spec: str | None = None,
        force_prepare: bool = False,
        root: Path | None = None,
    ):
        self.dataset, self.spec, self.force_prepare = dataset, spec, force_prepare
        self.profile_name = profile or "full"
        self.profile = load_profile(profile)
        self.config_files = list(config_files)
        self.overrides = merge(self.profile["recbole"], overrides or {})
        generation = generation or {}
        self.sections = {
            s: merge(self.profile[s], generation.get(s) or {}) for s in ("text", "image", "rl", "reward", "evaluate")
        }
        load_settings("image", self.sections["image"])  # a wrong image.backbone fails now, not after stage 1
        self.root = Path(root or SAVED_DIR)
        self.folder = new_run_folder(self.root, dataset, "Pipeline")
        self.record = {
            "dataset": dataset,
            "profile": self.profile_name,
            "folder": str(self.folder),
            "stages": [],
            "settings": {"recbole": self.overrides, **self.sections},
        }
        self.outputs: dict[str, Path | None] = {}

    def _save(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.folder / "pipeline.json.tmp"
        tmp.write_text(json.dumps(self.record, indent=2, default=str))
        tmp.replace(self.folder / "pipeline.json")

    def run(self, until: str | None = None) -> Path:
        """Run every stage up to ``until`` (inclusive; default: all); returns the folder."""
        if until is not None and until not in STAGES:
            raise ConfigError(f"--until must be one of {', '.join(STAGES)}, got {until!r}")
        return self._run_steps(STAGES[: STAGES.index(until) + 1 if until else None])

    def run_rl(self, tokens=None, text_run=None, image_run=None) -> Path:
        """``--stage rl``: the RL steps of ``--stage all`` alone, from the warm-up generators given
        (``text_run`` / ``image_run``) or the newest finished pair on one token export (``tokens``
        when given); finished RL runs are skipped and unfinished ones resumed as in the pipeline."""
        runs = resolve_runs(self.dataset, {"tokens": tokens, "text_run": text_run, "image_run": image_run}, self.root)
        self.outputs.update(export=Path(runs.tokens), text=Path(runs.text), image=Path(runs.image))
        self.record["generators"] = {"tokens": runs.tokens, "text": runs.text, "image": runs.image}
        logger.info(
            "RL from the text generator %s and the image generator %s (token export %s)",
            runs.text,
            runs.image,
            runs.tokens,
        )
        return self._run_steps(stage_entry("rl").steps)

    def _run_steps(self, steps) -> Path:
        started = time.perf_counter()
        for stage in steps:
            tick = time.perf_counter()
            status, output, note = getattr(self, f"_{stage}")()
            entry = {
                "stage": stage,
                "status": status,
                "seconds": round(time.perf_counter() - tick, 1),
                "output": str(output) if output else None,
                "note": note,
            }
            self.record["stages"].append(entry)
            self.record["total_seconds"] = round(time.perf_counter() - started, 1)
            self._save()
            logger.info(
                "stage %s: %s in %.1f s (%s)%s", stage, status, entry["seconds"], output, f": {note}" if note else ""
            )
            print(
                f"[{stage}] {status} in {entry['seconds']} s: {output or ''}{'  (' + note + ')' if note else ''}",
                flush=True,
            )
        return self.folder

    # ------------------------------------------------------------------ stage 1
    def _prepare(self):

        spec = Path(self.spec) if self.spec else find_spec_file(self.dataset)
        before = read_manifest(self._data_dir()) or {}
        recorded = (before.get("content") or {}).get("spec")
        if spec is None and recorded and Path(recorded).is_file():
            spec = Path(recorded)  # the spec this dataset was prepared from: checked for changes
        if self.dataset not in KNOWN_DATASETS and spec is None:
            if before:
                return "skipped", self._data_dir(), "prepared earlier; its spec is gone, so it is used as it is"
            return "skipped", None, "a plain RecBole dataset: nothing to prepare"
        folder = prepare_dataset(self.dataset, spec_file=spec, force=self.force_prepare)
        after = read_manifest(folder) or {}
        hit = bool(before) and before.get("cache_key") == after.get("cache_key") and not self.force_prepare
        return ("skipped" if hit else "ran"), folder, ("dataset cache hit" if hit else None)

    def _stage1_config(self):

        return build_config(get_model("DPPMG"), self.dataset, self.config_files, self.overrides)

    def _data_dir(self) -> Path:

        return dataset_root() / self.dataset

    def _train(self):

        config = self._stage1_config()
        stage1, export = valid_stage1_run(self.dataset, config, Path(config["data_path"]))
        self.outputs["export"] = export
        if stage1 is not None:
            self.outputs["stage1"] = stage1
            return "skipped", stage1, "a finished DPPMG run with this config"
        result = run("DPPMG", self.dataset, self.config_files, self.overrides)
        self.outputs["stage1"] = result.run_dir
        return "ran", result.run_dir, f"test {json.dumps(result.test_result)}"

    def _export(self):

        if self.outputs.get("export") is not None:
            return "skipped", self.outputs["export"], "export of this run made from this build of the dataset"
        self.outputs["export"] = export_tokens(Path(self.outputs["stage1"]) / "best.pth", config_dict=self.overrides)
        return "ran", self.outputs["export"], None

    # ------------------------------------------------------------------ generators
    def _missing(self, role: str, purpose: str) -> str | None:
        """Why a generation stage cannot run on this dataset (a role its items lack), or None."""
        try:
            ItemContent.load(self.dataset).require(role, purpose)
        except MissingContentError as error:
            return str(error)
        return None

    def _text(self):

        missing = self._missing("description", "the text generator (its training targets)")
        if missing:
            self.outputs["text"] = None
            return "skipped", None, missing
        cfg = load_settings("text", self.sections["text"])
        run, finished = valid_text_run(self.dataset, self.outputs["export"], cfg, saved_root(cfg))
        if run is not None and finished:
            self.outputs["text"] = run
            return "skipped", run, "a finished warm-up on this token export with these settings"
        overrides = {**self.sections["text"], **({"resume": str(run)} if run is not None else {})}
        self.outputs["text"] = train_text_generator(self.dataset, self.outputs["export"], overrides)
        return "ran", self.outputs["text"], f"resumed {run.name}" if run is not None else None

    def _image(self):

        missing = self._missing("image", "the image generator (its training targets)")
        if missing:
            self.outputs["image"] = None
            return "skipped", None, missing
        return self._train_image("image", load_settings("image", self.sections["image"]), "image generator")

    def _image_history(self):
        """The report's poster history baseline: the same generator and steps with
        ``image.conditioning: history`` (the user's own best posters, no tokens)."""
        if self.outputs.get("image") is None:
            self.outputs["image_history"] = None
            return "skipped", None, "no image generator (skipped above)"
        if sd_backbone(load_settings("image", self.sections["image"])):
            self.outputs["image_history"] = None
            return "skipped", None, "a Stable Diffusion backbone has no history baseline (image.conditioning)"
        settings = load_settings("image", {**self.sections["image"], "conditioning": "history"})
        return self._train_image("image_history", settings, "history generator")

    def _train_image(self, output: str, settings, what: str):
        """Reuse the finished run on this export with these settings, resume an unfinished one, or train."""
        run, finished = valid_image_run(self.dataset, self.outputs["export"], settings, self.root)
        if run is not None and finished:
            self.outputs[output] = run
            return "skipped", run, f"a finished {what} on this token export with these settings"
        self.outputs[output] = train_image_generator(
            self.dataset, self.outputs["export"], settings, out_dir=run, resume=run is not None
        )
        meta = read_run_meta(self.outputs[output], IMAGE_KINDS)
        sd = is_sd_run(meta)
        max_steps = int(settings["sd"]["max_steps"] if sd else settings["max_steps"])
        note = ("resumed; " if run is not None else "") + (
            f"stopped by image.{'sd.' if sd else ''}max_minutes at step {meta['trained_steps']} of {max_steps}"
            if int(meta["trained_steps"]) < max_steps
            else ""
        )
        return "ran", self.outputs[output], note or None

    # ------------------------------------------------------------------ RL
    def _judge(self):
        if "judge" not in self.outputs:
            tokens = PreferenceTokens.load(self.outputs["export"], dataset=self.dataset)
            self.outputs["judge"] = PreferenceJudge.for_dataset(self.dataset, tokens, self.sections["reward"])
        return self.outputs["judge"]

    def _rl(self, modality: str):
        absent = [m for m in ("text", "image") if self.outputs.get(m) is None]
        if absent:  # the reward needs both generators: content and its cross-modal consistency
            self.outputs[f"{modality}_rl"] = None
            return "skipped", None, f"{modality} RL needs both generators; no {' or '.join(absent)} generator (above)"
        module = rl_text if modality == "text" else rl_image
        prefix, train = module.RUN_PREFIX, getattr(module, f"train_{modality}_rl")  # looked up now: tests patch it
        rl = self.sections["rl"]
        quick = bool(rl.get("quick", False))
        partner = self.outputs["image" if modality == "text" else "text"]
        overrides = {**(rl.get(modality) or {}), "partner": str(partner)}
        source, status, notes = self.outputs[modality], "skipped", []
        while overrides is not None:  # rl.<modality>.then: each phase starts from the previous one's run
            cfg = rl_phase_settings(modality, overrides, quick)
            run, finished = valid_rl_run(self.dataset, prefix, source, cfg, self.root, partner, self._judge().config)
            if run is not None and finished:
                notes.append(f"a finished {modality} RL run from {Path(source).name} with these settings")
            else:
                if run is not None:
                    notes.append(f"resumed {run.name}")
                run, status = (
                    train(
                        self.dataset,
                        source,
                        self._judge(),
                        {**overrides, **({"resume": str(run)} if run else {})},
                        quick,
                    ),
                    "ran",
                )
                finished = valid_rl_run(self.dataset, prefix, source, cfg, self.root, partner, self._judge().config)[1]
            source = Path(run)
            if not finished:  # stopped by max_minutes: the next phase waits for it
                notes.append(f"{source.name} stopped before its last step; run again to continue")
                break
            overrides = next_phase(overrides, cfg)
        self.outputs[f"{modality}_rl"] = source
        return status, source, "; ".join(notes) or None

    def _rl_text(self):
        return self._rl("text")

    def _rl_image(self):
        return self._rl("image")

    # ------------------------------------------------------------------ evaluate
    def _evaluate(self):

        if self.outputs.get("text") is None:
            return "skipped", None, "the report needs the text generator (skipped above)"
        cfg = load_settings("evaluate", self.sections["evaluate"])
        given = {
            "tokens": str(self.outputs["export"]),
            "text_run": str(self.outputs["text"]),
            **({"image_run": str(self.outputs["image"])} if self.outputs.get("image") else {}),
            **({"image_history_run": str(self.outputs["image_history"])} if self.outputs.get("image_history") else {}),
        }
        runs = resolve_runs(self.dataset, {**cfg, **given}, self.root)
        # exactly this pipeline's RL runs (or none), not the newest made from the same generators
        runs.text_rl = str(Path(self.outputs["text_rl"]).resolve()) if self.outputs.get("text_rl") else None
        runs.image_rl = str(Path(self.outputs["image_rl"]).resolve()) if self.outputs.get("image_rl") else None
        reward = load_settings("reward", self.sections["reward"])
        existing = valid_report(self.dataset, runs, cfg, reward, self.root)
        if existing is not None:
            return "skipped", existing, "a report of these runs with these settings"
        report = build_report(
            self.dataset,
            cfg,
            self.folder,
            runs=runs,
            text_config_overrides=self.sections["text"],
            image_config_overrides=self.sections["image"],
            reward_overrides=self.sections["reward"],
            root=self.root,
        )
        return "ran", report, None
