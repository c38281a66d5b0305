"""The benchmark (``make bench``): time per training step of forward gradients against backprop, measured side by side.

    make bench                                     # = .venv/bin/python -m fwdgrad.perf.bench (every model below)
    python -m fwdgrad.perf.bench --models mlp,convnet             # the MLP and conv net (6-9 min, 2 cores)
    python -m fwdgrad.perf.bench --models lenet5,resnet18,vit,mlp_mixer --device cuda   # Section 4.5 models
    python -m fwdgrad.perf.bench --models mlp --batches 1024 --ks 1,16 --repeats 9
    python -m fwdgrad.perf.bench --quick      # tiny models: checks the pipeline in seconds
    python -m fwdgrad.perf.bench --threads 1 --clock thread --models mlp --batches 64,1024 --ks 1,16

The targets (MLP 784-1024-1024-10) must hold at torch's default thread count (all cores) and at one thread:
after the main table, the targets' MLP rows run again at each ``--target-threads`` count (default ``1``; a
count equal to the main run's is skipped), and ``bench.md`` checks every target at every thread count.

Models: the MLP (784-1024-1024-10) and conv net at batches ``--batches`` with every tangent distribution, and
the multi-tangent paper's Section 4.5 models in frog's sizes (LeNet-5, ResNet-18 CIFAR variant, ViT 6x256,
MLP-Mixer 8x512; 1x28x28 inputs) at ``--frog-batches`` with dense normal tangents: k = 1, 4, 16 on the fast
engine (all k tangents in one batched pass, no loop over k) and the torch.func reference at k = 1. On the CPU
the Section 4.5 rows take long (ResNet-18 and MLP-Mixer at k = 16 most); a GPU runs them in minutes.

What is timed: one *gradient step*, ``estimate_module_grads(estimator, model, cross_entropy, x)``, i.e. the loss,
the gradient (exact or estimated: tangent drawing, forward-mode pass, aggregation) and writing ``p.grad``; the
optimizer update after it is the same for every variant and is left out. The baseline is one forward pass of
the loss under ``torch.no_grad()``. Reported per configuration, as in the paper:

    R_f = step / forward   (R_b for the backprop row)        fg/bp = step / backprop step

The zeroth-order rows (``zo``, MLP only; ``--zo-ks``) are ZerothOrder with central differences and the exact loss,
i.e. 2k + 1 no-grad forward passes per step; the full table's last column says what every step runs.
``--compiled-ks`` (MLP only, none by default: compiling takes minutes) adds ``torch.compile`` rows: a compiled
backprop step, a compiled ``torch.func.jvp`` step per k and fwdgrad's step under ``torch.compile``; ``bench.md``
gives each compiled forward gradient against compiled backprop, not against eager.
Rows: forward, backprop, weight-perturbed forward gradients (``fg``) per distribution and k, activity perturbation
(``fga``, FG-A) and, on the same network with auxiliary heads, local losses (prefix ``local``: LG-BP, LG-FG-W,
LG-FG-A) and local-gradient guesses (``local guess``); every ``fg/bp`` is against the plain network's backprop.

Method: for each (model, batch size) every configuration first runs two steps with a fresh estimator, as
warm-up and to measure its peak memory; then rounds visit all configurations in a shuffled order
(interleaved, so a slow phase of a shared machine hits every configuration alike), each sample timing
``inner`` back-to-back steps (enough for about ``--min-sample-ms``); the table shows medians over the rounds.
Everything runs in one process.

Peak memory (:mod:`fwdgrad.perf.memory`), over those first two steps of a fresh estimator (so buffers it keeps
between steps count, and the second step runs with what the first measured), above the memory before them:
``peak MiB`` is tensor memory (CUDA ``max_memory_allocated``; on the CPU the same, rebuilt from the
profiler's allocation events: exact and repeatable), ``RSS MiB`` the growth of the resident set over two
more steps of another fresh estimator, without the profiler (Linux ``VmHWM`` reset through
``/proc/self/clear_refs``; includes allocator caching and fragmentation, so noisier).

Outputs (``--out``, default ``outputs/bench/<timestamp>/``): ``bench.md`` (machine, table, targets, deep-MLP
memory check), ``bench.csv`` (every number, with spread), ``machine.json``.

Modules: :mod:`~fwdgrad.perf.bench.workloads` (the rows and the step each runs), :mod:`~fwdgrad.perf.bench.timing`
(interleaved timing and peak memory), :mod:`~fwdgrad.perf.bench.studies` (the side studies),
:mod:`~fwdgrad.perf.bench.report` (the files) and :mod:`~fwdgrad.perf.bench.runner` (the command line).
"""

from fwdgrad.perf.bench.report import TARGETS, markdown_table, summary_table, targets_report, write_outputs
from fwdgrad.perf.bench.runner import int_list, main, parse_args, run, target_runs
from fwdgrad.perf.bench.timing import Result, bench_group, time_group
from fwdgrad.perf.bench.workloads import (
    Variant,
    build_model,
    compiled_variants,
    make_estimator,
    make_step,
    passes,
    variants,
)

__all__ = ["Result", "TARGETS", "Variant", "bench_group", "build_model", "compiled_variants", "int_list", "main", "make_estimator",
           "make_step", "markdown_table", "parse_args", "passes", "run", "summary_table", "target_runs",
           "targets_report", "time_group", "variants", "write_outputs"]
