"""What each entry point reads from its config, as dataclass schemas checked once, before any work.

A key that nothing reads is an error, not a silent no-op (``+optimization.lr=0.1`` would otherwise train at the
default rate), and so is a value of the wrong type (``optimization.epochs=1.5``). :func:`validate_config` checks
a composed config in two parts:

* the script's own settings against its schema (:class:`TrainingConfig` for ``mnist_fwdgrad.py`` /
  ``mnist_backprop.py``, :class:`GlobalOptimConfig`, :class:`ApproxQualityConfig`): unknown keys, with the
  closest known name suggested, and types, by OmegaConf's structured-config validation (merged onto
  ``OmegaConf.structured(schema)``);
* every node with a ``_target_`` (the ``gradient``, ``model``, ``dataset``, ``function``, ``source`` groups, the
  optimizer and the scheduler, at any depth) against the signature of its target: a key the target does not
  accept is refused before anything is built. These groups are typed ``Any`` in the schemas, so a new
  estimator, model or dataset needs no schema change: its constructor's arguments are its schema.

Values are range-checked where they are used (``read_settings``, the constructors), since a type cannot say
``epochs >= 1``. The checks run inside the task (``train``, ``run_global_optim``, ``run_approx_quality``), so
the Python API gets them too, and a Hydra script reports a bad key as one ``[ERROR]`` paragraph, exit status 2.
A script that grows a new setting adds its field here; the test composing every config keeps the two in step.
"""

# (no `from __future__ import annotations`: OmegaConf reads the dataclass field types at run time)
import dataclasses
import difflib
import inspect
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Tuple

from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from fwdgrad.errors import ConfigError

__all__ = [
    "ApproxQualityConfig",
    "DistributedConfig",
    "EntryPointConfig",
    "GlobalOptimConfig",
    "OptimizationConfig",
    "TrainingConfig",
    "TrainingOptimizationConfig",
    "check_target_keys",
    "validate_config",
]

# -- the schemas (the comments of configs/*.yaml say what each key does) ------------------------------------------


@dataclass
class OptimizationConfig:
    """``optimization``: the shape every script shares (``configs/optimization/``)."""

    optimizer: Any = MISSING  #: a ``_partial_`` torch.optim node
    scheduler: Any = None  #: a ``_partial_`` torch.optim.lr_scheduler node, or null
    learning_rate: float = MISSING


@dataclass
class TrainingOptimizationConfig(OptimizationConfig):
    epochs: int = 200
    max_steps: Optional[int] = None
    clip_grad_norm: Optional[float] = None
    stop_loss_threshold: Optional[float] = None


@dataclass
class DistributedConfig:
    world_size: int = 1
    backend: str = "auto"
    timeout_s: float = 120.0


@dataclass
class EntryPointConfig:
    """What every entry point reads: its estimator, its seed, and whether it may replace an earlier run's files."""

    gradient: Any = MISSING
    seed: int = 0
    overwrite: bool = False
    #: the result entry returned to an optimising sweeper (``hydra/sweeper=lr_search`` sets it), or null
    objective: Optional[str] = None


@dataclass
class TrainingConfig(EntryPointConfig):
    """``mnist_fwdgrad.py`` and ``mnist_backprop.py`` (``configs/mnist.yaml``)."""

    dataset: Any = MISSING
    model: Any = MISSING
    optimization: TrainingOptimizationConfig = field(default_factory=TrainingOptimizationConfig)
    device: str = "auto"
    threads: Optional[int] = None
    tune_malloc: Any = "auto"  # auto | true | false
    log_every: int = 20
    eval_batch_size: int = 1000
    progress_bar: bool = True
    plot_misclassified: int = 20
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    resume: Optional[str] = None
    frog_fc: Any = None  #: ``+experiment/frog_fc=...``: the grid's width and published learning rates (interpolated)
    local_mixer: Any = None  #: ``+experiment=local_mixer_*/...``: the model size and the swept learning rates (interpolated)


@dataclass
class GlobalOptimConfig(EntryPointConfig):
    """``global_optim.py`` (``configs/global_optim.yaml``)."""

    function: Any = MISSING
    baseline: Any = None
    optimization: OptimizationConfig = field(default_factory=OptimizationConfig)
    iterations: int = 10000
    threads: Optional[int] = None
    log_every: int = 10
    progress: bool = True
    early_stopping_patience: Optional[int] = None
    frog_math: Any = None  #: ``+experiment/frog_math=...``: the grid's setups and published learning rates


@dataclass
class ApproxQualityConfig(EntryPointConfig):
    """``approx_quality.py`` (``configs/approx_quality.yaml``)."""

    source: Any = MISSING
    num_samples: int = 200
    num_tangents: List[int] = field(default_factory=list)
    aggregations: List[str] = field(default_factory=list)
    distributions: List[str] = field(default_factory=list)
    num_threads: Optional[int] = None
    zeroth_order: Any = None  #: a zeroth-order estimator node evaluated on the same tangents, or null
    method_samples: int = 20  #: estimates per method in methods.csv (source=mnist_mlp)
    methods: Any = None  #: name -> {estimator: node, local_losses, local_groups}: whole estimators compared


