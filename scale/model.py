"""A pretrained Hugging Face base behind the interface of ministacks' own Transformer, and the run folder that
names it, so that every ministacks stage — compare, boost, train, route, eval, generate, chat — runs on it
unchanged.

    write_pretrained(out, "HuggingFaceTB/SmolLM2-135M-Instruct")   # OUT/base/pretrained.json: which base
    model, tok = open_pretrained(out, quant="nf4")                  # what ministacks.run.prepared_base returns

What ministacks asks of a model, and how a Hugging Face causal LM answers it (`PretrainedLM`):

    model(ids)                                  -> .logits [B, T, V]           hf(input_ids=ids)
    model(ids, labels=y)                        -> .loss                        hf(input_ids=ids, labels=y)
    model(ids, at=mask)                         -> .logits [N, V] at the mask  decoder, then the LM head at
                                                                                the N scored positions only
    model(ids, output_hidden_states=True,       -> .hidden_states              the decoder's: the embeddings,
          return_logits=False)                                                  then every layer (the last
                                                                                final-normed), no LM head
    model.generate(ids, n, temperature=...,     -> [B, T + n]                  the decoder's own KV cache,
          repetition_penalty=..., eos_id=...)                                   ministacks' sampling rule
    model.cfg.max_seq_len                                                       the context the run uses

The LM head at the scored positions only matters here: SmolLM2's head is 49,152 × 576, a fifth of the model.
Logits come back in fp32 whatever the compute dtype (bf16 on a GPU), so every loss is computed in fp32.

OUT/base/pretrained.json names the base (a local folder or a hub id), the context length the run uses and
the tokenizer's fingerprint; a base whose tokenizer is not the recorded one is refused. The base's own
weights are guarded like a ministacks base's, by the fingerprint every stack and router records
(ministacks.stacks.fingerprint.base_fingerprint, read from the loaded modules).
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn as nn

from ministacks.io import RunFileError, atomic_write_json, read_json
from ministacks.lm.base import PRETRAINED_RECORD
from ministacks.lm.decode import decode
from ministacks.lm.model import ModelOutput

from .bases import inject_stacks, language_model, load_base
from .tokens import PretrainedTokenizer

FORMAT = "ministacks-pretrained"


def parameter_count(model: nn.Module) -> int:
    """Parameters of a base as trained, whatever its storage: a 4-bit weight packs two into a byte and
    counts as the shape it was quantized from."""
    total = 0
    for p in model.parameters():
        state = getattr(p, "quant_state", None)
        total += int(torch.Size(state.shape).numel()) if state is not None else p.numel()
    return total


def config_parameter_count(source: str | Path) -> int:
    """Parameters of the model a checkpoint's config describes, built on the meta device: no weights are read."""
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(source)))
    return parameter_count(model)


