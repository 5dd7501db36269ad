"""One optimiser step's gradients for every objective, on the global batch of ``grad_batch``.

Run as ``python grad_step.py OUT.pt`` (one process) or under ``torchrun --nproc_per_node 2``
(each rank scores half the rows). Writes {family/objective: {param: grad}} from rank 0.
The test compares the two: the global normalisation makes them equal.
"""

import os
import sys

import torch

from dlm.batch import Batch
from dlm.config import ComponentConfig, RunConfig
from dlm.device import generator
from dlm.distributed import init_distributed
from dlm.families import FAMILIES
from dlm.train import accumulate_gradients

V = 23
OBJECTIVES = [("ar", "ce"), ("mdlm", "nelbo"), ("mdlm", "nelbo-count"), ("mdlm", "llada"), ("usdm", "nelbo"),
              ("usdm", "naive"), ("usdm", "sddlm"), ("usdm", "sddlm-v1"), ("usdm", "sddlm-v2")]


def grad_batch(micro: int) -> Batch:
    """A global micro-batch of 8 rows of 12 tokens, rows with prompts of different lengths."""
    g = torch.Generator().manual_seed(100 + micro)
    x0 = torch.randint(0, V - 1, (8, 12), generator=g)
    clean = torch.arange(12)[None] < torch.randint(0, 6, (8, 1), generator=g)
    return Batch(x0, clean)


def main(out: str) -> None:
    torch.set_num_threads(1)
    dist = init_distributed(torch.device("cpu"))
    result = {}
    for family_name, objective in OBJECTIVES:
        cfg = RunConfig(family=family_name, objective=ComponentConfig(objective))
        fam = FAMILIES.get(family_name)(cfg, V, V - 1)
        torch.manual_seed(0)
        model = fam.build_model()
        torch.nn.init.normal_(model.head.weight, std=0.3)
        net = dist.wrap(model)
        loss = float(accumulate_gradients(fam, net, model, [grad_batch(0), grad_batch(1)], generator(torch.device("cpu"), 7),
                                    dist, torch.device("cpu")))
        result[f"{family_name}/{objective}"] = {"loss": loss, **{k: p.grad.clone() for k, p in model.named_parameters()
                                                                  if p.grad is not None}}
    if dist.is_main:
        torch.save(result, out)
    dist.shutdown()
    # the wrapper's reducer let go of the group inside shutdown (were it freed with the wrapper
    # afterwards, the Gloo group's destructor could hang the exit: see Dist.shutdown)
    assert "reducer" not in net.__dict__ and "logger" not in net.__dict__


if __name__ == "__main__":
    main(sys.argv[1])
