"""Run configuration: TOML files in ``configs/``, validated strictly.

Every section and key is declared below with its type and default. Unknown sections or keys, wrong
types and out-of-range values raise :class:`ConfigError` naming the key (``train.learning_rate``).
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
import typing
from pathlib import Path
from typing import Any, Mapping

from layerlens_jax._src.costs import DEFAULT_EFFICIENCY, DEFAULT_SATURATION, GainModel
from layerlens_jax._src.methods import METHODS

__all__ = ["ConfigError", "RunConfig", "load_config", "config_from_dict", "VARIANTS"]

# The variants a run can train and compare (one name each in code, JSON and CLI):
VARIANTS = ("uniform_lora", "uniform_widest", "layerlens_lora", "layerlens_mixed", "gora_floor",
            "head_only", "full")


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the key."""


@dataclasses.dataclass(frozen=True)
class RunSection:
    name: str = "default"
    output_dir: str = "runs/default"
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class ModelSection:
    source: str = "pretrained"  # "pretrained" (MiniLM-L6 from its PyPI package) | "random"
    size: str = "minilm_l6"  # for source="random": "tiny" | "minilm_l6"
    max_length: int = 32
    pooling: str = "mean"


@dataclasses.dataclass(frozen=True)
class DataSection:
    task: str = "trec6"  # a shipped task, or "local": your own files (path, ...)
    max_examples: int = 0  # 0: the whole data set; else a seeded stratified subsample
    train_examples: int = 0  # 0: the whole training split; else a stratified subsample of it
    path: str = ""  # task "local": your CSV / JSON Lines file; else replaces the shipped file
    validation_path: str = ""  # task "local": your own validation and test files (both or
    test_path: str = ""  # neither; neither: path is split like a shipped task)
    text_field: str = "text"  # task "local": the field names
    label_field: str = "label"
    objective: str = "classification"  # task "local": "classification" or "regression" (the
    # label field holds a float target; squared-error loss, scored by R^2)
    split_seed: int = 0
    batch_size: int = 32
    eval_batch_size: int = 128


@dataclasses.dataclass(frozen=True)
class ProfileSection:
    batches: int = 8
    sampled_fisher: bool = False
    # Adam steps on the task head alone before profiling (0: profile through the fresh head).
    head_warmup_steps: int = 0


@dataclasses.dataclass(frozen=True)
class UtilitySection:
    fisher_weight: float = 0.75
    grad_weight: float = 0.25
    transform: str = "linear"
    per_param: bool = False
    source: str = "empirical"


@dataclasses.dataclass(frozen=True)
class BudgetSection:
    # The trainable-parameter budget is that of uniform LoRA of `reference_rank` on the
    # `reference_targets` linear sites of every layer (names matched against the last path part),
    # times `scale` (e.g. 0.5 for the smaller budget). Other budgets are optional caps.
    reference_rank: int = 8
    reference_targets: tuple[str, ...] = ("query", "value")
    # The baseline is standard LoRA (scale alpha / r, Hu et al.): alpha 16 gives r=8 scale 2.
    reference_alpha: float = 16.0
    scale: float = 1.0
    train_flops: float = math.inf
    infer_flops: float = math.inf
    vram_bytes: float = math.inf
    latency: float = math.inf
    utilisation: tuple[float, ...] = ()  # e.g. [0.80, 0.88]; empty: fill the binding budget
    # vram_bytes and train_flops are budgets of the whole train step, latency of the whole
    # inference batch (milliseconds, the base forward measured): the plan stage measures a step
    # profile (one probe compile per layer group, layerlens_jax.measure_step_profile) and every
    # plan reports its predicted step memory next to XLA's. false: per-site increments only.
    whole_step: bool = True


