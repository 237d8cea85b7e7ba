"""Evaluation: bits per byte and perplexity from the LM cross-entropy alone.

The one BPB implementation: set-up checks, the trainer's evaluation and bench/ all call `bits_per_byte`, so their
numbers are comparable. Definition: the text is tokenised once, cut into non-overlapping windows of 512 tokens; in each
window every token after the first is scored; BPB = (sum of NLL in bits) / (UTF-8 bytes of the scored tokens).
Conversations are scored on their responses only (`responses_bits_per_byte`): each model reads its own rendering of
each held-out conversation and only the tokens of the assistant contents are scored, so teacher and student are
measured on the same response bytes (docs/CHAT.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from crosskd.data.chat import Message
from crosskd.data.chat_windows import ChatRenderer, ScoredSequence
from crosskd.data.encoding import encode_with_byte_spans
from crosskd.data.stdlib import heldout_text

BPB_WINDOW_TOKENS = 512


@dataclass(frozen=True)
class BPBResult:
    bits_per_byte: float
    perplexity: float
    nll_nats: float
    scored_tokens: int
    scored_bytes: int


def _scored_windows(tokenizer, text: str, window: int):
    """(ids [1, n], bytes of tokens 1..n-1) for each non-overlapping window of the tokenised text."""
    encoded = encode_with_byte_spans(tokenizer, text)
    token_bytes = encoded.byte_ends - encoded.byte_starts
    for start in range(0, len(encoded), window):
        ids = torch.from_numpy(encoded.ids[start : start + window]).unsqueeze(0)
        if ids.shape[1] < 2:
            continue
        yield ids, int(token_bytes[start + 1 : start + ids.shape[1]].sum())


def bits_per_byte(model, tokenizer, text: str, window: int = BPB_WINDOW_TOKENS, accelerator=None) -> BPBResult:
    """Held-out bits per byte of `model` on `text`.

    With an `accelerator` (several processes), the windows are shared out by index and the sums gathered, so every
    window is counted exactly once whatever the number of processes.
    """
    windows = ((ids, None, scored_bytes) for ids, scored_bytes in _scored_windows(tokenizer, text, window))
    return _scored_bpb(model, windows, accelerator)


def responses_bits_per_byte(model, sequences: list[ScoredSequence], accelerator=None) -> BPBResult:
    """Bits per byte and perplexity of `model` over the scored (response) tokens of `sequences`, its own tokens of
    held-out conversations (`TrainingCorpus.heldout_sequences`); shared out over processes like `bits_per_byte`."""
    scored = ((torch.from_numpy(sequence.ids).unsqueeze(0), torch.from_numpy(sequence.scored[:-1]),
               sequence.scored_bytes) for sequence in sequences if sequence.scored.any())
    return _scored_bpb(model, scored, accelerator)


@torch.no_grad()
def _scored_bpb(model, windows, accelerator) -> BPBResult:
    """The sums over (ids [1, n], scored positions bool [n-1] or None for all, scored bytes) windows."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    nll = torch.zeros((), dtype=torch.float64, device=device)
    tokens = torch.zeros((), dtype=torch.float64, device=device)
    nbytes = torch.zeros((), dtype=torch.float64, device=device)
    for index, (ids, scored, scored_bytes) in enumerate(windows):
        if index % world != rank:
            continue
        ids = ids.to(device)
        logits, targets = model(input_ids=ids).logits[0, :-1].float(), ids[0, 1:]
        if scored is not None:
            logits, targets = logits[scored.to(device)], targets[scored.to(device)]
        nll += torch.nn.functional.cross_entropy(logits, targets, reduction="sum").double()
        tokens += targets.shape[0]
        nbytes += scored_bytes
    if accelerator is not None and world > 1:
        nll, tokens, nbytes = (accelerator.reduce(t, reduction="sum") for t in (nll, tokens, nbytes))
    if was_training:
        model.train()
    if tokens.item() == 0:
        raise ValueError("the evaluation text is too short: it gives no window of two or more tokens to score")
    return BPBResult(
        bits_per_byte=nll.item() / math.log(2) / nbytes.item(),
        perplexity=math.exp(nll.item() / tokens.item()),
        nll_nats=nll.item(),
        scored_tokens=int(tokens.item()),
        scored_bytes=int(nbytes.item()),
    )


@torch.no_grad()
def chat_reply(model, renderer: ChatRenderer, messages: tuple[Message, ...], max_new_tokens: int) -> str:
    """The model's greedy next assistant turn after `messages`, rendered with its template (`renderer`); it ends at
    the first special token (the end of the turn) or after `max_new_tokens`."""
    device = next(model.parameters()).device
    ids = torch.from_numpy(renderer.prompt_ids(messages)).unsqueeze(0).to(device)
    stop = renderer.special_ids.tolist()
    output = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                            do_sample=False, eos_token_id=stop, pad_token_id=stop[0] if stop else None)
    return renderer.tokenizer.decode(output[0, ids.shape[1]:], skip_special_tokens=True)


def folder_heldout_bpb(folder: Path) -> float:
    """Held-out stdlib BPB of a model folder loaded the plain way (which also proves it reloads without crosskd)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer  # loaded only when a folder is measured

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    return bits_per_byte(model, tokenizer, heldout_text()).bits_per_byte