# -- the checks ------------------------------------------------------------------------------------------------
def validate_config(cfg: DictConfig, schema: type, script: str) -> None:
    """Check ``cfg`` against ``schema`` and every ``_target_`` node against its target (module docstring).

    Raises:
        ConfigError: naming the first unknown key (with the closest known one) or badly typed value.
    """
    _check_known_keys(cfg, schema, "", script)
    try:
        typed = OmegaConf.merge(OmegaConf.structured(schema), cfg)
        for key in _typed_leaves(typed, schema):
            OmegaConf.select(typed, key, throw_on_missing=False)  # reading a typed value validates it
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "?"
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ConfigError(f"`{key}`: {message} ({script} reads it as declared in fwdgrad/app/schema.py: "
                          f"{_field_type(schema, key)}).") from None
    for key, node in _target_nodes(cfg):
        check_target_keys(node, key)


def _check_known_keys(node: DictConfig, schema: type, prefix: str, script: str) -> None:
    fields = {f.name: f for f in dataclasses.fields(schema)}
    for key in node.keys():
        dotted = f"{prefix}{key}"
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f" Did you mean `{prefix}{close[0]}`?" if close else ""
            raise ConfigError(
                f"`{dotted}` is not a setting of {script}: nothing would read it, so it would have no effect.{hint} "
                f"The settings{' of `' + prefix[:-1] + '`' if prefix else ''} are: {', '.join(fields)}."
            )
        sub = fields[key].type
        if dataclasses.is_dataclass(sub) and isinstance(node.get(key), DictConfig):
            _check_known_keys(node[key], sub, f"{dotted}.", script)


def _typed_leaves(cfg: DictConfig, schema: type, prefix: str = "") -> Iterator[str]:
    for f in dataclasses.fields(schema):
        if dataclasses.is_dataclass(f.type):
            yield from _typed_leaves(cfg, f.type, f"{prefix}{f.name}.")
        elif f.type is not Any:
            yield f"{prefix}{f.name}"


def _field_type(schema: type, dotted: str) -> str:
    tp: Any = schema
    for part in dotted.split("[")[0].split("."):
        fields = {f.name: f for f in dataclasses.fields(tp)} if dataclasses.is_dataclass(tp) else {}
        if part not in fields:
            return "see there"
        tp = fields[part].type
    return f"`{dotted}: {getattr(tp, '__name__', tp)}`"


def _target_nodes(node: Any, prefix: str = "") -> Iterator[Tuple[str, DictConfig]]:
    """``(dotted key, node)`` of every node with a ``_target_`` in ``node``, outermost first."""
    if isinstance(node, DictConfig):
        if "_target_" in node:
            yield prefix[:-1] or "(root)", node
        for key in node.keys():
            if not OmegaConf.is_missing(node, key) and not OmegaConf.is_interpolation(node, key):
                yield from _target_nodes(node[key], f"{prefix}{key}.")
    elif isinstance(node, ListConfig):
        for i, item in enumerate(node):
            yield from _target_nodes(item, f"{prefix}{i}.")


def _accepted_arguments(target: Any) -> Optional[Dict[str, inspect.Parameter]]:
    """The keyword arguments ``target`` accepts, or None when it accepts any (``**kwargs``) or cannot be read."""
    try:
        params = inspect.signature(target).parameters
    except (TypeError, ValueError):  # a builtin without a signature: let the call decide
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return None
    return {n: p for n, p in params.items() if p.kind is not inspect.Parameter.POSITIONAL_ONLY}


#: The config group a ``_target_`` node comes from, where that is not its key with "/" for "." (for the hint).
_GROUP_OF = {"optimization.optimizer": "optimization"}


def check_target_keys(node: DictConfig, key: str) -> None:
    """Refuse a key of the ``_target_`` node ``node`` (at config key ``key``) that its target does not accept.

    Hydra's own keys (``_partial_``, ``_convert_``, ...) are skipped. A target that cannot be imported is left to
    :func:`fwdgrad.app.config.build`, which names it.
    """
    from hydra.utils import get_object

    target_path = node.get("_target_")
    try:
        target = get_object(str(target_path))
    except Exception:  # noqa: BLE001 - an unknown target is build()'s error to report, with its own message
        return
    accepted = _accepted_arguments(target)
    if accepted is None:
        return
    for name in map(str, node.keys()):
        if name.startswith("_") and name.endswith("_") or name in accepted:
            continue
        close = difflib.get_close_matches(name, list(accepted), n=1)
        hint = f" Did you mean `{key}.{close[0]}`?" if close else ""
        group = _GROUP_OF.get(key, key.replace(".", "/"))
        example = ", e.g. optimization=sgd or optimization=adam" if group == "optimization" else ""
        raise ConfigError(
            f"cannot build `{key}` ({target_path}): `{key}.{name}` is not one of its arguments, so it would have no "
            f"effect.{hint} It takes: {', '.join(accepted) or 'no arguments'}. To switch to another kind of "
            f"{key}, choose another file of its config group ({group}=<file>{example}) rather than only its "
            "`_target_`."
        )
