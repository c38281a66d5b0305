"""The models of the multi-tangent paper's Section 4.5 (LeNet-5, ResNet-18, ViT, MLP-Mixer).

* Architecture: ResNet-18 and the ViT against torchvision's own networks (the same weights give the same
  outputs), parameter counts from the layer formulas.
* Forward mode: their directional derivatives on the fast engine equal ``torch.func.jvp``'s and backprop's
  ``<grad f, v>`` (float64, k = 1 and k > 1, dense and rank-one tangents, training and eval mode).
* Training: on 28x28 images (MNIST and Fashion-MNIST: the real test sets when present, else generated IDX files)
  every model runs with both scripts' configs and with every estimator of ``configs/gradient/``; each learns on a
  fixed batch with each estimator; batch norm's statistics move once per step. (The scripts themselves are thin
  wrappers over ``train``, run as subprocesses in tests/test_mnist_scripts.py and tests/test_entry_points.py.)
* Batching: a pass runs the same ops for 2 and for 8 tangents.
Tiny widths come from config overrides and every test runs on one thread, so each takes well under a second.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path
from typing import Dict, List

import numpy as np
import pytest
import torch
import torchvision
from hydra.utils import instantiate
from torch import Tensor, nn
from torch.func import functional_call
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import SHARED_MNIST
from fwdgrad import Backprop, ForwardGradient, estimate_module_grads
from fwdgrad.engine import forward_tangents
from fwdgrad.errors import ConfigError
from fwdgrad.nn.functional import cross_entropy
from fwdgrad.nn.models import LeNet5, MLPMixer, ResNet, VisionTransformer
from fwdgrad.experiments.training import train
from mnist_helpers import CONFIGS, compose_cfg, write_idx

DT = torch.float64
#: config overrides that shrink each model (same architecture, tiny widths)
TINY_MODELS: Dict[str, List[str]] = {
    "lenet5": [],
    "resnet18": ["model.width=4", "model.blocks=[1,1]"],
    "vit": ["model.num_layers=1", "model.num_heads=2", "model.hidden_dim=16", "model.mlp_dim=16"],
    "mlp_mixer": ["model.hidden_dim=16", "model.token_mlp_dim=8", "model.channel_mlp_dim=16", "model.num_blocks=1"],
}
MODELS = list(TINY_MODELS)
FASHION_PACKAGE = Path("/usr/share/datasets/fashion-mnist")  # Debian's dataset-fashion-mnist, when installed
pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny(name: str, shape=(1, 28, 28), dtype=torch.float32) -> nn.Module:
    cfg = compose_cfg("mnist_fwdgrad", [f"model={name}", *TINY_MODELS[name]])
    torch.manual_seed(0)
    return instantiate(cfg.model, input_shape=list(shape), num_classes=10, _convert_="all").to(dtype)


# -- architecture -----------------------------------------------------------------------------------------------
def _load_by_order(dst: nn.Module, src: nn.Module) -> None:
    """Copy ``src``'s state into ``dst`` entry by entry (the two register their tensors in the same order)."""
    a, b = dst.state_dict(), src.state_dict()
    assert [v.shape for v in a.values()] == [v.shape for v in b.values()]
    dst.load_state_dict(dict(zip(a.keys(), b.values())))


@pytest.mark.parametrize("training", [True, False])
def test_resnet18_is_torchvisions_with_the_cifar_stem(training):
    torch.manual_seed(0)
    ref = torchvision.models.resnet18(num_classes=10)
    ref.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)  # the CIFAR variant: 3x3 stride-1 stem, no max-pool
    ref.maxpool = nn.Identity()
    ours = ResNet((3, 32, 32), 10)
    assert sum(p.numel() for p in ours.parameters()) == 11_173_962  # the CIFAR ResNet-18's published size
    _load_by_order(ours, ref)
    ours.train(training)
    ref.train(training)
    x = torch.randn(4, 3, 32, 32)
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-4, atol=1e-5)
    if training:  # the running statistics moved alike
        torch.testing.assert_close(ours.stem[1].running_var, ref.bn1.running_var)


