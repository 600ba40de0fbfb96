"""``torchdyn-snopt bench refresh-cost``: what a curvature refresh costs as layers widen.

Seconds per training iteration of one Neural ODE (dopri5, tolerances 1e-3 forward and
backward, ``t`` from 0 to 1, squared error to a fixed random target), one intra-op thread:

- MLP fields ``32 → w → 32`` (Linear, tanh, Linear), batch 256, for each width ``w``;
- conv fields on ``c``-channel 8×8 states (3×3 conv ``c → c``, tanh, 3×3 conv ``c → c``,
  padding 1), batch 16, for each channel count ``c``.

Variants, all from the same initial weights and batch: ``adam`` (torchdyn's
``sensitivity="adjoint"`` and Adam), ``not_armed`` / ``not_armed_power`` (SNOpt between
refreshes, with the complete bases of ``refresh="exact"`` / the thin bases ``"power"`` keeps
for factors wider than ``EXACT_UP_TO``), ``armed_exact`` / ``armed_power`` (SNOpt refreshing at
every step, ``update_freq=1``), and ``amortized_exact = ((u − 1)·not_armed + armed_exact) / u``,
``amortized_power = ((u − 1)·not_armed_power + armed_power) / u`` at SNOpt's default
``update_freq`` ``u``. Each is also given as a ratio to Adam. Per row
and refresh: the decomposition alone (``refresh_<refresh>_s``, on the factors of the last
refresh) and the memory of the layer factors ``Ā``, ``B̄`` (for ``"power"``: the sketches
``[F Ω, diag F]`` of thin sides) and of the eigenbases ``U_A``, ``U_B`` (``factor_bytes_<refresh>``,
``eigenbasis_bytes_<refresh>``, their sum ``memory_bytes_<refresh>``, bytes).
Timings are wall-clock minima over ``repeats`` iterations after one untimed warm-up, the
variants taking turns iteration by iteration (a slow spell of the machine hits them all).
"""

from __future__ import annotations

import inspect
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn as nn
from torch import Tensor
from torchdyn.core import NeuralODE

from torchdyn_snopt.bench.outputs import write_json
from torchdyn_snopt.bench.provenance import environment, footer
from torchdyn_snopt.bench.records import format_table, md_table
from torchdyn_snopt.bench.reporter import Reporter
from torchdyn_snopt.curvature.eigenbasis import Refresh
from torchdyn_snopt.layer_state import factor_pairs
from torchdyn_snopt.optim import SNOpt, SNOptPreconditioner

WIDTHS: tuple[int, ...] = (64, 128, 256, 512, 1024, 2048, 4096)
CHANNELS: tuple[int, ...] = (16, 32, 64, 128, 256)
QUICK_WIDTHS: tuple[int, ...] = (64, 256)
QUICK_CHANNELS: tuple[int, ...] = (16,)
#: SNOpt's default refresh period, the ``u`` of the amortized cost.
DEFAULT_UPDATE_FREQ: int = inspect.signature(SNOptPreconditioner).parameters["update_freq"].default
VARIANTS: tuple[str, ...] = ("adam", "not_armed", "not_armed_power", "armed_exact", "armed_power")


@dataclass
class RefreshCostConfig:
    """Problem sizes and timing; see the module docstring."""

    mlp_dim: int = 32
    mlp_batch: int = 256
    conv_batch: int = 16
    conv_size: int = 8
    tol: float = 1e-3
    repeats: int = 5
    threads: int = 1
    update_freq: int = DEFAULT_UPDATE_FREQ
    lr: float = 1e-3
    seed: int = 0


class MLPField(nn.Module):
    """``F(t, x) = l2(tanh(l1(x)))``, ``dim → width → dim``."""

    def __init__(self, dim: int, width: int) -> None:
        super().__init__()
        self.l1, self.l2 = nn.Linear(dim, width), nn.Linear(width, dim)

    def forward(self, t: Tensor, x: Tensor, args: Any = None) -> Tensor:
        return self.l2(torch.tanh(self.l1(x)))