class PretrainedLM(nn.Module):
    """ministacks' Transformer interface over a Hugging Face causal LM (module docstring). `hf` keeps its own
    modules, so the stacked layers inject_stacks wrapped are this module's too."""

    logits_at_positions = True

    def __init__(self, hf: nn.Module, max_seq_len: int):
        super().__init__()
        self.hf = hf
        text = hf.config.get_text_config() if hasattr(hf.config, "get_text_config") else hf.config  # the LM's own
        limit = getattr(text, "max_position_embeddings", None)
        if limit is not None and max_seq_len > limit:
            raise ValueError(f"max_seq_len {max_seq_len} exceeds the base's {limit} positions")
        self.cfg = SimpleNamespace(max_seq_len=max_seq_len)
        # a head whose logits are not a plain linear map of the last hidden state cannot be applied at positions
        self._plain_head = getattr(text, "final_logit_softcapping", None) is None

    def num_params(self) -> int:
        return parameter_count(self.hf)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None, *,
                output_hidden_states: bool = False, return_logits: bool = True,
                at: torch.Tensor | None = None) -> ModelOutput:
        if labels is not None and at is not None:
            raise ValueError("forward takes labels (the mean loss over all positions) or at (some positions' logits), not both")
        if input_ids.shape[1] > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {input_ids.shape[1]} tokens exceeds max_seq_len={self.cfg.max_seq_len}")
        # ministacks' data lives on the CPU: the inputs go to the base's device, and what comes back (logits,
        # hidden states) returns to the inputs' (the loss stays where it is, for its backward pass)
        home, device = input_ids.device, self.device
        if device != home:
            input_ids = input_ids.to(device)
            labels = labels.to(device) if labels is not None else None
            at = at.to(device) if at is not None else None
            out = self._forward(input_ids, labels, output_hidden_states, return_logits, at)
            back = lambda t: t.to(home) if t is not None else None  # noqa: E731
            hidden = tuple(back(h) for h in out.hidden_states) if out.hidden_states is not None else None
            return ModelOutput(back(out.logits), out.loss, hidden)
        return self._forward(input_ids, labels, output_hidden_states, return_logits, at)

    @property
    def device(self) -> torch.device:
        return self.hf.get_input_embeddings().weight.device

    def _forward(self, input_ids, labels, output_hidden_states, return_logits, at) -> ModelOutput:
        if (at is not None or not return_logits) and self._plain_head:
            out = language_model(self.hf)(input_ids=input_ids, output_hidden_states=output_hidden_states,
                                          use_cache=False)
            # fp32 whatever the compute dtype, as the logits: the router reads them (a no-op on the CPU)
            hidden = tuple(h.float() for h in out.hidden_states) if output_hidden_states else None
            if not return_logits:
                return ModelOutput(None, None, hidden)
            h = out.last_hidden_state if at is None else out.last_hidden_state[at]
            return ModelOutput(self.hf.get_output_embeddings()(h).float(), None, hidden)
        # labels as ministacks aligns them (position t predicts labels[t+1]) are the Hugging Face convention too;
        # its loss upcasts the logits to fp32
        out = self.hf(input_ids=input_ids, labels=labels, output_hidden_states=output_hidden_states, use_cache=False)
        logits = out.logits.float()
        hidden = tuple(h.float() for h in out.hidden_states) if output_hidden_states else None
        return ModelOutput(logits if at is None else logits[at], out.loss, hidden)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, *, temperature: float = 0.0,
                 top_k: int | None = None, repetition_penalty: float = 1.0, eos_id: int | None = None,
                 generator: torch.Generator | None = None, use_cache: bool = True,
                 pad: torch.Tensor | None = None) -> torch.Tensor:
        """Transformer.generate's contract: [B, T] -> [B, T + n], n <= max_new_tokens, rows that finished padded
        with eos_id, the same loop and sampling rule (ministacks.lm.model.decode); the decoder's own KV cache.
        `pad` [B]: rows left-padded by that many filler tokens, given to the decoder as Hugging Face takes left
        padding (an attention mask without them, and each row's positions counted from its first real token)."""
        past = None  # the decoder's KV cache, carried from one call to the next

        def next_logits(step_input: torch.Tensor, seq: torch.Tensor) -> torch.Tensor:
            nonlocal past
            step = step_input if use_cache else seq
            extra = {}
            if pad is not None:
                real = (torch.arange(seq.shape[1], device=seq.device)[None, :] >= pad.to(seq.device)[:, None]).long()
                positions = (real.cumsum(-1) - 1).clamp(min=0)  # [B, L]
                extra = {"attention_mask": real, "position_ids": positions[:, -step.shape[1]:]}
            out = self.hf(input_ids=step, past_key_values=past, use_cache=use_cache, **extra)
            past = out.past_key_values if use_cache else None
            return out.logits[:, -1]

        seq = decode(next_logits, input_ids.to(self.device), max_new_tokens, self.cfg.max_seq_len,
                     temperature=temperature, top_k=top_k, repetition_penalty=repetition_penalty, eos_id=eos_id,
                     generator=generator)
        return seq.to(input_ids.device)


# -- the run folder's record ------------------------------------------------------------------------


def write_pretrained(out: str | Path, source: str | Path, max_seq_len: int, tokenizer: PretrainedTokenizer | None = None
                     ) -> dict:
    """OUT/base/pretrained.json: `source` (a local folder, stored absolute, or a hub id) is this folder's base.
    Writing the same record again is a no-op; another base into a folder that has one is refused."""
    out = Path(out)
    local = Path(source).expanduser()
    source = str(local.resolve()) if local.exists() else str(source)
    tok = tokenizer or PretrainedTokenizer.from_pretrained(source)
    record = {"format": FORMAT, "source": source, "max_seq_len": int(max_seq_len), "tokenizer": tok.fingerprint()}
    path = out / PRETRAINED_RECORD
    if path.is_file():
        old = read_json(path)
        if old != record:
            raise ValueError(f"{out} already holds the pretrained base {old.get('source')!r} "
                             f"({old.get('max_seq_len')} positions): use another --out, or delete it")
        return record
    if (out / "base" / "model.safetensors").is_file():
        raise ValueError(f"{out} holds a ministacks base pretrained from scratch: use another --out")
    atomic_write_json(path, record)
    return record


def open_pretrained(out: str | Path, quant: str = "nf4", device: str | None = None
                    ) -> tuple[PretrainedLM, PretrainedTokenizer]:
    """The base OUT/base/pretrained.json names, loaded frozen (NF4 by default), its projections wrapped, and its
    tokenizer, checked against the record."""
    path = Path(out) / PRETRAINED_RECORD
    record = read_json(path)
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise RunFileError(path, "is not a pretrained-base record: write it again with scale.model.write_pretrained")
    tok = PretrainedTokenizer.from_pretrained(record["source"])
    if tok.fingerprint() != record["tokenizer"]:
        raise RunFileError(path, f"names {record['source']}, whose tokenizer is now {tok.fingerprint()}, not the "
                                 f"recorded {record['tokenizer']}: the base changed under its stacks")
    hf = load_base(record["source"], quant=quant, device=device)
    inject_stacks(hf)
    return PretrainedLM(hf, record["max_seq_len"]), tok
