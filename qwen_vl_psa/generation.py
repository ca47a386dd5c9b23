"""Prefill, then token-by-token decoding over a KV cache, with timers around each phase.

We run our own loop instead of paddleformers' `generate` because the product needs what that
loop hides: the vision encoder, the prefill and the decode timed separately, a prefill that
continues an existing cache (several questions about one video), and a streaming callback.
"""
import time
from dataclasses import dataclass
from typing import Callable, List, Optional

import numpy as np
import paddle

from .options import GenerationOptions


class StopGeneration(Exception):
    """Raised by a stream callback to end the answer early: decoding stops after the token just
    streamed, and the answer (the tokens so far) is returned with stopped_by = `reason`
    (e.g. "stop" for a stop string, "cancelled" for a client that went away). The callback is not
    called again for that answer."""

    def __init__(self, reason: str = "cancelled"):
        super().__init__(reason)
        self.reason = reason


def synchronize():
    """Wait for queued device work, so host clocks measure it (no-op on CPU)."""
    if paddle.device.get_device().startswith("gpu"):
        paddle.device.synchronize()


class Timer:
    """`with Timer() as t: ...; t.s` measures device work too (synchronises at both ends)."""

    def __enter__(self):
        synchronize()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        synchronize()
        self.s = time.perf_counter() - self.t0


class Sampler:
    """Greedy, or temperature / top-k / top-p sampling with a repetition penalty, on host logits."""

    def __init__(self, opts: GenerationOptions):
        self.opts = opts
        self.rng = np.random.default_rng(opts.seed)

    def __call__(self, logits: paddle.Tensor, seen: List[int]) -> int:
        o = self.opts
        if o.temperature == 0 and o.repetition_penalty == 1.0:
            return int(paddle.argmax(logits, axis=-1).item())  # stays on the device
        x = logits.astype("float32").numpy().astype(np.float64)
        if o.repetition_penalty != 1.0 and seen:
            # The CTRL rule, as transformers applies it: shrink positive logits, grow negative ones.
            ids = np.unique(np.asarray(seen))
            ids = ids[ids < x.shape[0]]
            x[ids] = np.where(x[ids] > 0, x[ids] / o.repetition_penalty, x[ids] * o.repetition_penalty)
        if o.temperature == 0:
            return int(np.argmax(x))
        x = x / o.temperature
        if o.top_k and o.top_k < x.shape[0]:
            kth = np.partition(x, -o.top_k)[-o.top_k]
            x = np.where(x < kth, -np.inf, x)
        p = np.exp(x - x.max())
        p /= p.sum()
        if o.top_p < 1.0:
            order = np.argsort(-p)
            keep = np.cumsum(p[order]) - p[order] < o.top_p  # always keeps the top token
            mask = np.zeros_like(p, dtype=bool)
            mask[order[keep]] = True
            p = np.where(mask, p, 0.0)
            p /= p.sum()
        return int(self.rng.choice(p.shape[0], p=p))


class TextStream:
    """Turns a growing list of token ids into text deltas, holding back half-decoded characters."""

    def __init__(self, tokenizer, callback: Optional[Callable[[str], None]]):
        self.tokenizer, self.callback = tokenizer, callback
        self.ids: List[int] = []
        self.printed = ""

    def put(self, token_id: int):
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return  # a multi-byte character is not complete yet
        self._emit(text)

    def end(self) -> str:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        try:
            self._emit(text)
        except StopGeneration:  # the held-back rest hit a stop: the answer is over anyway
            pass
        return text

    def _emit(self, text: str):
        if self.callback and len(text) > len(self.printed) and text.startswith(self.printed):
            self.callback(text[len(self.printed):])
        self.printed = text


def mrope_decode_positions(cache_len: int, rope_deltas: paddle.Tensor, n: int = 1) -> paddle.Tensor:
    """Positions [3, B, n] of n new text tokens after cache_len cached ones (all three axes equal)."""
    deltas = rope_deltas.astype("int64").reshape([-1])  # [B]; a text-only prompt's is 0-d
    pos = paddle.arange(cache_len, cache_len + n, dtype="int64").reshape([1, 1, n])
    pos = pos + deltas.reshape([1, -1, 1])
    return pos.expand([3, deltas.shape[0], n])


@dataclass
class GenerationResult:
    token_ids: List[int]
    text: str
    prefill_s: float
    decode_s: float
    stopped_by: str  # "eos", "max_tokens", or a StopGeneration reason


def prefill(model, inputs_embeds, position_ids, cache) -> paddle.Tensor:
    """Run the language model over new tokens; returns the last position's logits [B, V]."""
    out = model(inputs_embeds=inputs_embeds, position_ids=position_ids, past_key_values=cache,
                use_cache=True, logits_to_keep=1, return_dict=True)
    return out.logits[:, -1, :]


def decode(model, first_logits, cache, rope_deltas, stop_ids, opts: GenerationOptions,
           stream: TextStream, seen: List[int]) -> (List[int], str):
    """Sample from first_logits, then feed one token at a time until a stop id or max_tokens (or
    the stream callback raises StopGeneration)."""
    sampler = Sampler(opts)
    logits, out_ids, stopped_by = first_logits, [], "max_tokens"
    embed = model.get_input_embeddings()
    while True:
        tok = sampler(logits[0], seen + out_ids)
        if tok in stop_ids:
            stopped_by = "eos"
            break
        out_ids.append(tok)
        try:
            stream.put(tok)
        except StopGeneration as stop:
            stream.callback = None  # the text so far is the answer; end() must not call back again
            stopped_by = stop.reason
            break
        if len(out_ids) >= opts.max_tokens:
            break
        pos = mrope_decode_positions(cache.get_seq_length(), rope_deltas)
        ids = paddle.to_tensor([[tok]], dtype="int64")
        logits = prefill(model, embed(ids), pos, cache)
    return out_ids, stopped_by
