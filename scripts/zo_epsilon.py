"""The zeroth-order step eps: truncation error against float32 rounding, measured on the MNIST MLP.

    .venv/bin/python scripts/zo_epsilon.py                     # $FWDGRAD_SHARED/data/mnist, 8 tangents (~1 min)
    .venv/bin/python scripts/zo_epsilon.py --root data --tangents 16 --out outputs/zo_epsilon/mine

Along a tangent v, g(t) = f(theta + t v) with f the mean cross-entropy of the MLP 784-1024-1024-10 at its
initialisation (seed 0) on the first 64 training images of the 8k/2k split. The central difference
D(eps) = (g(eps) - g(-eps)) / (2 eps) errs by

    truncation  (eps^2 / 6) |g'''(0)|  (+ O(eps^4))
    rounding    about C / eps, C ~ u |f|: each loss value is rounded at relative precision u (2^-24 in float32),

so for a smooth f the total is smallest at eps* = (3 C / |g'''(0)|)^(1/3). The MLP is ReLU, so g is only
piecewise smooth: a difference over [-eps, eps] that crosses kinks errs by more than the g''' term, in float64
too. The script computes g'(0) and g'''(0) exactly (nested forward-mode AD, float64), ZerothOrder's derivatives
D32 (float32) and D64 (float64, same tangents) for eps from 1e-6 to 1 and reports, as medians over the tangents,
|D32 - g'(0)| (what training sees), |D64 - g'(0)| (truncation and kinks, rounding negligible) and |D32 - D64|
(float32 rounding alone, fitted as C / eps); it writes epsilon.csv and epsilon.md (the table of
docs/zeroth_order.md) into --out (default outputs/zo_epsilon/<timestamp>/).
"""

from __future__ import annotations

import argparse
import csv
import logging
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from fwdgrad.app.process import prepare_process  # noqa: E402

prepare_process()  # first: the experiments extra, then opt-in process settings (before torch loads)

import torch  # noqa: E402
from torch.func import functional_call, jvp  # noqa: E402

from fwdgrad import ZerothOrder  # noqa: E402
from fwdgrad.app.cli import run_cli  # noqa: E402
from fwdgrad.experiments.data import mnist  # noqa: E402
from fwdgrad.nn.functional import cross_entropy  # noqa: E402
from fwdgrad.nn.models import MLP  # noqa: E402

log = logging.getLogger("zo_epsilon")
EPSILONS = [10.0**e for e in (-6, -5.5, -5, -4.5, -4, -3.5, -3, -2.5, -2, -1.5, -1, -0.5, 0)]
U32 = 2.0**-24


def third_derivatives(loss_fn, params: Dict[str, torch.Tensor], v: Dict[str, torch.Tensor]) -> tuple[float, float]:
    """``(g'(0), g'''(0))`` of ``g(t) = loss_fn(params + t v)`` by nested forward-mode AD (float64)."""
    one = torch.ones((), dtype=torch.float64)

    def g(t):
        return loss_fn({n: params[n] + t * v[n] for n in params})

    def dg(t):
        return jvp(g, (t,), (one,))[1]

    def d2g(t):
        return jvp(dg, (t,), (one,))[1]

    t0 = torch.zeros((), dtype=torch.float64)
    return float(dg(t0)), float(jvp(d2g, (t0,), (one,))[1])


