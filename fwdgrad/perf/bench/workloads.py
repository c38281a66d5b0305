"""What the benchmark runs: the table's rows (:class:`Variant`), the models, and one gradient step of each."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Dict, List, Sequence, Union

import torch
from torch import nn

from fwdgrad import (
    Backprop,
    ForwardActivity,
    ForwardGradient,
    GradientEstimator,
    LocalGuess,
    ZerothOrder,
    estimate_module_grads,
)
from fwdgrad.errors import ConfigError
from fwdgrad.nn.functional import cross_entropy, per_example_cross_entropy
from fwdgrad.nn.models import MLP, ConvNet, LeNet5, LocalMixer, MLPMixer, ResNet, VisionTransformer

log = logging.getLogger("bench")


MIB = 2**20


SHAPE = (1, 28, 28)


class BenchError(ConfigError):
    """Bad command-line input (exit status 2, like argparse's own errors)."""


# -- configurations ------------------------------------------------------------------------------------------
@dataclass
class Variant:
    """One row of the table: what runs as the step."""

    name: str  # forward | backprop | fg | fga (activity perturbation) | guess (local-gradient guesses) | zo |
    #            sgd (a whole SGD step with ForwardGradient) | torchzero | jvp_loop (peers, a whole SGD step each) |
    #            compiled_backprop | compiled_jvp | compiled_fg (torch.compile, issue 23's measurement)
    distribution: str = ""
    k: int = 0
    backend: str = ""
    regenerate: Union[bool, str] = "auto"  # ForwardGradient's regenerate_tangents
    local: bool = False  # the model trains with local losses (fwdgrad.nn.local_losses): LG-BP, LG-FG-W, LG-FG-A
    groups: int = 1  # with local losses: unit groups per block, each with its own loss (model.local_groups)
    aggregation: str = "mean"  # ForwardGradient's aggregation

    @property
    def label(self) -> str:
        prefix = ("local " if self.local else "") + (f"{self.groups}-group " if self.groups > 1 else "")
        if self.name in ("fga", "zo"):
            return f"{prefix}{self.name} {self.distribution} k={self.k}"
        if self.name in PEERS:
            return f"{PEERS[self.name].format(distribution=self.distribution)} k={self.k}, SGD step"
        if self.name in COMPILED:
            return COMPILED[self.name][0].format(k=self.k)
        if self.name != "fg":
            return prefix + self.name
        suffix = {True: " regenerated", False: " kept", "auto": ""}[self.regenerate]
        suffix += "" if self.aggregation == "mean" else f" {self.aggregation}"
        backend = {"func": " (torch.func)", "simulated": " (simulated: backprop, then B^T g)"}
        return prefix + f"fg {self.distribution} k={self.k}" + backend.get(self.backend, suffix)


#: The whole-step rows that compare fwdgrad with its peers: fwdgrad's dense forward gradient (normal or
#: counter_normal tangents) and SGD, torchzero's ForwardGradient module (one forward-mode pass per tangent) with its
#: LR module, and a Python loop of k torch.func.jvp calls with an in-place update (the way orobix/fwdgrad and frog
#: compute a forward gradient).
PEERS = {"sgd": "fwdgrad fg {distribution}", "torchzero": "torchzero ForwardGradient",
         "jvp_loop": "torch.func.jvp loop"}
PEER_LR = 1e-5  # small: many timed steps must not make the model diverge
#: The torch.compile rows (``--compiled-ks``): name -> (label, what one step runs), formatted with k and plurals.
COMPILED = {
    "compiled_backprop": ("backprop, torch.compile", "1 forward + 1 backward, compiled"),
    "compiled_jvp": ("fg normal k={k} (torch.func.jvp, torch.compile)",
                     "{k} compiled forward-mode pass{es}, 1 tangent each"),
    "compiled_fg": ("fg normal k={k}, whole step under torch.compile",
                    "1 forward-mode pass, {k} tangent{s}, compiled where dynamo can trace"),
}


def passes(v: Variant) -> str:
    """What one step of ``v`` runs over the model: its cost in passes."""
    if v.name == "forward":
        return "1 no-grad forward"
    if v.name == "backprop":
        return "1 forward + 1 backward"
    if v.name == "zo":  # central differences, plus one pass for the exact loss f(theta)
        return f"{2 * v.k + 1} no-grad forwards"
    if v.name in ("torchzero", "jvp_loop"):
        return f"{v.k} forward-mode pass{'es' if v.k > 1 else ''}, 1 tangent each, and the update"
    if v.name == "sgd":
        return f"1 forward-mode pass, {v.k} tangent{'s' if v.k > 1 else ''}, and the update"
    if v.name in COMPILED:
        return COMPILED[v.name][1].format(k=v.k, es="es" if v.k > 1 else "", s="s" if v.k > 1 else "")
    if v.name == "guess":  # each block's guess is its local-loss gradient, then one pass projects onto them
        return "1 forward + a backward inside each block, then 1 forward-mode pass"
    per_example = " per example and layer output" if v.name == "fga" else ""
    return f"1 forward-mode pass, {v.k} tangent{'s' if v.k > 1 else ''}{per_example}"


#: Ren et al.'s LocalMixer (full size, --quick size): M/1/16, and the patch variant of the Fashion-MNIST recipes
#: (4 blocks, 7x7 patches of 4x4 pixels, 64 channels, 16 groups).
LOCAL_MIXER_SIZES = {
    "local_mixer": (dict(channels=512, groups=16), dict(channels=16, groups=4)),
    "local_mixer_patch": (dict(num_blocks=4, patch_size=4, channels=64, groups=16),
                          dict(num_blocks=2, patch_size=7, channels=8, groups=2)),
}

#: name -> (full size, --quick size); all on MNIST's 1x28x28 images. The last four are the models of the
#: multi-tangent paper's Section 4.5 (FROG_MODELS), in the sizes frog trains them.
BENCH_MODELS: Dict[str, tuple[Callable[[], nn.Module], Callable[[], nn.Module]]] = {
    "mlp": (lambda: MLP(SHAPE, 10, (1024, 1024)), lambda: MLP(SHAPE, 10, (64, 64))),
    "convnet": (lambda: ConvNet(SHAPE, 10), lambda: ConvNet(SHAPE, 10, channels=4, hidden_size=32)),
    "lenet5": (lambda: LeNet5(SHAPE, 10), lambda: LeNet5(SHAPE, 10)),
    "resnet18": (lambda: ResNet(SHAPE, 10), lambda: ResNet(SHAPE, 10, width=4, blocks=(1, 1))),
    "vit": (lambda: VisionTransformer(SHAPE, 10),
            lambda: VisionTransformer(SHAPE, 10, num_layers=1, num_heads=2, hidden_dim=16, mlp_dim=16)),
    "mlp_mixer": (lambda: MLPMixer(SHAPE, 10),
                  lambda: MLPMixer(SHAPE, 10, hidden_dim=16, token_mlp_dim=8, channel_mlp_dim=16, num_blocks=1)),
    "local_mixer": (lambda: LocalMixer(SHAPE, 10, **LOCAL_MIXER_SIZES["local_mixer"][0]),
                    lambda: LocalMixer(SHAPE, 10, **LOCAL_MIXER_SIZES["local_mixer"][1])),
    "local_mixer_patch": (lambda: LocalMixer(SHAPE, 10, **LOCAL_MIXER_SIZES["local_mixer_patch"][0]),
                          lambda: LocalMixer(SHAPE, 10, **LOCAL_MIXER_SIZES["local_mixer_patch"][1])),
}


FROG_MODELS = ("lenet5", "resnet18", "vit", "mlp_mixer")
LOCAL_MIXERS = ("local_mixer", "local_mixer_patch")


def build_model(name: str, quick: bool, local: bool = False, groups: int = 1) -> nn.Module:
    if name not in BENCH_MODELS:
        raise BenchError(f"unknown model {name!r}; use --models with any of {', '.join(BENCH_MODELS)} "
                         "(comma separated).")
    if name in LOCAL_MIXERS:  # with local=True: its local heads and block/patch/group-wise losses
        return LocalMixer(SHAPE, 10, local_losses=local, **LOCAL_MIXER_SIZES[name][1 if quick else 0])
    if local:  # the local-loss rows (issue 12): the MLP and conv net with auxiliary heads (and unit groups)
        if name == "mlp":
            return MLP(SHAPE, 10, (64, 64) if quick else (1024, 1024), local_losses=True, local_groups=groups)
        tiny = dict(channels=4 if groups == 1 else 16, hidden_size=32)  # --quick: channels that groups divide
        return ConvNet(SHAPE, 10, local_losses=True, local_groups=groups, **(tiny if quick else {}))
    return BENCH_MODELS[name][1 if quick else 0]()


def frog_variants(ks: Sequence[int], func_ks: Sequence[int]) -> List[Variant]:
    """The Section 4.5 models' rows: forward, backprop, dense normal tangents for each k (the fast engine), and
    the torch.func reference at k = 1."""
    return [Variant("forward"), Variant("backprop"), *[Variant("fg", "normal", k, "func") for k in func_ks if k == 1],
            *[Variant("fg", "normal", k, "auto") for k in ks]]


def local_mixer_variants() -> List[Variant]:
    """LocalMixer's rows, the methods of Ren et al.'s Table 3 with one tangent: BP, FG-W, FG-A, and with the
    local losses LG-BP, LG-FG-W, LG-FG-A, and local-gradient guesses."""
    return [Variant("forward"), Variant("backprop"), Variant("fg", "normal", 1, "auto"), Variant("fga", "normal", 1),
            Variant("backprop", local=True), Variant("fg", "normal", 1, "auto", local=True),
            Variant("fga", "normal", 1, local=True), Variant("guess", local=True)]


def variants(ks: Sequence[int], dists: Sequence[str], func_ks: Sequence[int],
             zo_ks: Sequence[int] = (), sim_ks: Sequence[int] = ()) -> List[Variant]:
    out = [Variant("forward"), Variant("backprop")]
    out += [Variant("fg", "normal", k, "func") for k in func_ks]
    out += [Variant("fg", "normal", k, "simulated") for k in sim_ks]  # frog's simfg: same estimate, for studies
    out += [Variant("fg", d, k, "auto") for d in dists for k in ks]
    if "normal" in dists and 1 in ks:  # the two ends of the default's memory/speed trade (regenerate "auto")
        out += [Variant("fg", "normal", 1, "auto", regenerate=False), Variant("fg", "normal", 1, "auto", regenerate=True)]
    if "normal" in dists and 16 in ks:  # issue 12's table: the projection onto 16 tangents (a 16 x 16 Gram solve more)
        out.append(Variant("fg", "normal", 16, "auto", aggregation="projection"))
    # activity perturbation and local losses (issue 12): FG-A, LG-BP, LG-FG-W, LG-FG-A (also with 16 unit groups),
    # local-gradient guesses
    out += [Variant("fga", "normal", 1), Variant("backprop", local=True), Variant("fg", "normal", 1, "auto", local=True),
            Variant("fga", "normal", 1, local=True), Variant("fga", "normal", 1, local=True, groups=16),
            Variant("guess", local=True)]
    if "counter_normal" in dists:  # FG-A's per-example activity tangents drawn by the counter-based kernel
        out += [Variant("fga", "counter_normal", 1), Variant("fga", "counter_normal", 1, local=True)]
    return out + [Variant("zo", "normal", k) for k in zo_ks]


def peer_variants(ks: Sequence[int]) -> List[Variant]:
    """The peer rows (MLP): for each k, fwdgrad's whole SGD step (normal and counter_normal tangents) beside
    torchzero's and a torch.func.jvp loop's."""
    return [Variant(name, "normal", k) for k in ks for name in PEERS] + [Variant("sgd", "counter_normal", k) for k in ks]


def _functional_loss(model: nn.Module, x: torch.Tensor,
                     y: torch.Tensor) -> Callable[[Dict[str, torch.Tensor]], torch.Tensor]:
    """The mean cross-entropy of ``model`` on ``(x, y)`` as a function of its parameters (for torch.func.jvp)."""
    def loss_fn(p: Dict[str, torch.Tensor]) -> torch.Tensor:
        return cross_entropy(torch.func.functional_call(model, p, (x,)), y)
    return loss_fn


def _normal_tangent(params: Dict[str, torch.Tensor], gen: torch.Generator) -> Dict[str, torch.Tensor]:
    """One N(0, I) tangent per parameter tensor, drawn from ``gen`` (the jvp rows' eager draw)."""
    return {n: torch.randn(p.shape, generator=gen, device=p.device, dtype=p.dtype) for n, p in params.items()}


def compiled_variants(ks: Sequence[int]) -> List[Variant]:
    """The torch.compile rows (MLP; none unless asked, ``--compiled-ks``): a compiled backprop step, and for each k
    a compiled ``torch.func.jvp`` forward-gradient step and fwdgrad's own step under ``torch.compile``, so that a
    compiled forward gradient is compared with compiled backprop, not with eager."""
    return [Variant("compiled_backprop"), *[Variant(name, "normal", k) for k in ks
                                            for name in ("compiled_jvp", "compiled_fg")]] if ks else []


def _compiled_step(v: Variant, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    """A gradient step written to ``p.grad`` under ``torch.compile`` (inductor, its default mode).

    ``compiled_backprop``: the model's forward compiled, the backward through the compiled graph's backward.
    ``compiled_jvp``: the forward-mode pass ``torch.func.jvp`` compiled, one per tangent; the normal tangents are
    drawn eagerly (inductor's in-graph random numbers are counter-based but far slower on a CPU), and
    g = (1/k) sum_i <grad f, v_i> v_i is formed eagerly too.
    ``compiled_fg``: ``estimate_module_grads`` with a dense normal :class:`ForwardGradient` under ``torch.compile``:
    dynamo breaks the graph at the estimator's generators and thread pool and compiles the pieces between (same
    numbers as eager).
    """
    if v.name == "compiled_fg":
        est = ForwardGradient(v.k, seed=0)
        return torch.compile(lambda: estimate_module_grads(est, model, lambda out: per_example_cross_entropy(out, y), x))
    if v.name == "compiled_backprop":
        forward = torch.compile(model)

        def backprop_step() -> None:
            cross_entropy(forward(x), y).backward()
        return backprop_step
    params = {n: p.detach() for n, p in model.named_parameters()}
    gen = torch.Generator(device=x.device).manual_seed(0)
    loss_fn = _functional_loss(model, x, y)
    jvp = torch.compile(lambda p, t: torch.func.jvp(loss_fn, (p,), (t,)))

    def jvp_step() -> None:
        grads = {n: torch.zeros_like(p) for n, p in params.items()} if v.k > 1 else {}
        for _ in range(v.k):
            tangent = _normal_tangent(params, gen)
            _, d = jvp(params, tangent)
            for n, t in tangent.items():
                if v.k == 1:
                    grads[n] = t.mul_(d)
                else:
                    grads[n].add_(t.mul_(d / v.k))
        for n, p in model.named_parameters():
            p.grad = grads[n]
    return jvp_step


def _peer_step(v: Variant, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    """A whole training step (estimate and SGD update) of one of the :data:`PEERS`."""
    if v.name == "sgd":
        est = ForwardGradient(v.k, distribution=v.distribution, seed=0)
        opt = torch.optim.SGD(model.parameters(), lr=PEER_LR)

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            estimate_module_grads(est, model, lambda out: per_example_cross_entropy(out, y), x)
            opt.step()
        return step
    if v.name == "torchzero":
        try:
            import torchzero as tz
        except ImportError:
            raise BenchError("the torchzero peer rows need torchzero (pip install torchzero, in the dev extra); "
                             "or leave them out with --peer-ks ''.") from None
        tz_opt = tz.Optimizer(model.parameters(), tz.m.ForwardGradient(n_samples=v.k, seed=0), tz.m.LR(PEER_LR))

        def closure(backward: bool = True) -> torch.Tensor:
            loss = cross_entropy(model(x), y)
            if backward:
                tz_opt.zero_grad()
                loss.backward()
            return loss

        return lambda: tz_opt.step(closure)
    gen = torch.Generator(device=x.device).manual_seed(0)
    loss_fn = _functional_loss(model, x, y)

    def jvp_loop() -> None:  # g = (1/k) sum_i <grad f, v_i> v_i, one jvp per tangent, then p -= lr g
        params = {n: p.detach() for n, p in model.named_parameters()}
        grad = {n: torch.zeros_like(p) for n, p in params.items()}
        for _ in range(v.k):
            tangent = _normal_tangent(params, gen)
            _, d = torch.func.jvp(loss_fn, (params,), (tangent,))
            for n in grad:
                grad[n].add_(tangent[n] * d / v.k)
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.sub_(grad[n], alpha=PEER_LR)

    return jvp_loop


def make_step(v: Variant, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    """The callable timed for ``v``, with its own new estimator (its first call allocates its buffers)."""

    def loss_of(out: torch.Tensor) -> torch.Tensor:
        return per_example_cross_entropy(out, y)  # what the training loop passes (its mean is the loss)

    if v.name in PEERS:
        return _peer_step(v, model, x, y)
    if v.name.startswith("compiled_"):
        def compiled_step(inner: Callable[[], None] = _compiled_step(v, model, x, y)) -> None:
            model.zero_grad(set_to_none=True)
            inner()
        return compiled_step

    if v.name == "forward":
        def step() -> None:
            with torch.no_grad():
                cross_entropy(model(x), y)
        return step
    est = make_estimator(v)

    def step() -> None:
        model.zero_grad(set_to_none=True)
        estimate_module_grads(est, model, loss_of, x)

    return step


def make_estimator(v: Variant) -> GradientEstimator:
    """A new estimator for the variant's row."""
    if v.name == "backprop":
        return Backprop()
    if v.name == "fga":
        return ForwardActivity(v.k, "mean", v.distribution, seed=0)
    if v.name == "guess":
        return LocalGuess()
    if v.name == "zo":
        return ZerothOrder(v.k, distribution=v.distribution, seed=0)
    return ForwardGradient(v.k, v.aggregation, v.distribution, seed=0, backend=v.backend,
                           regenerate_tangents=v.regenerate)


# -- the deep-MLP memory check and the training-loop row ------------------------------------------------------
DEEP_VARIANTS = (Variant("backprop"), Variant("fg", "normal", 1, "auto"), Variant("fg", "normal", 1, "auto", regenerate=False),
                 Variant("fg", "normal", 1, "auto", regenerate=True), Variant("fg", "rank1", 1, "auto"),
                 Variant("zo", "normal", 1))


#: The deep table's extra rows: the no-grad forward pass (the inference baseline) and the zeroth-order passes alone.
DEEP_FORWARD, DEEP_ZO_PASSES = "forward (no grad)", "zo normal k=1: passes only"


def zo_passes_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    """A zeroth-order step without its estimate: the draw (seeds only) and the 3 perturbed no-grad passes,
    everything but building the n-float gradient the step returns."""
    from torch.func import functional_call

    est = ZerothOrder(1, seed=0)
    params = {n: p.detach() for n, p in model.named_parameters()}

    def step() -> None:
        draw = est.draw(params)
        est.directional_derivatives(lambda p: cross_entropy(functional_call(model, p, (x,)), y), params, draw.tangents)

    return step
