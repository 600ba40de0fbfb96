"""SNOpt's damping and refresh interval on a CNF bench set: final test NLL per setting.

Runs ``bench cnf``'s SNOpt run (same model, data, seed, minibatches and training wall-clock)
once per ``LR:EPS:UPDATE_FREQ`` setting and prints the last five logged test NLLs (nats).
Compare with Adam's line of the same seed in ``bench cnf``'s lr check.

    python benchmarks/cnf_damping.py --dataset circles --budget-s 20 \\
        0.003:0.01:10 0.003:0.2:10 0.01:0.2:10 0.01:0.5:10 0.003:0.05:2
"""

from __future__ import annotations

import argparse

import torch

import torchdyn_snopt.bench.cnf as cnf


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("settings", nargs="+", help="LR:EPS:UPDATE_FREQ, e.g. 0.003:0.05:10")
    parser.add_argument("--dataset", default="circles", choices=cnf.DATASETS)
    parser.add_argument("--budget-s", type=float, default=20.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    data = cnf._density_data(args.dataset, torch.device("cpu"))
    common = {
        "dataset": args.dataset,
        "data": data,
        "budget_s": args.budget_s,
        "device": torch.device("cpu"),
        "batch_size": cnf.BATCH_SIZE[args.dataset],
    }
    defaults = dict(cnf.SNOPT_OPTIONS)
    for spec in args.settings:
        lr, eps, freq = spec.split(":")
        cnf.SNOPT_OPTIONS.update({"eps": float(eps), "update_freq": int(freq)})
        r, _ = cnf.run_one("snopt", float(lr), args.seed, measure=False, **common)
        nlls = [round(p.test_loss, 3) for p in r.points][-5:]
        print(f"{spec}: {r.iterations} iterations, last test NLLs {nlls}", flush=True)
        cnf.SNOPT_OPTIONS.clear()
        cnf.SNOPT_OPTIONS.update(defaults)


if __name__ == "__main__":
    main()