def measure(root: str, tangents: int) -> tuple[List[Dict[str, float]], Dict[str, float]]:
    splits = mnist(root=root, test_set_split=2000, download=False, batch_size=64)
    x, y = splits.train_x[:64], splits.train_y[:64]
    torch.manual_seed(0)
    model = MLP(splits.input_shape, splits.num_classes)
    p32 = {n: p.detach() for n, p in model.named_parameters()}
    p64 = {n: t.double() for n, t in p32.items()}

    def loss_fn(p):
        xx = x.to(next(iter(p.values())).dtype)
        return cross_entropy(functional_call(model, p, (xx,)), y)

    draw = ZerothOrder(tangents, seed=0).draw(p32)
    dense32 = draw.dense()
    dense64 = {n: t.double() for n, t in dense32.items()}
    exact = [third_derivatives(loss_fn, p64, {n: t[i] for n, t in dense64.items()}) for i in range(tangents)]
    f = float(loss_fn(p64))
    rows = []
    for eps in EPSILONS:
        d32 = ZerothOrder(tangents, eps, exact_loss=False).directional_derivatives(loss_fn, p32, draw.tangents)[1]
        d64 = ZerothOrder(tangents, eps, exact_loss=False).directional_derivatives(loss_fn, p64, dense64)[1]
        rows.append({"eps": eps,
                     "err32": statistics.median(abs(float(d32[i]) - exact[i][0]) for i in range(tangents)),
                     "err64": statistics.median(abs(float(d64[i]) - exact[i][0]) for i in range(tangents)),
                     "round32": statistics.median(abs(float(d32[i]) - float(d64[i])) for i in range(tangents)),
                     "truncation": eps**2 / 6 * statistics.median(abs(g3) for _, g3 in exact)})
        log.info("eps %.1e: float32 error %.3e, float64 error %.3e", eps, rows[-1]["err32"], rows[-1]["err64"])
    summary = {"f": f, "median_abs_g1": statistics.median(abs(g1) for g1, _ in exact),
               "median_abs_g3": statistics.median(abs(g3) for _, g3 in exact), "tangents": tangents}
    return rows, summary


def fit(rows: List[Dict[str, float]], summary: Dict[str, float]) -> Dict[str, float]:
    """C from the float32 rounding |D32 - D64| ~ C / eps (median over eps), eps* and the measured best."""
    c = statistics.median(r["round32"] * r["eps"] for r in rows)
    g3 = summary["median_abs_g3"]
    best = min(rows, key=lambda r: r["err32"])
    return {"C": c, "C_over_u_f": c / (U32 * summary["f"]), "eps_star": (3 * c / g3) ** (1 / 3),
            "eps_star_u_f": (3 * U32 * summary["f"] / g3) ** (1 / 3), "best_eps": best["eps"],
            "best_err32": best["err32"]}


def write(out: Path, rows: List[Dict[str, float]], summary: Dict[str, float], fitted: Dict[str, float]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "epsilon.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]) + ["rounding_fit"])
        w.writeheader()
        w.writerows({**r, "rounding_fit": fitted["C"] / r["eps"]} for r in rows)
    md = [f"f = {summary['f']:.4f}, median |g'(0)| = {summary['median_abs_g1']:.4g}, median |g'''(0)| = "
          f"{summary['median_abs_g3']:.4g} over {summary['tangents']} normal tangents.", "",
          "| eps | error float32 | error float64 | (eps^2/6) abs(g''') | float32 - float64 | C / eps (fit) |",
          "|---:|---:|---:|---:|---:|---:|"]
    md += [f"| {r['eps']:.1e} | {r['err32']:.2e} | {r['err64']:.2e} | {r['truncation']:.2e} | {r['round32']:.2e} | "
           f"{fitted['C'] / r['eps']:.2e} |" for r in rows]
    md += ["", f"C = {fitted['C']:.3e} = {fitted['C_over_u_f']:.2f} u |f|; eps* = (3 C / |g'''|)^(1/3) = "
           f"{fitted['eps_star']:.2e} (with C = u |f|: {fitted['eps_star_u_f']:.2e}); smallest measured float32 "
           f"error {fitted['best_err32']:.2e} at eps = {fitted['best_eps']:.1e}."]
    (out / "epsilon.md").write_text("\n".join(md) + "\n")


def main(argv: Optional[Sequence[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    shared = Path(os.environ.get("FWDGRAD_SHARED", ROOT.parent / "shared"))
    p.add_argument("--root", default=str(shared / "data" / "mnist"),
                   help="MNIST root holding MNIST/raw/ (default $FWDGRAD_SHARED/data/mnist, else ../shared/data/mnist)")
    p.add_argument("--tangents", type=int, default=8)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    def task() -> int:
        out = Path(args.out) if args.out else ROOT / "outputs" / "zo_epsilon" / time.strftime("%Y%m%d-%H%M%S")
        rows, summary = measure(args.root, args.tangents)
        fitted = fit(rows, summary)
        write(out, rows, summary, fitted)
        log.info("\n%s", (out / "epsilon.md").read_text())
        return 0

    return run_cli("zo_epsilon.py", task)


if __name__ == "__main__":
    sys.exit(main())
