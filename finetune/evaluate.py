"""Evaluate a method with the fixed protocol; results as JSON + markdown, episodes as PNG grids.

    python -m finetune.evaluate RUN_DIR_or_WEIGHTS [--config FILE] [key.sub=value ...]
    python -m finetune.evaluate --config FILE model.method=prototype [key.sub=value ...]   # training-free
    accelerate launch -m finetune.evaluate RUN_DIR ...            # episodes sharded over processes

RUN_DIR uses its ``best_model.safetensors`` (chosen on the validation split of the training classes) or, if the
run had no validation, ``last_model.safetensors``; the ``config.yaml`` of the run folder (also of the folder a
weights file sits in) is the default config. A training-free method needs no weights at all. Typical
overrides: ``data.fold=0 eval.shot=5 eval.seeds=[321,322,323] eval.episodes=5000 eval.protocol=hsnet``.
"""

from __future__ import annotations

import dataclasses
import statistics
import sys
from pathlib import Path

import torch
from accelerate import Accelerator

from common.cli import parse_run_args, user_errors
from common.config import save_config
from common.errors import DataError, WeightsError
from common.io import write_text
from common.weights import load_state_dict_file
from fewshot.data.base import FewShotBenchmark
from fewshot.data.episodes import load_episodes
from fewshot.data.sources import Splits, build_splits
from fewshot.evaluate import check_episodes, evaluate_seeds
from fewshot.report import results_table
from finetune.config import FinetuneConfig, eval_spec
from finetune.engine import BEST, LAST
from finetune.methods import FewShotMethod, build_method
from finetune.model.text_guidance import check_text_classes
from finetune.support_tuning import SupportTuned


def resolve_weights(source: str | Path) -> Path:
    """A weights file, or the best (else last) weights of a run folder."""
    source = Path(source)
    if source.is_file():
        return source
    for name in (BEST, LAST):
        if (source / name).is_file():
            return source / name
    raise WeightsError(f"{source}: neither a .safetensors weights file nor a run folder with {BEST} or {LAST}")


def load_weights(model: FewShotMethod, weights: Path) -> FewShotMethod:
    """Load trained weights into ``model`` (safetensors or weights-only pickles: no code runs); exact keys."""
    state = load_state_dict_file(weights)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise WeightsError(f"{weights} does not fit model.* of the config: missing {sorted(missing)[:5]}, "
                           f"unexpected {sorted(unexpected)[:5]} (check model.method / model.backbone / model.prior)")
    return model


def init_weights(model: FewShotMethod, weights: Path) -> list[str]:
    """Start ``model`` from another run's weights (``model.init_from``): every key of the file must exist in the
    model with the same shape; the model's keys the file lacks (e.g. QSM's modules over an SSP run) keep their
    initialisation and are returned."""
    state = load_state_dict_file(weights)
    own = model.state_dict()
    extra = sorted(set(state) - set(own))
    # extra state (e.g. NTRENet's prototype bank) is variable-sized by design; its own loader checks it
    bad = sorted(k for k in set(state) & set(own) if state[k].shape != own[k].shape and not k.endswith("_extra_state"))
    if extra or bad:
        raise WeightsError(f"model.init_from={weights} does not fit model.* of the config: keys the model lacks "
                           f"{extra[:5]}, wrong shapes {bad[:5]}")
    missing, _ = model.load_state_dict(state, strict=False)
    return sorted(missing)


def eval_benchmarks(cfg: FinetuneConfig, splits: Splits | None = None) -> dict[str, FewShotBenchmark]:
    """The benchmarks ``eval.split`` names, one per source (``val``: the joined validation classes)."""
    if cfg.eval.split == "test":
        benches = (splits or build_splits(cfg.data, need_train=False)).test
    else:
        splits = splits or build_splits(cfg.data)
        benches = {"val": splits.val} if splits.val is not None else {}
    if not benches:
        raise DataError(f"no source has a {cfg.eval.split!r} split to evaluate (see data.sources / data.val_*)")
    return benches