def test_vit_is_torchvisions_with_attention_written_out():
    torch.manual_seed(0)
    ref = torchvision.models.VisionTransformer(image_size=32, patch_size=4, num_layers=6, num_heads=4, hidden_dim=256,
                                               mlp_dim=512, num_classes=10)
    ours = VisionTransformer((3, 32, 32), 10)
    # conv 3*256*16 + 256, class token, 65 x 256 positions, 6 layers of (2 LayerNorms, in/out projections, MLP),
    # final LayerNorm, head
    layer = 2 * 512 + (256 * 768 + 768) + (256 * 256 + 256) + (256 * 512 + 512) + (512 * 256 + 256)
    assert sum(p.numel() for p in ours.parameters()) == 12_544 + 256 + 65 * 256 + 6 * layer + 512 + 2_570 == 3_195_146
    # the same tensors under torchvision's names
    renames = [(r"^patch_embedding\.proj", "conv_proj"), (r"^pos_embedding", "encoder.pos_embedding"),
               (r"^layers\.(\d+)\.", r"encoder.layers.encoder_layer_\1."),
               (r"attention\.in_proj\.(weight|bias)", r"self_attention.in_proj_\1"),
               (r"attention\.out_proj", "self_attention.out_proj"), (r"mlp\.net\.", "mlp."),
               (r"^norm\.", "encoder.ln."), (r"^head\.", "heads.head.")]
    src, mapped = ref.state_dict(), {}
    for key in ours.state_dict():
        theirs = key
        for pattern, repl in renames:
            theirs = re.sub(pattern, repl, theirs)
        mapped[key] = src[theirs]
    assert len(mapped) == len(src)
    ours.load_state_dict(mapped)
    with torch.no_grad():  # a non-zero head, so that the comparison sees the whole network
        ours.head.weight.normal_()
        ref.heads.head.weight.copy_(ours.head.weight)
    ours.eval()
    ref.eval()
    x = torch.randn(3, 3, 32, 32)
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-4, atol=1e-5)


def test_lenet5_and_mixer_sizes_follow_their_layers():
    # LeNet-5 on 28x28: conv 1*6*25+6, BN 2*6, conv 6*16*25+16, BN 2*16, 256*120+120, 120*84+84, 84*10+10
    assert sum(p.numel() for p in LeNet5((1, 28, 28), 10).parameters()) == 156 + 12 + 2416 + 32 + 30840 + 10164 + 850
    # on 32x32 the features are 16*5*5 = 400 (the 1998 LeNet-5's)
    assert LeNet5((3, 32, 32), 10, batch_norm=False).classifier[0].in_features == 400
    # MLP-Mixer on 3x32x32: 64 patches of 48 values -> 512; per layer 2 LayerNorms, token MLP 64-256-64,
    # channel MLP 512-2048-512; LayerNorm and head
    layer = 2 * 1024 + (64 * 256 + 256 + 256 * 64 + 64) + (512 * 2048 + 2048 + 2048 * 512 + 512)
    total = 48 * 512 + 512 + 8 * layer + 1024 + 5130
    assert sum(p.numel() for p in MLPMixer((3, 32, 32), 10).parameters()) == total