class ConvField(nn.Module):
    """``F(t, x) = c2(tanh(c1(x)))``, 3×3 convolutions ``channels → channels``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.c2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, t: Tensor, x: Tensor, args: Any = None) -> Tensor:
        return self.c2(torch.tanh(self.c1(x)))


def _problem(
    field: str, width: int, cfg: RefreshCostConfig
) -> tuple[Callable[[str], NeuralODE], Tensor, Tensor]:
    """A builder of the ODE (same weights every call) for a sensitivity, input and target."""
    g = torch.Generator().manual_seed(cfg.seed)
    if field == "mlp":
        shape: tuple[int, ...] = (cfg.mlp_batch, cfg.mlp_dim)
    else:
        shape = (cfg.conv_batch, width, cfg.conv_size, cfg.conv_size)
    x, y = torch.randn(shape, generator=g), torch.randn(shape, generator=g)

    def build(sensitivity: str) -> NeuralODE:
        torch.manual_seed(cfg.seed)
        vf = MLPField(cfg.mlp_dim, width) if field == "mlp" else ConvField(width)
        return NeuralODE(
            vf,
            sensitivity=sensitivity,
            solver="dopri5",
            atol=cfg.tol,
            rtol=cfg.tol,
            atol_adjoint=cfg.tol,
            rtol_adjoint=cfg.tol,
            return_t_eval=False,
        )

    return build, x, y


def _iteration(node: NeuralODE, opt: torch.optim.Optimizer, x: Tensor, y: Tensor) -> float:
    """Seconds of one training iteration (squared error at ``t = 1``)."""
    start = time.perf_counter()
    opt.zero_grad()
    ((node(x, torch.tensor([0.0, 1.0]))[-1] - y) ** 2).mean().backward()
    opt.step()
    return time.perf_counter() - start


def _interleaved_minima(
    runs: dict[str, tuple[NeuralODE, torch.optim.Optimizer]], x: Tensor, y: Tensor, repeats: int
) -> dict[str, float]:
    """Each run's minimum over ``repeats`` timed iterations after one untimed one; the runs
    take turns (one iteration each per round), so a slow spell of the machine hits them all."""
    for node, opt in runs.values():
        _iteration(node, opt, x, y)
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(repeats):
        for name, (node, opt) in runs.items():
            best[name] = min(best[name], _iteration(node, opt, x, y))
    return best


def _decomposition_seconds(pre: SNOptPreconditioner) -> float:
    """One refresh's decompositions alone, on the last refresh's factors (or sketches),
    warm-started from the bases that refresh produced."""
    by_name = {a.name: a for a in pre.adapters}
    start = time.perf_counter()
    for name, f in pre.last_factors.items():
        factor_pairs(f, pre.refresh, pre._eigen[by_name[name]])
    return time.perf_counter() - start


def _memory(pre: SNOptPreconditioner) -> tuple[int, int]:
    """Bytes of the factors ``Ā``, ``B̄`` (or their sketches) and of the eigenbases."""
    factors = sum(t.nbytes for f in pre.last_factors.values() for t in (f.A, f.B))
    bases = sum(t.nbytes for e in pre._eigen.values() for t in (e.UA, e.UB))
    return factors, bases


def measure(field: str, width: int, cfg: RefreshCostConfig) -> dict[str, Any]:
    """One row: every variant's s/iter, ratios to Adam, amortized costs, memory."""
    build, x, y = _problem(field, width, cfg)
    row: dict[str, Any] = {"field": field, "width": width}
    node = build("adjoint")
    runs = {"adam": (node, torch.optim.Adam(node.parameters(), lr=cfg.lr))}
    for name, update_freq, refresh in (
        ("not_armed", 10**9, Refresh.EXACT),
        ("not_armed_power", 10**9, Refresh.POWER),
        ("armed_exact", 1, Refresh.EXACT),
        ("armed_power", 1, Refresh.POWER),
    ):
        node = build("snopt")
        runs[name] = (node, SNOpt(node, lr=cfg.lr, update_freq=update_freq, refresh=refresh))
    for name, seconds in _interleaved_minima(runs, x, y, cfg.repeats).items():
        row[f"{name}_s"] = seconds
    for refresh in ("exact", "power"):
        pre = cast(SNOpt, runs[f"armed_{refresh}"][1]).preconditioner
        row[f"refresh_{refresh}_s"] = _decomposition_seconds(pre)
        factor_bytes, basis_bytes = _memory(pre)
        row[f"factor_bytes_{refresh}"] = factor_bytes
        row[f"eigenbasis_bytes_{refresh}"] = basis_bytes
        row[f"memory_bytes_{refresh}"] = factor_bytes + basis_bytes
    u = cfg.update_freq
    for refresh, between in (("exact", "not_armed"), ("power", "not_armed_power")):
        row[f"amortized_{refresh}_s"] = (
            (u - 1) * row[f"{between}_s"] + row[f"armed_{refresh}_s"]
        ) / u
    for v in (*VARIANTS[1:], "amortized_exact", "amortized_power"):
        row[f"{v}_ratio"] = row[f"{v}_s"] / row["adam_s"]
    return row