@dataclasses.dataclass(frozen=True)
class AllocateSection:
    lora_ranks: tuple[int, ...] = (1, 2, 4, 6, 8, 12, 16, 24, 32)
    adapter_sizes: tuple[int, ...] = (4, 8, 16, 32, 64)
    prefix_lengths: tuple[int, ...] = (2, 4, 8, 16)
    # LayerLens plans mix ranks, so their LoRA scale is rank-stable (rsLoRA, alpha / sqrt(r)):
    # alpha 2*sqrt(8) gives rank 8 the baseline's scale 2, without rank 1 getting 8x rank 16's.
    lora_alpha: float = 5.656854249492381
    use_rslora: bool = True
    # The gain model (layerlens_jax._src.costs.GainModel): gain = utility * efficiency * x / (1 + x),
    # x = size / saturation: the size at which a method reaches half its attainable gain.
    # Defaults measured on a validation split (costs.DEFAULT_EFFICIENCY / DEFAULT_SATURATION).
    lora_efficiency: float = DEFAULT_EFFICIENCY["lora"]
    adapter_efficiency: float = DEFAULT_EFFICIENCY["adapter"]
    prefix_efficiency: float = DEFAULT_EFFICIENCY["prefix"]
    lora_saturation: float = DEFAULT_SATURATION["lora"]
    adapter_saturation: float = DEFAULT_SATURATION["adapter"]
    prefix_saturation: float = DEFAULT_SATURATION["prefix"]
    # Never adapt a block together with a layer inside it (their gains share one signal). Off by
    # default: on TREC-6 validation (3 seeds) the exclusive mixed plans did worse (val loss 0.2252
    # vs 0.2158 at budget 1, 0.2423 vs 0.2359 at 0.5).
    exclusive_nesting: bool = False
    # "layers": the same projection of every layer shares one option (allocate(..., tie=...));
    # "": every site is its own decision.
    tie: str = ""

    def gain_model(self) -> GainModel:
        return GainModel(efficiency={m: getattr(self, f"{m}_efficiency") for m in METHODS[1:]},
                         scale={m: getattr(self, f"{m}_saturation") for m in METHODS[1:]})


@dataclasses.dataclass(frozen=True)
class TrainSection:
    # The task head (fresh pooler + classifier) trains in every variant and is never allocated.
    head: tuple[str, ...] = ("pooler", "classifier")
    steps: int = 200
    learning_rate: float = 1e-3
    full_learning_rate: float = 5e-5  # for the full fine-tuning reference
    head_learning_rate: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 20
    eval_every: int = 50
    # Training stops with an error (and no checkpoint for that variant) when the loss is not
    # finite or its mean since the previous check exceeds this multiple of the first step's loss.
    # A classification loss starts near log(classes) and falls in a normal run (the window means
    # are compared, so one noisy batch does not trip it); 10x the start means the optimizer blew up.
    divergence_factor: float = 10.0


@dataclasses.dataclass(frozen=True)
class CompareSection:
    variants: tuple[str, ...] = ("uniform_lora", "uniform_widest", "gora_floor", "layerlens_lora",
                                 "layerlens_mixed")
    seeds: tuple[int, ...] = (0,)
    # the plan written as plan.json and checkpointed: gora_floor (rank 1 on the widest uniform set
    # that fits, the rest by GoRA's importance), ahead of uniform_widest on the validation splits
    # of four tasks in three training regimes at the reference budget, equal to it at 1/8
    # (README "Task validation")
    main: str = "gora_floor"


@dataclasses.dataclass(frozen=True)
class RunConfig:
    run: RunSection = RunSection()
    model: ModelSection = ModelSection()
    data: DataSection = DataSection()
    profile: ProfileSection = ProfileSection()
    utility: UtilitySection = UtilitySection()
    budget: BudgetSection = BudgetSection()
    allocate: AllocateSection = AllocateSection()
    train: TrainSection = TrainSection()
    compare: CompareSection = CompareSection()

    def to_dict(self) -> dict[str, Any]:
        def clean(v):
            if isinstance(v, float) and math.isinf(v):
                return "inf"
            if isinstance(v, tuple):
                return [clean(x) for x in v]
            return v
        return {sec.name: {k: clean(v) for k, v in dataclasses.asdict(getattr(self, sec.name)).items()}
                for sec in dataclasses.fields(self)}