def check_eval_splits(cfg: FinetuneConfig, benches: dict[str, FewShotBenchmark]) -> None:
    """Read every pair the evaluation episodes use, before any training (bad data must fail now)."""
    if cfg.eval.task == "fscs":  # N-way classify-and-segment episodes (finetune/fscs.py)
        from finetune.fscs import check_fscs_splits
        return check_fscs_splits(cfg, benches)
    episodes = load_episodes(cfg.eval.episodes_file) if cfg.eval.episodes_file else None
    for bench in benches.values():
        check_episodes(bench, eval_spec(cfg), list(cfg.eval.seeds), episodes)


def prepare_evaluation(cfg: FinetuneConfig, accelerator: Accelerator, model: FewShotMethod, out_dir: Path,
                       weights: Path | None = None) -> FewShotMethod:
    """Load ``weights`` (if given), move the bare model to the device, save the config beside the results."""
    if weights is not None:
        load_weights(accelerator.unwrap_model(model), weights)
    model = accelerator.unwrap_model(model).to(accelerator.device)
    if accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out_dir / "config.yaml")
    return model


def run_evaluation(cfg: FinetuneConfig, accelerator: Accelerator, model: FewShotMethod, benchmark: FewShotBenchmark,
                   out_dir: Path, checkpoint: str, weights: Path | None = None, source: str = "") -> dict:
    """Evaluate ``model`` (with ``weights`` loaded, if given) on ``benchmark`` with every seed; returns results."""
    model = prepare_evaluation(cfg, accelerator, model, out_dir, weights)
    text = getattr(model, "text_guidance", None)
    if cfg.eval.support_tuning:
        model = SupportTuned(model, cfg.eval.support_tuning, cfg.eval.support_tuning_lr)
    spec = eval_spec(cfg)
    episodes = load_episodes(cfg.eval.episodes_file) if cfg.eval.episodes_file else None
    name = source if cfg.data.sources else cfg.data.benchmark
    meta = {"method": cfg.model.method, "label": cfg.eval.label or cfg.model.method, "benchmark": name,
            "fold": str(cfg.data.fold), "checkpoint": checkpoint,
            **({"support_tuning": cfg.eval.support_tuning} if cfg.eval.support_tuning else {}),
            **({"text_guidance": text.describe()} if text is not None else {}),
            **({"episodes_file": cfg.eval.episodes_file} if episodes else {})}
    results = evaluate_seeds(model, benchmark, spec, list(cfg.eval.seeds), accelerator, out_dir, meta,
                             cfg.eval.vis_episodes, cfg.eval.recall_thresholds, episodes)
    n = len(results["seeds"])
    accelerator.print(f"{cfg.model.method} on {name} fold {cfg.data.fold} {results['shot']}-shot "
                      f"({results['protocol']}, {results['episodes']} episodes x {n} seeds): "
                      f"mIoU {100 * results['miou_mean']:.2f}"
                      + (f" ± {100 * results['miou_std']:.2f}" if n > 1 else "")
                      + f", FB-IoU {100 * results['fbiou_mean']:.2f}")
    accelerator.print(f"results: {out_dir / 'results.json'}, {out_dir / 'results.md'}; "
                      f"pictures: {out_dir}/grid_*.png")
    return results


