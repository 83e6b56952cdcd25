"""Training PSN v2's capability blocks, domain after domain, each kept out of the earlier blocks' directions.

    for domain d in order:
        V = the earlier blocks' output directions: for each earlier block j, the top-K right singular vectors
            (randomized SVD, training/nullspace.py) of its corrections c_j over its own domain's validation
            tokens; all of them together, orthonormalised, at most half of d_model
        block_d: fresh (the identity), c_d projected out of V in every forward; only block_d on while it trains
        AdamW on block_d alone: CE + λ Σ L_aux, warmup then linear decay (sft.py's schedule), grad clip 1.0
        every eval_every steps: d's validation loss; the best snapshot is kept (the stacks' guard, its first half)

The base never changes (PSNModel froze it) and an earlier block never changes (AdamW holds block_d only);
the projection is what keeps a later block from writing where an earlier one does, so that switching two
on together adds two corrections that do not overwrite each other.
"""

from __future__ import annotations

import copy
import time

import torch
from tqdm.auto import tqdm

from ..runtime import training_state
from ..training.examples import IGNORE, ExampleSet, PackedExamples, example_loss
from ..training.nullspace import randomized_svd
from ..training.sft import lr_factor
from .blocks import BlockConfig
from .model import PSNModel


@torch.no_grad()
def block_directions(model: PSNModel, domain: str, data: ExampleSet, k: int) -> torch.Tensor:
    """V [d, k]: the top-k directions of block `domain`'s corrections over the scored tokens of `data`."""
    block, base = model.blocks[domain], model.base
    rows = []
    with training_state(model, False):  # no routing noise: the directions of the block as it answers
        for x, y in data.batches:
            T = x.shape[1]
            c = block(base.embed_tokens(x), base.rope_cos[:T], base.rope_sin[:T])  # [B, T, d]
            rows.append(c[y != IGNORE])  # the tokens that count, not the padding
    D = torch.cat(rows)  # [N, d]
    return randomized_svd(D, min(k, *D.shape), generator=torch.Generator().manual_seed(0))[2]


def united_basis(directions: list[torch.Tensor], d_model: int, max_share: float = 0.5) -> torch.Tensor | None:
    """Orthonormal basis of all earlier blocks' directions, at most max_share · d_model of them (each block
    keeps its strongest directions first when the cap binds)."""
    if not directions:
        return None
    cap = int(max_share * d_model)
    keep = max(1, cap // len(directions))
    V = torch.cat([v[:, :keep] for v in directions], dim=1)  # [d, Σ k]
    return torch.linalg.qr(V).Q[:, :cap]


def train_block(model: PSNModel, domain: str, train: PackedExamples, val: ExampleSet, cfg: BlockConfig,
                basis: torch.Tensor | None = None, seed: int = 0, progress: bool = True) -> dict:
    """Add and train `domain`'s block (module docstring); returns its curve, its pre- and best validation loss."""
    block = model.add_block(domain, cfg)
    block.basis = basis
    model.weights = {d: float(d == domain) for d in model.blocks}  # the block alone, over the base
    params = list(block.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.01)
    pre = example_loss(model, val)  # the block is the identity: the base's loss
    best, best_step, best_state, curve, seconds = pre, 0, copy.deepcopy(block.state_dict()), [[0, pre]], 0.0
    model.train(True)
    for step in tqdm(range(cfg.steps), desc=f"{domain} block", disable=not progress, leave=False):
        t0 = time.perf_counter()
        for g in opt.param_groups:
            g["lr"] = cfg.lr * lr_factor(step, cfg)
        x, y = train.batch(step, cfg.batch_size, seed)
        loss = model(x, labels=y).loss + cfg.aux_weight * model.aux_loss()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        seconds += time.perf_counter() - t0
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            v = example_loss(model, val)
            model.train(True)
            curve.append([step + 1, v])
            if v < best:
                best, best_step, best_state = v, step + 1, copy.deepcopy(block.state_dict())
    block.load_state_dict(best_state)
    model.train(False)
    return {"pre_loss": pre, "best_loss": best, "best_step": best_step, "val_curve": curve,
            "seconds_per_step": seconds / max(1, cfg.steps), "params": sum(p.numel() for p in params),
            "protected": 0 if basis is None else basis.shape[1]}
