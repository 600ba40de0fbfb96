"""Where an iteration's time goes: forward, backward and optimizer step, Adam vs SNOpt.

Both optimizers train the image bench's model of ``--dataset`` from the same weights on the
same minibatches; after ``--skip`` warm-up iterations the three phases are timed per
iteration, and SNOpt's armed iterations (curvature sampled, eigenbases refreshed) are also
reported on their own. Run it single-threaded to compare with the bench's tables:

    OMP_NUM_THREADS=1 python -m torchdyn_snopt.bench.scripts.iteration_phases \\
        [--dataset mnist] [--iters 200]
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch
import torch.nn.functional as F

from torchdyn_snopt import read_nfe
from torchdyn_snopt.bench.image import DEFAULT_LRS, build_model, build_optimizer
from torchdyn_snopt.data import IMAGE_DATASETS, load_image_dataset

OPTS = ("adam", "snopt")


def phases(dataset: str, name: str, iters: int, skip: int, batch: int) -> dict[str, float]:
    """Mean ms per phase over iterations ``skip..iters`` (and over SNOpt's armed ones)."""
    x_train, y_train, _, _ = load_image_dataset(dataset)
    torch.manual_seed(0)
    model = build_model(dataset, tuple(x_train.shape), "snopt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = build_optimizer(name, model, DEFAULT_LRS[dataset][name])
    pre = getattr(opt, "preconditioner", None)
    g = torch.Generator().manual_seed(0)
    plain: list[tuple[float, float, float]] = []
    armed: list[tuple[float, float, float]] = []
    nfe = [0, 0]
    for it in range(iters):
        idx = torch.randint(0, len(x_train), (batch,), generator=g)
        is_armed = pre is not None and pre.armed
        t0 = time.perf_counter()
        opt.zero_grad()
        loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        opt.step()
        t3 = time.perf_counter()
        n = read_nfe(model)
        if it >= skip:
            plain.append((t1 - t0, t2 - t1, t3 - t2))
            nfe[0] += n.get("forward", 0)
            nfe[1] += n.get("backward", 0)
            if is_armed:
                armed.append(plain[-1])

    def ms(rows: list, i: int) -> float:
        return 1e3 * statistics.mean(r[i] for r in rows) if rows else float("nan")

    k = len(plain)
    names = ("forward", "backward", "step")
    out = {f"{p}_ms": ms(plain, i) for i, p in enumerate(names)}
    out["total_ms"] = sum(out.values())
    out.update({f"armed_{p}_ms": ms(armed, i) for i, p in enumerate(names)})
    out["nfe_forward"], out["nfe_backward"] = nfe[0] / k, nfe[1] / k
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dataset", default="mnist", choices=IMAGE_DATASETS)
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--skip", type=int, default=20)
    ap.add_argument("--batch", type=int, default=128)
    args = ap.parse_args()
    if not 0 <= args.skip < args.iters:
        ap.error(f"--skip={args.skip} must be in [0, --iters={args.iters})")
    rows = {n: phases(args.dataset, n, args.iters, args.skip, args.batch) for n in OPTS}
    span = f"iterations {args.skip}-{args.iters}"
    print(f"{args.dataset}, batch {args.batch}, ms per iteration ({span})")
    print(f"{'':6s} {'forward':>8s} {'backward':>8s} {'step':>8s} {'total':>8s}  NFE fwd/bwd")
    for n, r in rows.items():
        print(
            f"{n:6s} {r['forward_ms']:8.1f} {r['backward_ms']:8.1f} {r['step_ms']:8.1f} "
            f"{r['total_ms']:8.1f}  {r['nfe_forward']:.1f}/{r['nfe_backward']:.1f}"
        )
    s = rows["snopt"]
    print(
        f"snopt armed iterations: forward {s['armed_forward_ms']:.1f}, backward "
        f"{s['armed_backward_ms']:.1f}, step {s['armed_step_ms']:.1f} ms"
    )
    print(f"snopt / adam total: {s['total_ms'] / rows['adam']['total_ms']:.2f}x")


if __name__ == "__main__":
    main()