def evaluate_all(cfg: FinetuneConfig, accelerator: Accelerator, model: FewShotMethod,
                 benches: dict[str, FewShotBenchmark], out_dir: Path, checkpoint: str,
                 weights: Path | None = None) -> dict:
    """The method, then each ``eval.compare_with`` baseline, on the same episodes of every source; one table.

    Layout: ``out_dir/[<source>/]results.json`` for the method, ``.../vs_<baseline>/results.json`` beside it,
    and ``out_dir/table.md`` (rows: methods, columns: sources). Returns the method's results (several sources:
    ``{"method", "per_source": {source: results}, "<metric>_mean"}``, the means over sources). ``eval.task=fscs``
    scores FS-CS episodes the same way (:mod:`finetune.fscs`).
    """
    if cfg.eval.task == "gfss":  # BAM's generalized FSS: base classes + the novel one (finetune/gfss.py)
        from finetune.gfss import run_gfss_evaluation
        if len(benches) != 1:
            raise DataError("eval.task=gfss needs one benchmark (data.sources=[])")
        return run_gfss_evaluation(cfg, accelerator, model, next(iter(benches.values())), out_dir, checkpoint,
                                   weights)
    if cfg.eval.task == "fscs":  # N-way classify-and-segment episodes: ER next to mIoU
        from fewshot.fscs import fscs_table
        from finetune.fscs import run_fscs_evaluation
        run_one, make_table = run_fscs_evaluation, fscs_table
        metrics, extra = ("er", "miou", "fbiou"), {"task": "fscs"}
    else:
        run_one, make_table, metrics, extra = run_evaluation, results_table, ("miou", "fbiou"), {}
    several = len(benches) > 1
    per_source, every = {}, []
    for source, bench in benches.items():
        where = out_dir / source if several else out_dir
        per_source[source] = run_one(cfg, accelerator, model, bench, where, checkpoint, weights, source)
        weights = None  # loaded once
        every.append(per_source[source])
    for name in cfg.eval.compare_with:
        if name == cfg.model.method:
            continue
        # the baseline's training-free variant on the same backbone: nothing of the method's training carries over
        base_model = dataclasses.replace(cfg.model, method=name, train_layers=[], adapter="none", init_from="",
                                         meta_memory=False)
        base_cfg = dataclasses.replace(cfg, model=base_model,
                                       eval=dataclasses.replace(cfg.eval, label="", support_tuning=0))
        with torch.random.fork_rng(devices=[]):  # a random-init backbone (quick-start) must not depend on what
            torch.manual_seed(cfg.train.seed)     # ran before: the baseline is a function of the config alone
            baseline = build_method(base_cfg.model)
        if baseline.trains:
            raise WeightsError(f"eval.compare_with: {name} has trained parameters; only training-free methods "
                               "(e.g. prototype) can be compared without a run of their own")
        for source, bench in benches.items():
            where = (out_dir / source if several else out_dir) / f"vs_{name}"
            every.append(run_one(base_cfg, accelerator, baseline, bench, where, "none (training-free)",
                                 source=source))
    if accelerator.is_main_process and (several or cfg.eval.compare_with):
        table = make_table(every, by="benchmark")
        write_text(out_dir / "table.md", table)
        accelerator.print(f"\n{table}\ntable: {out_dir / 'table.md'}")
    if not several:
        return next(iter(per_source.values()))
    return {"method": cfg.model.method, **extra, "per_source": per_source,
            **{f"{k}_mean": statistics.mean(r[f"{k}_mean"] for r in per_source.values()) for k in metrics}}


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    source = Path(argv.pop(0)) if argv and not argv[0].startswith("-") and "=" not in argv[0] else None
    run_dir = None if source is None else source if source.is_dir() else source.parent
    default_config = run_dir / "config.yaml" if run_dir is not None and (run_dir / "config.yaml").is_file() else None
    inv = parse_run_args(FinetuneConfig, argv, prog="python -m finetune.evaluate", default_config=default_config,
                         description=__doc__)
    cfg = inv.cfg
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True)
    accelerator = Accelerator()
    model = build_method(cfg.model)
    weights = resolve_weights(source) if source is not None else None
    if weights is None and model.trains:
        raise WeightsError(f"model.method={cfg.model.method} has trained parameters: give a run folder or a weights "
                           "file (python -m finetune.evaluate RUN_DIR ...)")
    if cfg.eval.out_dir:
        out_dir = Path(cfg.eval.out_dir)
    elif run_dir is not None:
        out_dir = run_dir / "eval"
    else:
        out_dir = Path(cfg.train.out_dir) / f"{cfg.model.method}_{cfg.data.benchmark}_fold{cfg.data.fold}" / "eval"
    benches = eval_benchmarks(cfg)
    check_eval_splits(cfg, benches)
    check_text_classes(model, list(benches.values()))
    results = evaluate_all(cfg, accelerator, model, benches, out_dir,
                           str(weights) if weights else "none (training-free)", weights)
    accelerator.end_training()
    return results


if __name__ == "__main__":
    with user_errors():
        main()