#: The columns of the printed table and of the report's page.
TABLE_COLUMNS: tuple[str, ...] = (
    "field",
    "width",
    "adam_s",
    "not_armed_ratio",
    "not_armed_power_ratio",
    "armed_exact_ratio",
    "armed_power_ratio",
    "amortized_exact_ratio",
    "amortized_power_ratio",
    "refresh_exact_s",
    "refresh_power_s",
    "memory_bytes_exact",
    "memory_bytes_power",
)


def table_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``rows`` cut to :data:`TABLE_COLUMNS`."""
    return [{c: r[c] for c in TABLE_COLUMNS} for r in rows]


def _table(rows: list[dict[str, Any]]) -> str:
    return format_table(table_rows(rows))


#: The cost targets of a cheap refresh, as ratios to Adam: (field, width, kind, bound);
#: ``width`` None = every width measured. Checked per refresh on the report's page.
TARGETS: tuple[tuple[str, int | None, str, float], ...] = (
    ("mlp", 2048, "armed", 1.5),
    ("mlp", 4096, "armed", 2.0),
    ("conv", 256, "armed", 1.5),
    ("mlp", None, "amortized", 1.1),
    ("conv", None, "amortized", 1.1),
)


def target_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per target of :data:`TARGETS` that the run measured: the bound and the ratio to
    Adam of each refresh (the worst over widths for an every-width target)."""
    out = []
    for field, width, kind, bound in TARGETS:
        mine = [r for r in rows if r["field"] == field and (width is None or r["width"] == width)]
        if not mine:
            continue
        row: dict[str, Any] = {
            "target": f"{kind} {field} " + (f"at {width}" if width else "at every size"),
            "bound": f"<= {bound:g}x Adam",
        }
        for refresh in ("exact", "power"):
            worst = max(mine, key=lambda r: r[f"{kind}_{refresh}_ratio"])
            ratio = worst[f"{kind}_{refresh}_ratio"]
            where = "" if width else f" (at {worst['width']})"
            row[refresh] = f"{ratio:.3g}x{where}" + ("" if ratio <= bound else " NO")
        out.append(row)
    return out


