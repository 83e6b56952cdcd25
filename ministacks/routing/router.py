"""The outcome-based meta-router (docs/brainstacks.md §6): which domains' stacks to switch on for a prompt.

    prompt (raw, no template) ──► frozen base, every stack off ──► h_mid, h_last per token
                                                                      │
                        feature per token  u_t = 0.45·h_mid,t + 0.55·h_last,t      [T, token_dim]
                                                                      │
                        Linear(token_dim → 512) + LayerNorm                        [T, 512]
                              │                        │
              global query q_g attends         domain query q_d attends            (one q_d per domain)
              a_t = softmax_t(q_g·h_t)         over the same tokens                (plain dot products)
              c_g = LN_g(Σ_t a_t h_t)          c_d = LN_d(Σ_t a_t h_t)             [512] each, own LayerNorms
                              └──────── concat ────────┘
                  fusion MLP (shared): Linear 1024→512, GELU, Dropout, LN, Linear 512→512, GELU, Dropout
                  head (shared):       Linear 512→1                                 one logit z_d per domain
                  p_d = σ(z_d / T),    T = exp(log T) clamped to [0.3, 3]            independent sigmoids

Every domain goes through the *same* fusion MLP and head; only its query differs. That is how the
network stays at 2,761,730 parameters for token_dim 3840 and 5 domains (Gemma 3 12B's hidden size),
and why adding a domain costs one 512-vector. The queries start at N(0, 0.02²), so at initialisation
every score is near 0 and the pooling is a plain mean over the tokens. The sigmoids are independent
(not a softmax): a prompt may need several domains at once, or none.

Training (docs/brainstacks.md §6): targets come from outcomes (oracle.py), mixed-domain prompts keep multi-hot labels;

    loss = BCE(z/T, target) + 0.05 · mean(max(0, 0.3 − |p − 0.5|))

where the second term pushes probabilities out of the undecided band [0.2, 0.8]. AdamW (lr 8e-4,
weight decay 0.01), batch 16, gradient clip 1.0, cosine schedule over 8 epochs; the epoch kept is the
one with the best 0.50·single top-1 + 0.35·mixed set match − 0.15·validation BCE, all three measured
against the *targets* the router is trained on (router_metrics):

    single top-1      single-domain prompts: the predicted top domain is a top domain of the target
    mixed set match   mixed prompts: the |S| most probable domains are S = {d : target_d > 0.3}

A router that learns "medical prompts → chat+math" from the oracle scores well on both, although it
disagrees with the prompts' domain labels; agreement with the labels is reported beside them under
its own names (label_top1, label_set_match), never mixed into the selection.

Inference rule (docs/brainstacks.md §6): p_chat = max(p_chat, 0.20); every domain with p_d > 0.12 is on with weight
p_d; the others are skipped entirely (stacks.SKIP_THRESHOLD), so a switched-off domain costs nothing.

This file holds the network, its features, its loss, its training loop and the inference rule; where
the targets come from is oracle.py, and the stage that puts it all together on a run is stages/route.py.
"""

from __future__ import annotations

import copy
import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save as safetensors_to_bytes
from tqdm.auto import tqdm

from ..io import RunFileError, atomic_write_bytes, atomic_write_json, read_checked_tensors, read_json_file, record_checksum
from ..lm.tokenizer import Tokenizer
from ..runtime import training_state
from ..stacks.layer import StacksOn, stacks_on
from ..stacks.selection import SKIP_THRESHOLD
from ..stacks.fingerprint import base_fingerprint


@dataclass(frozen=True)
class RouterConfig:
    hidden: int = 512  # router width (paper: 512)
    dropout: float = 0.1  # paper: 0.1 in the fusion MLP
    mid_weight: float = 0.45  # feature = 0.45·h_mid + 0.55·h_last (paper)
    temp_min: float = 0.3  # learned temperature clamp (paper: [0.3, 3])
    temp_max: float = 3.0
    max_prompt_tokens: int = 128  # a prompt's first tokens are what the router reads
    query_std: float = 0.02  # init of the global and per-domain queries, N(0, std²) (paper)
    scaled_scores: bool = False  # True: scores q·h/√hidden (transformer-style); the paper: plain q·h
    # the data the router learns from: validation examples of each domain (never trained on by the
    # stacks, never used by the evaluation, which reads the test split) and mixed-domain prompts
    prompts_per_domain: int = 100
    mixed_per_kind: int = 30
    val_fraction: float = 0.2  # share of prompt groups held out for selecting the epoch
    # outcome-based targets (docs/brainstacks.md §6, oracle.py)
    search: str = "exhaustive"  # "exhaustive": all 2^D − 1 combinations; "greedy": the released code's search
    min_gain: float = 0.01  # a domain switched on must lower the loss by more than this (released code: 0.01)
    chat_floor: float = 0.2  # chat's target and inference weight are at least this
    # every combination the oracle evaluates runs chat at max(w_chat, chat_floor), as inference does, so the
    # winner is a configuration the router can actually produce (released code); False: chat off unless chosen
    oracle_chat_floor: bool = True
    reasoning_soft: float = 0.5  # target of reasoning when it helps but is not in the best combination
    label_weight: float = 0.2  # final target = (1 − w)·found + w·one-hot(domain label)
    # training (paper's recipe)
    margin_weight: float = 0.05
    margin: float = 0.3  # penalise |p − 0.5| < 0.3, i.e. p in (0.2, 0.8)
    epochs: int = 8
    batch_size: int = 16
    lr: float = 8e-4
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    select_top1: float = 0.50  # selection score = 0.50·top1 + 0.35·mixed − 0.15·BCE (paper)
    select_mixed: float = 0.35
    select_bce: float = 0.15
    # inference
    threshold: float = SKIP_THRESHOLD  # a domain at or below this is off (paper: 0.12)
    set_threshold: float = 0.5  # "the router picked d" when p_d > 0.5 (label set match)
    target_set_threshold: float = 0.3  # S = {d : target_d > 0.3}, the set a mixed prompt needs (paper)
    seed: int = 0


