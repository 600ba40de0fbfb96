"""Tutorial 6: SNOpt on several processes, with PyTorch DDP and with Lightning's Trainer.

Launch one process per GPU (or per share of the CPU cores) with torchrun:

    torchrun --standalone --nproc_per_node=2 tutorials/06_distributed.py      # CPU: gloo
    torchrun --standalone --nproc_per_node=8 tutorials/06_distributed.py      # 8 GPUs: NCCL

    # two nodes of 8 GPUs: run on each node, HOST being the first node's address
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d \\
        --rdzv_endpoint=HOST:29500 tutorials/06_distributed.py

Nothing distributed has to be called on SNOpt. Build it on the DDP-wrapped model (or return it
from ``configure_optimizers``): it finds the NeuralODE inside the wrapper, and once
``torch.distributed`` is initialized it averages its Kronecker factors over the ranks at every
curvature refresh (one all-reduce) and lets all ranks skip a step together when one of them
sees a non-finite gradient. Every rank therefore holds the same preconditioner, and the
parameters stay identical on every rank, which each part checks at its end.

Part 1 is a hand-written loop: a ``DistributedSampler`` gives each rank its shard of the digits,
``DistributedDataParallel`` averages the gradients, ``tds.SNOpt(ddp_model)`` preconditions.
Part 2 trains the same classifier from a ``LightningModule`` whose ``configure_optimizers``
returns ``tds.SNOpt(self)``; Lightning's ``strategy="ddp"`` joins torchrun's processes, and
its checkpoints carry SNOpt's curvature state, so ``trainer.fit(..., ckpt_path=...)`` resumes
exactly.
"""

from __future__ import annotations

import argparse
import os
import warnings
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import torchdyn_snopt as tds
from torchdyn_snopt.data import load_digits
from torchdyn_snopt.models import ImageClassifier


def make_snopt(model: torch.nn.Module, lr: float | None) -> tds.SNOpt:
    """SNOpt at its defaults, as ``torchdyn-snopt bench image`` runs it; ``lr`` when given."""
    return tds.SNOpt(model) if lr is None else tds.SNOpt(model, lr=lr)


def setup() -> torch.device:
    """Join torchrun's job: NCCL and one GPU per process when there are GPUs, gloo otherwise."""
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl")
    else:
        device = torch.device("cpu")
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["LOCAL_WORLD_SIZE"])))
        dist.init_process_group("gloo")
    return device


def identical_on_all_ranks(model: torch.nn.Module) -> bool:
    """Whether every rank holds exactly rank 0's parameters."""
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    ref = flat.clone()
    dist.broadcast(ref, src=0)
    same = torch.tensor([float(torch.equal(flat, ref))], device=flat.device)
    dist.all_reduce(same, op=dist.ReduceOp.MIN)
    return bool(same.item())


def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def say(text: str) -> None:
    if dist.get_rank() == 0:
        print(text, flush=True)


# --------------------------------------------------------------------------- part 1: DDP


def train_ddp(args: argparse.Namespace, device: torch.device) -> None:
    x, y, x_test, y_test = (t.to(device) for t in load_digits())
    data = TensorDataset(x, y)
    sampler = DistributedSampler(data, shuffle=True, seed=0)  # this rank's shard
    loader = DataLoader(data, batch_size=args.batch_size, sampler=sampler, drop_last=True)
    torch.manual_seed(0)  # DDP also broadcasts rank 0's initial weights
    model = ImageClassifier().to(device)
    ddp = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    opt = make_snopt(ddp, args.lr)  # finds model.ode inside the wrapper

    step, epoch = 0, 0
    while step < args.steps:
        sampler.set_epoch(epoch)  # a new shuffle each epoch, the same on every rank
        for xb, yb in loader:
            opt.zero_grad()
            loss = F.cross_entropy(ddp(xb), yb)
            loss.backward()  # DDP averages the gradients; the curvature stays per rank
            opt.step()  # at a refresh: factors averaged over ranks, then eigendecomposed
            step += 1
            if step == args.steps:
                break
        epoch += 1
    world, same = dist.get_world_size(), identical_on_all_ranks(model)  # every rank calls it
    say(
        f"[DDP] {world} processes, {step} steps of {world * args.batch_size} images: "
        f"last loss {loss.item():.3f}, test accuracy {accuracy(model, x_test, y_test):.3f}; "
        f"parameters identical on all {world} ranks: {same}"
    )


# --------------------------------------------------------------------------- part 2: Lightning


class DigitsModule(pl.LightningModule):
    """The same classifier as a LightningModule: SNOpt comes from ``configure_optimizers``."""

    def __init__(self, lr: float | None) -> None:
        super().__init__()
        self.model, self.lr = ImageClassifier(), lr

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.model(x), y)

    def configure_optimizers(self):
        return make_snopt(self, self.lr)


def train_lightning(args: argparse.Namespace, device: torch.device) -> None:
    x, y, x_test, y_test = load_digits()
    torch.manual_seed(0)
    module = DigitsModule(args.lr)
    local = int(os.environ["LOCAL_WORLD_SIZE"])
    trainer = pl.Trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu",
        devices=local,
        num_nodes=dist.get_world_size() // local,
        strategy="ddp",  # under torchrun Lightning uses its processes (and its process group)
        max_steps=args.steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    loader = DataLoader(TensorDataset(x, y), batch_size=args.batch_size, shuffle=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's advice on dataloader workers
        trainer.fit(module, loader)  # Lightning shards the loader with a DistributedSampler
    ckpt = Path(args.out) / "lightning.ckpt"
    trainer.save_checkpoint(ckpt)  # every rank calls it, rank 0 writes
    dist.barrier()
    state = torch.load(ckpt, map_location="cpu", weights_only=False)["optimizer_states"][0]
    curvature = state["preconditioner"]
    same = identical_on_all_ranks(module)  # every rank calls it
    say(
        f"[Lightning] {trainer.world_size} processes, {trainer.global_step} steps: test accuracy "
        f"{accuracy(module.model, x_test.to(device), y_test.to(device)):.3f}; parameters "
        f"identical on all {trainer.world_size} ranks: {same}; "
        f"{ckpt.name} holds SNOpt's state after step {curvature['steps']} "
        f"({len(curvature['layers'])} layers' eigenbases)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=100, help="training steps of each part")
    parser.add_argument("--batch-size", type=int, default=64, help="images per process")
    parser.add_argument(
        "--lr", type=float, default=None, help="SNOpt learning rate (default: SNOpt's own)"
    )
    parser.add_argument("--out", default="runs/tutorial06", help="folder for the checkpoint")
    args = parser.parse_args()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    device = setup()
    try:
        train_ddp(args, device)
        train_lightning(args, device)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