def markdown(doc: dict[str, Any], png: str | None, title: str = "# refresh_cost") -> str:
    """The report's page of a ``refresh_cost.json``: targets, the table, the plot, footer."""
    rows, cfg = doc["summary"], doc.get("config", {})
    lines = [
        title,
        "",
        f"Seconds per training iteration, {cfg.get('threads', '?')} thread(s), dopri5 at "
        f"{cfg.get('tol', '?')}, minimum of {cfg.get('repeats', '?')} timed iteration(s) "
        "(the variants taking turns); "
        f"MLP field {cfg.get('mlp_field', '?')} (batch {cfg.get('mlp_batch', '?')}), conv field "
        f"{cfg.get('conv_field', '?')} (batch {cfg.get('conv_batch', '?')}). Ratios are to "
        "Adam with torchdyn's adjoint; armed = a refresh at every step, amortized = at the "
        f'default update_freq {cfg.get("update_freq", "?")}. `exact`: `refresh="exact"`, '
        '`power`: `refresh="power"` (thin bases for wide dense factors that are numerically '
        "low-rank; convolutions keep `eigh`, whose complete bases they need to train well). "
        "Runs one at a time on an otherwise idle machine.",
        "",
        "## Targets",
        "",
        *md_table(target_rows(rows)),
        "",
        "## Cost per width",
        "",
        *md_table(table_rows(rows)),
        "",
    ]
    if png:
        lines += [f"![refresh cost]({png})", ""]
    lines += [footer(doc.get("environment")), ""]
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Log-log s/iter against width (MLP) and channels (conv), one line per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fields = [f for f in ("mlp", "conv") if any(r["field"] == f for r in rows)]
    fig, axes = plt.subplots(1, len(fields), figsize=(5.2 * len(fields), 4), squeeze=False)
    for ax, field in zip(axes[0], fields):
        mine = [r for r in rows if r["field"] == field]
        widths = [r["width"] for r in mine]
        for v in (*VARIANTS, "amortized_exact", "amortized_power"):
            style = "--" if v.startswith("amortized") else "-"
            ax.plot(widths, [r[f"{v}_s"] for r in mine], style, marker="o", label=v)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("hidden width w" if field == "mlp" else "channels c")
        ax.set_ylabel("s / iteration (1 thread)")
        ax.set_title(f"{field} field")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def bench_refresh_cost(
    widths: Sequence[int] | None = None,
    channels: Sequence[int] | None = None,
    cfg: RefreshCostConfig | None = None,
    out: str | Path | None = "runs/refresh_cost",
    quick: bool = False,
    quiet: bool = False,
) -> list[dict[str, Any]]:
    """Time every variant per MLP width and conv channel count (``quick``: 2 widths, 1
    channel count, one timed iteration, unless given), print the table, write
    ``refresh_cost.json`` and ``refresh_cost.png`` under ``out``. Returns the rows."""
    cfg = cfg or RefreshCostConfig(repeats=1 if quick else 5)
    widths = tuple(widths) if widths is not None else (QUICK_WIDTHS if quick else WIDTHS)
    channels = tuple(channels) if channels is not None else (QUICK_CHANNELS if quick else CHANNELS)
    for name, sizes in (("widths", widths), ("channels", channels)):
        if any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in sizes):
            raise ValueError(f"{name}={sizes!r} is invalid; accepted: ints >= 1")
    if not widths and not channels:
        raise ValueError("widths=() and channels=() leave nothing to time; give one of them")
    if cfg.repeats < 1 or cfg.threads < 1:
        raise ValueError(f"cfg={cfg!r} is invalid: repeats and threads must be >= 1")
    log = Reporter(quiet)
    log(
        f"refresh cost, {cfg.threads} thread(s), dopri5 tol {cfg.tol:g}, "
        f"min of {cfg.repeats} iteration(s), amortized at update_freq {cfg.update_freq}"
    )
    old = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    rows = []
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # uncovered-parameter notes: every field is covered
            for field, sizes in (("mlp", widths), ("conv", channels)):
                for size in sizes:
                    row = measure(field, size, cfg)
                    rows.append(row)
                    log(
                        f"  {field:4s} {size:5d}: adam {row['adam_s']:.3g} s, armed exact "
                        f"x{row['armed_exact_ratio']:.3g}, power x{row['armed_power_ratio']:.3g}"
                    )
    finally:
        torch.set_num_threads(old)
    log("")
    log(_table(rows))
    if out is not None:
        path = Path(out)
        config = {**asdict(cfg), "mlp_field": f"{cfg.mlp_dim} -> w -> {cfg.mlp_dim}"}
        config["conv_field"] = f"c x {cfg.conv_size} x {cfg.conv_size}, conv3x3, tanh, conv3x3"
        doc = {"environment": environment(), "config": config, "summary": rows}
        files = [write_json(path / "refresh_cost.json", doc)]
        files.append(path / "refresh_cost.png")
        plot(rows, files[1])
        log.wrote(files)
    return rows
