"""SNOpt's damping and refresh interval on a CNF bench set: final test NLL per setting.

Runs ``bench cnf``'s SNOpt run (same model, data, seed, minibatches and training wall-clock)
once per ``LR:EPS:UPDATE_FREQ`` setting and prints the last five logged test NLLs (nats).
Compare with Adam's line of the same seed in ``bench cnf``'s lr check.

    python -m torchdyn_snopt.bench.scripts.cnf_damping --dataset circles --budget-s 20 \\
        0.003:0.01:10 0.003:0.2:10 0.01:0.2:10 0.01:0.5:10 0.003:0.05:2
"""

from __future__ import annotations

import argparse

import torchdyn_snopt.bench.cnf as cnf
from torchdyn_snopt.bench.trial import Trial, run_trial


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("settings", nargs="+", help="LR:EPS:UPDATE_FREQ, e.g. 0.003:0.05:10")
    parser.add_argument("--dataset", default="circles", choices=cnf.DATASETS)
    parser.add_argument("--budget-s", type=float, default=20.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    task = cnf.task(args.dataset)
    data = task.load()
    for spec in args.settings:
        lr, eps, freq = spec.split(":")
        options = {"eps": float(eps), "update_freq": int(freq)}
        trial = Trial(task, "snopt", float(lr), args.seed, args.budget_s, snopt_options=options)
        r = run_trial(trial, data)
        nlls = [round(p.test_loss, 3) for p in r.points][-5:]
        print(f"{spec}: {r.iterations} iterations, last test NLLs {nlls}", flush=True)


if __name__ == "__main__":
    main()