_CHOICES = {
    "model.source": ("pretrained", "random"),
    "model.size": ("tiny", "minilm_l6"),
    "model.pooling": ("mean", "cls"),
    "data.task": ("trec6", "trec50", "movie_sentiment", "tweet_sentiment", "local"),
    "utility.transform": ("linear", "sqrt"),
    "utility.source": ("empirical", "sampled"),
}
_POSITIVE = {"model.max_length", "data.batch_size", "data.eval_batch_size", "profile.batches",
             "budget.reference_rank", "budget.scale", "train.steps", "train.learning_rate",
             "train.full_learning_rate", "train.head_learning_rate", "train.eval_every",
             "budget.train_flops", "budget.infer_flops", "budget.vram_bytes", "budget.latency",
             "budget.reference_alpha", "allocate.lora_alpha", "allocate.lora_saturation",
             "allocate.adapter_saturation", "allocate.prefix_saturation"}
# Float keys that may be infinite (an optional budget: inf = no cap); every other float key must be
# finite.
_MAY_BE_INFINITE = {"budget.train_flops", "budget.infer_flops", "budget.vram_bytes",
                    "budget.latency"}
_NON_NEGATIVE = {"run.seed", "data.split_seed", "data.max_examples", "data.train_examples", "profile.head_warmup_steps", "train.weight_decay",
                 "train.warmup_steps", "utility.fisher_weight", "utility.grad_weight",
                 "allocate.lora_efficiency", "allocate.adapter_efficiency",
                 "allocate.prefix_efficiency"}


def _coerce(value: Any, annot: Any, key: str) -> Any:
    origin = typing.get_origin(annot)
    if origin is tuple:
        (item, _ellipsis) = typing.get_args(annot)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        return tuple(_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value))
    if annot is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
        return value
    if annot is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return value
    if annot is float:
        if value == "inf":
            return math.inf
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        return float(value)
    if annot is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {annot!r} for {key}")  # a bug in this module


def _section(cls, values: Any, name: str):
    if not isinstance(values, Mapping):
        raise ConfigError(f"[{name}] must be a table, got {values!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown key(s) {', '.join(f'{name}.{k}' for k in unknown)}; "
                          f"[{name}] accepts {', '.join(sorted(known))}")
    kwargs = {}
    for k, v in values.items():
        key = f"{name}.{k}"
        v = _coerce(v, hints[k], key)
        if key in _CHOICES and v not in _CHOICES[key]:
            raise ConfigError(f"{key} must be one of {_CHOICES[key]}, got {v!r}")
        if key in _POSITIVE and not v > 0:
            raise ConfigError(f"{key} must be > 0, got {v!r}")
        if key in _NON_NEGATIVE and not v >= 0:
            raise ConfigError(f"{key} must be >= 0, got {v!r}")
        if key not in _MAY_BE_INFINITE:
            _check_finite(v, key)
        kwargs[k] = v
    return cls(**kwargs)


def _check_finite(value: Any, key: str) -> None:
    values = value if isinstance(value, tuple) else (value,)
    for v in values:
        if isinstance(v, float) and not math.isfinite(v):
            raise ConfigError(f"{key} must be a finite number, got {v!r}")


def config_from_dict(d: Mapping[str, Any]) -> RunConfig:
    fields = {f.name: f for f in dataclasses.fields(RunConfig)}
    unknown = sorted(set(d) - set(fields))
    if unknown:
        raise ConfigError(f"unknown section(s) {unknown}; known: {sorted(fields)}")
    hints = typing.get_type_hints(RunConfig)
    cfg = RunConfig(**{k: _section(hints[k], v, k) for k, v in d.items()})
    _cross_checks(cfg)
    return cfg


