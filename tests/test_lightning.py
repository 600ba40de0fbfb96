"""SNOpt returned by ``configure_optimizers``: Trainer fit, checkpoint resume, strategy="ddp".

The ddp test spawns 2 processes and gives each the environment torchrun would set
(``LOCAL_RANK``, ``MASTER_PORT``, ...), so Lightning's DDP strategy joins them instead of
relaunching the test script.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset
from torchdyn.core import NeuralODE

import torchdyn_snopt as tds
from tests.helpers.data import classification_data
from tests.helpers.distributed import free_port, spawn
from tests.helpers.models import OdeClassifier, TwoLayerField

OPTS = {"lr": 0.05, "update_freq": 3, "full_precond": True}
BATCH = 16  # 64 samples: 4 steps an epoch; refreshes at steps 0, 3, 6, ... straddle epochs


class Classifier(pl.LightningModule):
    """A user LightningModule holding a snopt NeuralODE (inside ``OdeClassifier``)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = OdeClassifier().to(torch.float64)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return tds.SNOpt(self, **OPTS)


class ODEModel(NeuralODE):
    """torchdyn's NeuralODE (itself a LightningModule) with a training step and SNOpt."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.mse_loss(self(x, torch.linspace(0, 1, 5, dtype=x.dtype))[-1], y)

    def configure_optimizers(self):
        return tds.SNOpt(self, lr=0.05, update_freq=2)


def _trainer(**kw) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kw,
    )


def _loader(batch: int = BATCH, sampler=None) -> DataLoader:
    return DataLoader(TensorDataset(*classification_data(64)), batch_size=batch, sampler=sampler)


def _params(module: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _fit(epochs: int, ckpt: Path | None = None, save: Path | None = None) -> Classifier:
    module = Classifier()
    trainer = _trainer(max_epochs=epochs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's advice on workers and loggers
        trainer.fit(module, _loader(), ckpt_path=ckpt)
    if save is not None:
        trainer.save_checkpoint(save)
    assert trainer.global_step == 4 * epochs
    return module


def test_torchdyn_neural_ode_trains_with_snopt_in_trainer():
    torch.manual_seed(0)
    node = ODEModel(TwoLayerField(3, 8), sensitivity="snopt", solver="rk4").to(torch.float64)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(32, 3, generator=g, dtype=torch.float64)
    loader = DataLoader(TensorDataset(x, 0.5 * x.flip(1)), batch_size=8)
    before = _params(node)
    trainer = _trainer(max_epochs=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(node, loader)
    opt = trainer.optimizers[0]
    assert isinstance(opt, tds.SNOpt) and opt.preconditioner.steps == 4
    assert set(opt.preconditioner.last_factors) == {"vf.vf.l1", "vf.vf.l2"}
    assert all(not torch.equal(a, b) for a, b in zip(before, _params(node)))


def test_checkpoint_holds_curvature_and_resumes_exactly(tmp_path):
    ckpt = tmp_path / "half.ckpt"
    _fit(2, save=ckpt)  # 8 steps: refreshed at 0, 3, 6; the next refresh is due at 9
    state = torch.load(ckpt, weights_only=False)["optimizer_states"][0]["preconditioner"]
    assert state["steps"] == 8 and state["armed"] is False
    assert set(state["layers"]) == {"net.enc", "net.head", "net.ode.vf.vf.l1", "net.ode.vf.vf.l2"}
    resumed = _fit(4, ckpt=ckpt)
    straight = _fit(4)
    for a, b in zip(_params(resumed), _params(straight)):
        assert torch.equal(a, b)
    # The same checkpoint with a fresh preconditioner's state resumes differently: the
    # curvature state is what makes the resume exact (the test can tell).
    blank = torch.load(ckpt, weights_only=False)
    blank["optimizer_states"][0]["preconditioner"] = tds.SNOpt(Classifier(), **OPTS).state_dict()[
        "preconditioner"
    ]
    torch.save(blank, tmp_path / "blank.ckpt")
    other = _fit(4, ckpt=tmp_path / "blank.ckpt")
    assert any(not torch.equal(a, b) for a, b in zip(_params(other), _params(straight)))


# --------------------------------------------------------------------------- strategy="ddp"


def _ddp_worker(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        LOCAL_RANK=str(rank),
        NODE_RANK="0",
        RANK=str(rank),
        WORLD_SIZE="2",
    )
    module = Classifier()
    data = TensorDataset(*classification_data(64))
    # Rank r takes samples r, r+2, ... in order: the pair of per-rank batches is the batch
    # a single process reads (Lightning's own sampler would shuffle).
    sampler = DistributedSampler(data, num_replicas=2, rank=rank, shuffle=False)
    trainer = _trainer(max_epochs=2, devices=2, strategy="ddp", use_distributed_sampler=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, DataLoader(data, batch_size=BATCH // 2, sampler=sampler))
    trainer.save_checkpoint(Path(out) / "ddp.ckpt")  # every rank calls it; rank 0 writes
    sync = trainer.optimizers[0].preconditioner.sync
    torch.save(
        {"params": _params(module), "world": sync.world_size(), "calls": sync.stats.calls},
        Path(out) / f"rank{rank}.pt",
    )


@pytest.mark.slow
def test_ddp_strategy_on_two_processes_equals_one_process(tmp_path):
    spawn(_ddp_worker, 2, free_port(), str(tmp_path), timeout_s=150)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    assert all(r["world"] == 2 and r["calls"] == 8 for r in ranks)  # one collective a step
    for a, b in zip(ranks[0]["params"], ranks[1]["params"]):
        assert torch.equal(a, b)
    single = _fit(2)
    for a, b in zip(ranks[0]["params"], _params(single)):
        assert _rel(a, b) <= 1e-6
    state = torch.load(tmp_path / "ddp.ckpt", weights_only=False)["optimizer_states"][0]
    assert state["preconditioner"]["steps"] == 8 and "net.head" in state["preconditioner"]["layers"]


@pytest.mark.parametrize("group", ["nope", 1.5])
def test_configure_optimizers_rejects_bad_process_group(group):
    module = Classifier()
    with pytest.raises(TypeError, match="process_group"):
        tds.SNOpt(module, process_group=group, **OPTS)