# -- forward mode: directional derivatives ------------------------------------------------------------------------
def _loss_fn(model: nn.Module, x: Tensor, y: Tensor):
    def loss_fn(p: Dict[str, Tensor]) -> Tensor:
        buffers = {n: b.clone() for n, b in model.named_buffers()}  # as estimate_module_grads does
        return cross_entropy(functional_call(model, (p, buffers), (x,)), y)

    return loss_fn


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("k", [1, 4])
@pytest.mark.parametrize("dist", ["normal", "rank1"])
@pytest.mark.parametrize("training", [True, False])
def test_directional_derivatives_match_torch_func_and_backprop(name, k, dist, training):
    model = _tiny(name, (1, 16, 16), DT).train(training)  # 16x16: LeNet-5's smallest input, cheap for the rest
    if name == "vit":  # torchvision's zero head would leave every other directional derivative 0
        nn.init.normal_(model.head.weight)
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(5, 1, 16, 16, generator=g, dtype=DT), torch.randint(0, 10, (5,), generator=g)
    params = {n: p.detach() for n, p in model.named_parameters()}
    loss_fn = _loss_fn(model, x, y)
    fast = ForwardGradient(k, distribution=dist, seed=1, backend="fast")
    draw = fast.draw(params)
    loss_f, d_f = fast.directional_derivatives(loss_fn, params, draw.tangents)
    loss_r, d_r = ForwardGradient(k, distribution=dist, backend="func").directional_derivatives(
        loss_fn, params, draw.tangents)
    _, grads = Backprop()(loss_fn, params)
    d_b = torch.stack([sum((grads[n] * v[i]).sum() for n, v in draw.dense().items()) for i in range(k)])
    torch.testing.assert_close(loss_f, loss_r, rtol=1e-12, atol=0)
    torch.testing.assert_close(d_f, d_r, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(d_f, d_b, rtol=1e-9, atol=1e-12)


# -- training ---------------------------------------------------------------------------------------------------
def _idx_images(root: Path, folder: str, n: int, seed: int) -> Path:
    """A generated MNIST-format test set (t10k files) under ``root/folder/raw``: each class a fixed random
    28x28 template plus noise, so a network can learn it."""
    rng = np.random.default_rng(seed)
    templates = rng.integers(0, 256, size=(10, 28, 28))
    labels = np.arange(n) % 10
    images = np.clip(templates[labels] + rng.normal(0, 40, size=(n, 28, 28)), 0, 255)
    write_idx(root / folder / "raw" / "t10k-images-idx3-ubyte", images)
    write_idx(root / folder / "raw" / "t10k-labels-idx1-ubyte", labels)
    return root


@pytest.fixture(scope="module")
def data28(tmp_path_factory) -> Dict[str, Path]:
    """dataset name -> a root with its official test set (real when present, else generated)."""
    made = tmp_path_factory.mktemp("data28")
    roots = {}
    real_mnist = SHARED_MNIST / "MNIST" / "raw" / "t10k-images-idx3-ubyte.gz"
    roots["mnist"] = SHARED_MNIST if real_mnist.is_file() else _idx_images(made / "mnist", "MNIST", 300, 0)
    if (FASHION_PACKAGE / "t10k-images-idx3-ubyte.gz").is_file():
        raw = made / "fashion" / "FashionMNIST" / "raw"
        raw.mkdir(parents=True)
        for f in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
            (raw / f).symlink_to(FASHION_PACKAGE / f)
        roots["fashion_mnist"] = made / "fashion"
    else:
        roots["fashion_mnist"] = _idx_images(made / "fashion", "FashionMNIST", 300, 1)
    return roots


def _run(script: str, dataset: str, root: Path, model: str, extra: List[str], out: Path,
         monkeypatch: pytest.MonkeyPatch) -> dict:
    """Train ``model`` for two steps through ``train`` with ``script``'s composed config (what the script runs)."""
    # the run's figure is the plotting tests' business, and drawing it would cost more than the two steps
    monkeypatch.setattr(importlib.import_module("fwdgrad.experiments.training.run"), "_plot", lambda *args, **kwargs: None)
    cfg = compose_cfg(script, [f"dataset={dataset}", f"dataset.root={root}", "dataset.test_set_split=100",
                               "dataset.limit_train=64", "dataset.limit_test=32", "dataset.batch_size=32",
                               "optimization.epochs=1", "optimization.learning_rate=1e-3", "log_every=2",
                               "progress_bar=false", "plot_misclassified=0", "threads=1", f"model={model}",
                               *TINY_MODELS[model], *extra])
    torch.manual_seed(cfg.seed)
    init = instantiate(cfg.model, input_shape=[1, 28, 28], num_classes=10, _convert_="all").state_dict()
    m = train(cfg, out)
    assert m["stopped"] == "completed" and m["steps"] == 2 and m["dataset_info"]["input_shape"] == [1, 28, 28]
    assert np.isfinite(m["final_train_loss"]) and 0.0 <= m["final_test_accuracy"] <= 1.0
    final = torch.load(out / "model.pt", weights_only=False)["state_dict"]
    assert any(not torch.equal(final[k], init[k]) for k in init if k.endswith("weight"))  # it stepped
    for key, value in final.items():  # batch norm moved once per step (the accuracy pass did not count)
        if key.endswith("num_batches_tracked"):
            assert int(value) == 2, key
    return m


@pytest.mark.parametrize("dataset", ["mnist", "fashion_mnist"])
@pytest.mark.parametrize("script", ["mnist_fwdgrad", "mnist_backprop"])
@pytest.mark.parametrize("model", MODELS)
def test_every_model_runs_on_28x28_with_both_scripts(model, script, dataset, data28, tmp_path, monkeypatch):
    m = _run(script, dataset, data28[dataset], model, [], tmp_path, monkeypatch)
    assert m["estimator"]["estimator"] == ("ForwardGradient" if script == "mnist_fwdgrad" else "Backprop")
    assert "backend" not in m["estimator"]  # no fallback: the fast engine has a rule for every op


#: every estimator config, and the forward gradient with several tangents (the scripts' defaults run above)
ESTIMATORS = [(p.stem, []) for p in sorted((CONFIGS / "gradient").glob("*.yaml"))
              if p.stem not in ("forward", "backprop")] + [("forward", ["gradient.num_tangents=4"])]


#: estimators that need a model structure these models do not have, and say so before anything runs: activity
#: perturbation estimates nn.Linear/nn.Conv2d parameters only (these models also have norm layers, tokens, ...),
#: and local-gradient guesses need the auxiliary heads of model.local_losses (the MLP and conv net have them)
NEEDS_STRUCTURE = {
    # (models with batch norm: the batch coupling is found first, by the probe pass)
    "forward_activity": "activity perturbation (estimates the parameters of nn.Linear and nn.Conv2d layers|"
                        "cannot estimate this model exactly: batch_norm computes a statistic over the examples)",
    "forward_guess": "needs guesses from local losses: set model.local_losses=true",
}


@pytest.mark.parametrize("gradient,extra", ESTIMATORS, ids=[f"{g}{'_k4' if e else ''}" for g, e in ESTIMATORS])
@pytest.mark.parametrize("model", MODELS)
def test_every_model_trains_with_every_estimator(model, gradient, extra, data28, tmp_path, monkeypatch):
    overrides = [f"gradient={gradient}", *extra]
    if gradient in NEEDS_STRUCTURE:
        with pytest.raises(ConfigError, match=NEEDS_STRUCTURE[gradient]):
            _run("mnist_fwdgrad", "mnist", data28["mnist"], model, overrides, tmp_path, monkeypatch)
        return
    _run("mnist_fwdgrad", "mnist", data28["mnist"], model, overrides, tmp_path, monkeypatch)


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("est", ["backprop", "forward_k1", "forward_k4"])
def test_every_model_learns_a_fixed_batch_with_each_estimator(model, est):
    # 12 SGD steps on one batch of 20 generated 16x16 images; the loss must fall. The forward gradient's step is
    # an unbiased but noisy step (variance ~ n/k |grad f|^2 for n parameters), so its learning rate is smaller.
    net = _tiny(model, (1, 16, 16))
    if model == "vit":
        nn.init.normal_(net.head.weight, std=0.1)
    g = torch.Generator().manual_seed(0)
    y = torch.arange(20) % 10
    x = torch.randn(10, 1, 16, 16, generator=g)[y] + 0.5 * torch.randn(20, 1, 16, 16, generator=g)
    estimator = Backprop() if est == "backprop" else ForwardGradient(int(est[-1]), seed=0)
    opt = torch.optim.SGD(net.parameters(), lr=0.05 if est == "backprop" else 2e-3)
    net.train()
    losses = []
    for _ in range(12):
        opt.zero_grad()
        losses.append(float(estimate_module_grads(estimator, net, lambda o: cross_entropy(o, y), x)))
        opt.step()
    assert all(np.isfinite(losses)) and np.mean(losses[-4:]) < np.mean(losses[:4]), losses


# -- the k tangents stay batched ---------------------------------------------------------------------------------
class _CountOps(TorchDispatchMode):
    """Counts the aten ops that run (below the engine's rules)."""

    def __init__(self) -> None:
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("name", MODELS)
def test_a_pass_runs_the_same_ops_for_2_and_for_8_tangents(name):
    # a Python loop over the k tangents anywhere in the pass would run k times as many ops
    model = _tiny(name, (1, 16, 16)).train()
    x, y = torch.randn(4, 1, 16, 16), torch.arange(4)
    params = {n: p.detach() for n, p in model.named_parameters()}
    loss_fn = _loss_fn(model, x, y)
    counts = {}
    for k in (2, 8):
        tangents = {n: torch.randn(k, *p.shape) for n, p in params.items()}
        with _CountOps() as ops:
            forward_tangents(loss_fn, params, tangents, k)
        counts[k] = ops.n
    assert counts[2] == counts[8] > 0