class MetaRouter(nn.Module):
    """features [B, T, token_dim] + mask [B, T] -> logits / T, [B, D] (apply sigmoid for probabilities)."""

    def __init__(self, token_dim: int, domains: Sequence[str], cfg: RouterConfig = RouterConfig()):
        super().__init__()
        self.token_dim, self.domains, self.cfg = token_dim, tuple(domains), cfg
        H = cfg.hidden
        self.proj = nn.Linear(token_dim, H)
        self.proj_norm = nn.LayerNorm(H)
        self.global_query = nn.Parameter(torch.randn(H) * cfg.query_std)
        self.domain_queries = nn.Parameter(torch.randn(len(domains), H) * cfg.query_std)
        self.global_norm = nn.LayerNorm(H)  # the global context and the per-domain contexts are normalised
        self.domain_norm = nn.LayerNorm(H)  # apart: they pool the same tokens but play different roles
        self.fusion = nn.Sequential(
            nn.Linear(2 * H, H), nn.GELU(), nn.Dropout(cfg.dropout), nn.LayerNorm(H),
            nn.Linear(H, H), nn.GELU(), nn.Dropout(cfg.dropout),
        )
        self.head = nn.Linear(H, 1)  # shared by every domain
        self.log_temp = nn.Parameter(torch.zeros(()))  # T = 1 at the start

    def temperature(self) -> torch.Tensor:
        return self.log_temp.exp().clamp(self.cfg.temp_min, self.cfg.temp_max)

    def forward(self, features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # B prompts, T tokens, H router width, D domains
        h = self.proj_norm(self.proj(features))  # [B, T, H]
        queries = torch.cat([self.global_query[None], self.domain_queries])  # [1 + D, H]
        scores = torch.einsum("bth,qh->bqt", h, queries)  # [B, 1+D, T]
        if self.cfg.scaled_scores:
            scores = scores / math.sqrt(h.shape[-1])
        scores = scores.masked_fill(~mask[:, None, :], float("-inf"))
        pooled = torch.einsum("bqt,bth->bqh", scores.softmax(-1), h)  # [B, 1+D, H]
        ctx_global, ctx_domain = self.global_norm(pooled[:, :1]), self.domain_norm(pooled[:, 1:])  # [B, 1, H], [B, D, H]
        fused = self.fusion(torch.cat([ctx_domain, ctx_global.expand_as(ctx_domain)], dim=-1))  # [B, D, H]
        return self.head(fused).squeeze(-1) / self.temperature()  # [B, D]

    @torch.no_grad()
    def probabilities(self, features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        was = self.training
        self.eval()
        p = torch.sigmoid(self(features, mask))
        self.train(was)
        return p


# -- features: the prompt through the frozen base, every stack off ----------------------------------


def encode_prompts(tok: Tokenizer, texts: Sequence[str], max_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`<bos> text`, cut to `max_tokens`, right-padded: ids [N, T] and mask [N, T] (True = real token)."""
    seqs = [tok.encode(t, bos=True)[:max_tokens] for t in texts]
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), tok.pad_id)
    mask = torch.zeros((len(seqs), T), dtype=torch.bool)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = True
    return ids, mask


@torch.no_grad()
def prompt_features(model: nn.Module, tok: Tokenizer, texts: Sequence[str], cfg: RouterConfig = RouterConfig(),
                    batch_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """u_t = mid_weight·h_mid + (1 − mid_weight)·h_last for every token of every prompt: [N, T, d], mask [N, T].

    The base alone computes them (every stack off, `StacksOn.base_only()`), so they do not depend on which
    stacks a run holds and are computed once per prompt. Right padding is harmless: attention is causal,
    so a real token never sees the pads after it, and the pooling masks them out."""
    ids, mask = encode_prompts(tok, texts, cfg.max_prompt_tokens)
    chunks = []
    with training_state(model, False), stacks_on(model, StacksOn.base_only()):
        for b in range(0, len(ids), batch_size):
            hs = model(ids[b : b + batch_size], output_hidden_states=True, return_logits=False).hidden_states
            L = len(hs) - 1  # hidden_states: the embeddings, then every layer; the last is final-normed
            chunks.append(cfg.mid_weight * hs[L // 2] + (1 - cfg.mid_weight) * hs[L])
    return torch.cat(chunks), mask


# -- loss, training, selection ----------------------------------------------------------------------


def router_loss(logits: torch.Tensor, targets: torch.Tensor, cfg: RouterConfig = RouterConfig()) -> torch.Tensor:
    """BCE-with-logits + margin_weight · mean(max(0, margin − |σ(z) − 0.5|))."""
    bce = F.binary_cross_entropy_with_logits(logits, targets)
    undecided = (cfg.margin - (torch.sigmoid(logits) - 0.5).abs()).clamp(min=0)
    return bce + cfg.margin_weight * undecided.mean()


@dataclass
class RouterData:
    """Everything the router learns from, row-aligned: features, targets, and how each row is judged."""

    features: torch.Tensor  # [N, T, token_dim]
    mask: torch.Tensor  # [N, T]
    targets: torch.Tensor  # [N, D] in [0, 1]
    label: torch.Tensor  # [N] domain index of a single-domain prompt, −1 for a mixed one
    label_set: torch.Tensor  # [N, D] multi-hot domain labels (one-hot for a single-domain prompt)

    def subset(self, rows: torch.Tensor) -> RouterData:
        return RouterData(self.features[rows], self.mask[rows], self.targets[rows], self.label[rows],
                          self.label_set[rows])

    def __len__(self) -> int:
        return len(self.targets)


def top1_hits(p: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """[N] bool: the most probable domain is one of the target's top domains. (Ties are common: a target
    of chat+math has both at 0.8, and either is a correct first pick; torch's argmax would pick the first.)"""
    picked = targets.gather(1, p.argmax(-1, keepdim=True)).squeeze(1)  # the target's value at the pick
    return picked >= targets.amax(-1) - 1e-6


def set_hits(p: torch.Tensor, targets: torch.Tensor, threshold: float) -> torch.Tensor:
    """[N] bool: the |S| most probable domains are exactly S = {d : target_d > threshold}."""
    wanted = targets > threshold  # [N, D]
    k = wanted.sum(-1)  # [N]
    rank = p.argsort(-1, descending=True).argsort(-1)  # rank[i, d] = 0 for the most probable domain
    return ((rank < k[:, None]) == wanted).all(-1)


def router_metrics(router: MetaRouter, data: RouterData, cfg: RouterConfig = RouterConfig()) -> dict:
    """The router's scores on `data`, against what it is trained on (the targets) and, apart, the labels.

    single_top1      single-domain prompts: top1_hits(p, target)
    mixed_set_match  mixed prompts: set_hits(p, target, 0.3) — their targets are their multi-hot labels
    bce              against the targets, every prompt
    score            the paper's selection score, 0.50·single_top1 + 0.35·mixed_set_match − 0.15·bce
    label_top1       single-domain prompts: argmax p is the prompt's domain label
    label_set_match  mixed prompts: {d : p_d > 0.5} is the prompt's label set
    """
    router.eval()
    with torch.no_grad():
        logits = router(data.features, data.mask)
    p = torch.sigmoid(logits)
    single, mixed = data.label >= 0, data.label < 0

    def share(hits: torch.Tensor) -> float:
        return float(hits.float().mean()) if len(hits) else 0.0

    top1 = share(top1_hits(p[single], data.targets[single]))
    match = share(set_hits(p[mixed], data.targets[mixed], cfg.target_set_threshold))
    bce = float(F.binary_cross_entropy_with_logits(logits, data.targets))
    score = cfg.select_top1 * top1 + cfg.select_mixed * match - cfg.select_bce * bce
    label_top1 = share(p[single].argmax(-1) == data.label[single])
    label_match = share(((p[mixed] > cfg.set_threshold) == data.label_set[mixed].bool()).all(-1))
    return {"single_top1": top1, "mixed_set_match": match, "bce": bce, "score": score,
            "label_top1": label_top1, "label_set_match": label_match}


def train_router(router: MetaRouter, train: RouterData, val: RouterData, cfg: RouterConfig = RouterConfig(),
                 progress: bool = True, on_epoch: Callable[[dict], None] | None = None) -> dict:
    """Train with AdamW + cosine; keep the epoch with the best selection score (its weights are loaded
    back into `router`). Returns {"history": [per-epoch metrics], "best_epoch", "best"}."""
    g = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.AdamW(router.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(train) / cfg.batch_size)
    total = cfg.epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    history, best, best_state = [], None, copy.deepcopy(router.state_dict())
    for epoch in tqdm(range(1, cfg.epochs + 1), desc="router", disable=not progress, leave=False):
        router.train()
        order, running = torch.randperm(len(train), generator=g), 0.0
        for b in range(steps_per_epoch):
            rows = order[b * cfg.batch_size : (b + 1) * cfg.batch_size]
            loss = router_loss(router(train.features[rows], train.mask[rows]), train.targets[rows], cfg)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(router.parameters(), cfg.grad_clip)
            opt.step()
            sched.step()
            running += loss.item() * len(rows)
        record = {"epoch": epoch, "train_loss": running / len(train), **router_metrics(router, val, cfg),
                  "temperature": router.temperature().item()}
        history.append(record)
        if on_epoch is not None:
            on_epoch(record)
        if best is None or record["score"] > best["score"]:
            best, best_state = record, copy.deepcopy(router.state_dict())
    router.load_state_dict(best_state)
    router.eval()
    return {"history": history, "best_epoch": best["epoch"], "best": best}


# -- inference rule ----------------------------------------------------------------------------------


def routing_weights(probs: dict[str, float], cfg: RouterConfig = RouterConfig()) -> dict[str, float]:
    """Probabilities -> stack weights: chat floored at `chat_floor`; a domain above `threshold` is on with
    weight p_d; the rest are left out (and cost nothing). Example: {chat .05, code .9, math .1} ->
    {chat .2, code .9}."""
    p = dict(probs)
    if "chat" in p:
        p["chat"] = max(p["chat"], cfg.chat_floor)
    return {d: float(v) for d, v in p.items() if v > cfg.threshold}


# -- on disk ------------------------------------------------------------------------------------------

ROUTER_DIR = "router"  # RUN/router/: model.safetensors + config.json


def save_router(run: Path, router: MetaRouter, model: nn.Module) -> None:
    """RUN/router/model.safetensors, then RUN/router/config.json: the router's shape and settings, the
    base it was trained on, the tensor file's sha256 and size, and record_sha256 over the record (the
    same two checksums as a stack's, store.py): a kill between the two files, a damaged file or an edited
    setting is then a load error naming the file, not a router that routes wrongly."""
    folder = run / ROUTER_DIR
    data = safetensors_to_bytes({k: v.detach().cpu().contiguous() for k, v in router.state_dict().items()})
    atomic_write_bytes(folder / "model.safetensors", data)
    record = {"token_dim": router.token_dim, "domains": list(router.domains), "router": asdict(router.cfg),
              "base_fingerprint": base_fingerprint(model), "tensor_file": "model.safetensors",
              "sha256": hashlib.sha256(data).hexdigest(), "n_bytes": len(data)}
    record["record_sha256"] = record_checksum(record)
    atomic_write_json(folder / "config.json", record)


def load_router(run: str | Path, model: nn.Module) -> MetaRouter | None:
    """The run's router, or None if `route` has not been run. Refused, naming the file, if it was trained
    on another base, or a file is missing, damaged or edited. Routers saved before the checksums were
    recorded load without them."""
    folder = Path(run) / ROUTER_DIR
    tensor_path, config_path = folder / "model.safetensors", folder / "config.json"
    if not tensor_path.is_file():
        return None
    fix = f"train the router again with `python -m ministacks route {Path(run)}`"
    meta = read_json_file(config_path, fix)
    need = ("token_dim", "domains", "router", "base_fingerprint")
    if not isinstance(meta, dict) or any(k not in meta for k in need):
        raise RunFileError(config_path, f"damaged: not a router record (it needs {list(need)}); {fix}")
    if "record_sha256" in meta and meta["record_sha256"] != record_checksum(meta):
        raise RunFileError(config_path, f"edited or damaged: the record does not match its record_sha256; {fix}")
    if meta["base_fingerprint"] != base_fingerprint(model):
        raise RunFileError(config_path, f"the router in {folder} was trained on another base; {fix}")
    try:
        router = MetaRouter(meta["token_dim"], meta["domains"], RouterConfig(**meta["router"]))
    except (TypeError, ValueError) as e:
        raise RunFileError(config_path, f"cannot rebuild the router it describes ({e}); {fix}") from None
    tensors = read_checked_tensors(tensor_path, meta, fix)
    try:
        router.load_state_dict(tensors)
    except (RuntimeError, ValueError) as e:
        raise RunFileError(tensor_path, f"does not fit {config_path} ({e}); {fix}") from None
    return router.eval()