def _cross_checks(cfg: RunConfig) -> None:
    for v in cfg.compare.variants:
        if v not in VARIANTS:
            raise ConfigError(f"compare.variants: unknown variant {v!r}; known: {VARIANTS}")
    if not cfg.compare.variants:
        raise ConfigError("compare.variants must name at least one variant")
    if len(set(cfg.compare.variants)) != len(cfg.compare.variants):
        raise ConfigError(f"compare.variants has duplicates: {cfg.compare.variants}")
    if cfg.compare.main not in ("uniform_lora", "uniform_widest", "layerlens_lora",
                                "layerlens_mixed", "gora_floor"):
        raise ConfigError(f"compare.main must be a plan variant (uniform_lora, uniform_widest, "
                          f"layerlens_lora, layerlens_mixed, gora_floor), got "
                          f"{cfg.compare.main!r}")
    if cfg.data.task == "local" and not cfg.data.path:
        raise ConfigError('data.task = "local" needs data.path (your CSV or JSON Lines file)')
    if cfg.data.objective not in ("classification", "regression"):
        raise ConfigError(f"data.objective must be \"classification\" or \"regression\", got "
                          f"{cfg.data.objective!r}")
    if cfg.data.objective == "regression" and cfg.data.task != "local":
        raise ConfigError(f"data.objective = \"regression\" is for your own files (data.task = "
                          f"\"local\"); {cfg.data.task!r} is a classification task")
    if cfg.data.objective == "regression" and cfg.profile.sampled_fisher:
        raise ConfigError("profile.sampled_fisher samples class labels; it is not defined for "
                          "data.objective = \"regression\" (set it to false)")
    if cfg.data.task != "local" and (cfg.data.validation_path or cfg.data.test_path):
        raise ConfigError("data.validation_path / data.test_path are for data.task = \"local\"")
    if bool(cfg.data.validation_path) != bool(cfg.data.test_path):
        raise ConfigError("give both data.validation_path and data.test_path, or neither")
    if cfg.compare.main not in cfg.compare.variants:
        raise ConfigError(f"compare.main {cfg.compare.main!r} (the plan checkpointed and evaluated) "
                          f"must be one of compare.variants {list(cfg.compare.variants)}")
    if not cfg.compare.seeds:
        raise ConfigError("compare.seeds must list at least one seed")
    if any(s < 0 for s in cfg.compare.seeds):
        raise ConfigError(f"compare.seeds must be >= 0, got {list(cfg.compare.seeds)}")
    if not cfg.train.divergence_factor > 1:
        raise ConfigError(f"train.divergence_factor must be > 1, got {cfg.train.divergence_factor}")
    u = cfg.budget.utilisation
    if u and not (len(u) == 2 and 0 < u[0] <= u[1] <= 1):
        raise ConfigError(f"budget.utilisation must be [low, high] with 0 < low <= high <= 1, "
                          f"got {list(u)}")
    for key in ("lora_ranks", "adapter_sizes", "prefix_lengths"):
        sizes = getattr(cfg.allocate, key)
        if not sizes or any(s <= 0 for s in sizes):
            raise ConfigError(f"allocate.{key} must be a non-empty list of positive integers, "
                              f"got {list(sizes)}")
    if cfg.compare.main in ("uniform_lora", "uniform_widest", "gora_floor") and any(
            math.isfinite(getattr(cfg.budget, r))
            for r in ("vram_bytes", "train_flops", "infer_flops", "latency")):
        raise ConfigError(f"compare.main = {cfg.compare.main!r} is sized by the "
                          f"parameter budget only; with a vram_bytes / train_flops / infer_flops / "
                          f"latency budget set compare.main = \"layerlens_lora\" (or "
                          f"\"layerlens_mixed\"), the plans allocated under every budget")
    if cfg.allocate.tie not in ("", "layers"):
        raise ConfigError(f"allocate.tie must be \"\" or \"layers\", got {cfg.allocate.tie!r}")
    if cfg.utility.fisher_weight + cfg.utility.grad_weight <= 0:
        raise ConfigError("utility.fisher_weight + utility.grad_weight must be > 0")


def load_config(path: str | Path, overrides: Mapping[str, Any] | None = None) -> RunConfig:
    """Read a TOML config; ``overrides`` maps ``"section.key"`` to a value (from the CLI)."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"config file {str(path)!r} is a directory, not a TOML file")
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        d = tomllib.loads(path.read_text())
    except OSError as e:
        raise ConfigError(f"config file {str(path)!r} cannot be read: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not valid TOML: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    for dotted, value in (overrides or {}).items():
        section, _, key = dotted.partition(".")
        if not key:
            raise ConfigError(f"override {dotted!r} must look like section.key=value")
        d.setdefault(section, {})[key] = value
    try:
        return config_from_dict(d)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None

