"""Several questions about one video (or one set of images) for the price of one prefill.

    with m.open_video("talk.mp4", fps=1.0) as s:      # m: a QwenVLInference
        s.ask("Summarise the talk.")
        s.ask("When is the demo?")                     # reuses the video's vision encoding and KV cache
    s.stats                                            # prefix tokens, reuse hits, time saved

The chat prompt splits into a media prefix (system turn, user header, the vision tokens: the
template up to and including the last <|vision_end|>) and a question suffix ("<question><|im_end|>
\\n<|im_start|>assistant\\n"). Special tokens are split points of the tokenizer, so the two parts
tokenised apart give the ids of the whole. The prefix goes through the processor and the vision
encoder once and is prefilled once into a KV cache (at the first question); each question then
prefills only its own tokens after it, with mrope positions taken from get_rope_index over the
whole ids.

Independent questions (the default) each see the media and their own question, never the earlier
answers: after each answer the cache is cropped back to the cached prefix. With
conversation=True each question sees the earlier turns: the cache keeps the answers and the next
turn continues it ("<|im_end|>\\n<|im_start|>user\\n<question>...", text positions after the
answer's).

With PSA on, how much of the prefix is cached comes from psa_router.reusable_prefix,
so that every answer equals the answer of a cold single-question run; the session keeps the PSA
setting it was opened with (enable or disable PSA before opening it).
"""
import contextlib
import dataclasses
import time
from typing import Callable, List, Union

import paddle

from .errors import InputError, SessionClosedError
from .generation import Timer, mrope_decode_positions, prefill
from .options import check_prompt
from .prompt import MediaInput, template_parts
from .psa_router import reusable_prefix


class MediaSession:
    """Questions about media loaded once. Make one with QwenVLInference.open_video / open_images.

    ask(question, **generation options) -> answer text (stream=True prints it as it comes).
    turns: [{"prompt", "answer", "stats"}] so far; stats: the session's reuse numbers.
    close() (or leaving a `with` block) releases the KV cache; a closed session cannot be asked.
    """

    def __init__(self, model, media: MediaInput, *, conversation: bool = False):
        self.model = model
        self.kind = media.kind
        self.conversation = bool(conversation)
        self._extra, self._pre = dict(media.info), dict(media.timings)
        self._parts = template_parts(model.prompts, media.content)
        if self.conversation and self._parts.turn_separator is None:
            raise InputError("this model's chat template does not continue a conversation turn by turn: "
                             "open the session without conversation=True")
        # processor over the prefix: ids with the media placeholders expanded, pixel tensors (the
        # vision encoder runs at the first question); also the context check for the media
        self._prompt = model.prompts.prepare(self._parts.prefix, media.processor_kwargs)
        self.prefix_ids: List[int] = self._prompt.ids
        self.prefix_tokens = len(self.prefix_ids)
        # the attention this session's cache is made with, and how much of the prefix it caches
        self._psa_config = model.attention.config
        self.cached_tokens, self._prefix_config = reusable_prefix(self._psa_config, self.prefix_tokens)
        self._cache = None  # the KV cache: the prefix's first cached_tokens (+ the conversation)
        self._tail = None  # embeddings of prefix tokens after cached_tokens, prefilled with each question
        self._cache_ids: List[int] = []  # conversation: the ids in the cache
        self._pending: List[int] = []  # conversation: generated ids not fed to the cache yet
        self._rope_deltas = None
        self.prompt_ids: List[int] = []  # the last question's whole prompt, as the model saw it
        self.turns: List[dict] = []
        self.hits = 0
        self.time_saved_s = 0.0
        self.vision_encoder_s = 0.0
        self.prefix_prefill_s = 0.0
        self.closed = False

    # -- asking
    def ask(self, question: str, *, stream: Union[bool, Callable[[str], None]] = False, **gen) -> str:
        """Answer one question about the session's media; generation options as inference_video."""
        self._check_open()
        check_prompt(question)
        return self._ask(question, question + self._parts.question_tail, stream, gen)

    @property
    def prefix_text(self) -> str:
        """The chat-template text the cached prefix stands for (system turn, user header, media)."""
        return self._parts.prefix

    def ask_text(self, text: str, *, stream: Union[bool, Callable[[str], None]] = False, **gen) -> str:
        """Independent sessions: answer the prompt `prefix_text + text`, where `text` is chat-template
        text the caller rendered (e.g. the question and later turns of a whole conversation, as the
        server does); the prefix is reused as by ask()."""
        if self.conversation:
            raise InputError("ask_text is for independent sessions: a conversation session renders its own turns")
        return self._ask(text, text, stream, gen)

    def _ask(self, question: str, suffix: str, stream, gen: dict) -> str:
        self._check_open()
        m = self.model
        opts = m.start_call(gen)
        t_start = time.perf_counter()
        with self._attention(self._psa_config):
            m.attention.reset()
            first = self._cache is None
            if first:
                self._fill_prefix()
            with Timer() as t_tok:
                prompt_ids, start = self._prompt_for(question, suffix)
            if len(prompt_ids) + 1 > m.max_context:
                raise InputError(self._too_long(prompt_ids))
            embeds, positions = self._new_inputs(prompt_ids, start)
            try:
                ans = m.answer(embeds, positions, self._cache, prompt_ids, opts, stream, t_start)
            except BaseException:
                self._cache.crop(start)  # nothing of a failed question stays in the cache
                raise
            self.prompt_ids = prompt_ids
            self._after_answer(prompt_ids, ans)
            stats = self._stats_for(prompt_ids, start, first, t_tok.s, ans)
        m.stats, m.last_token_ids = stats, ans.token_ids
        self.turns.append({"prompt": question, "answer": ans.text, "stats": stats})
        return ans.text

    def reset(self):
        """Conversation mode: forget the earlier turns (the media stays cached)."""
        self._check_open()
        if self._cache is not None:
            self._cache.crop(self.cached_tokens)
        self._cache_ids, self._pending, self._rope_deltas = [], [], None

    def _fill_prefix(self):
        """Vision encoder, then prefill of the cached part of the prefix: once per session."""
        m, p = self.model, self._prompt
        if p.embeds is None:
            m.prompts.encode_media(p)
            self.vision_encoder_s = p.vision_s
        cache, n = m.new_cache(), self.cached_tokens
        with Timer() as t:
            if n:
                pos, _ = m.prompts.positions(p.inputs)  # the prefix's own positions: those of the whole prompt
                with self._attention(self._prefix_config):
                    prefill(m.model, p.embeds[:, :n], pos[:, :, :n], cache)
        self.prefix_prefill_s = t.s
        self._tail = p.embeds[:, n:].clone()  # a copy: the whole prefix's embeddings can go
        p.embeds = None
        self._cache = cache

    def _prompt_for(self, question: str, suffix: str) -> (List[int], int):
        """The question's whole prompt ids, and how many of them the cache already holds.
        suffix: the text after the prefix of a first (or independent) question."""
        tok = self.model.tokenizer
        if not self.conversation or not self._cache_ids:
            ids = self.prefix_ids + tok(suffix, add_special_tokens=False)["input_ids"]
            return ids, self.cached_tokens
        # the previous answer's stop token was not fed: the turn separator starts with <|im_end|>
        text = self._parts.turn_separator + question + self._parts.question_tail
        ids = self._cache_ids + self._pending + tok(text, add_special_tokens=False)["input_ids"]
        return ids, len(self._cache_ids)

    def _new_inputs(self, prompt_ids: List[int], start: int):
        """Embeddings of prompt_ids[start:] and a positions() for _answer."""
        m = self.model
        if start == self.cached_tokens:  # the prefix's uncached tail (if any), then the question
            embeds = m.prompts.embed_ids(prompt_ids[self.prefix_tokens:])
            if self._tail.shape[1]:
                embeds = paddle.concat([self._tail, embeds], axis=1)
            inputs = {k: v for k, v in self._prompt.inputs.items()
                      if k in ("image_grid_thw", "video_grid_thw", "second_per_grid_ts")}
            inputs["input_ids"] = paddle.to_tensor([prompt_ids], dtype="int64")

            def positions():  # mrope over the whole ids, sliced: the media's grids shape them
                pos, deltas = m.prompts.positions(inputs)
                return pos[:, :, start:], deltas
            return embeds, positions
        n = len(prompt_ids) - start  # a later conversation turn: text positions after the answer's
        deltas = self._rope_deltas
        return m.prompts.embed_ids(prompt_ids[start:]), lambda: (mrope_decode_positions(start, deltas, n), deltas)

    def _after_answer(self, prompt_ids: List[int], ans):
        if not self.conversation:
            self._cache.crop(self.cached_tokens)  # rewind: the next question sees the media only
            return
        # decode fed every generated token but the last one when max_tokens ended it
        fed = self._cache.get_seq_length() - len(prompt_ids)
        self._cache_ids = prompt_ids + ans.token_ids[:fed]
        self._pending = ans.token_ids[fed:]
        self._rope_deltas = ans.rope_deltas

    # -- numbers
    def _stats_for(self, prompt_ids, start, first, tokenize_s, ans) -> dict:
        m = self.model
        saved = 0.0 if first else self.vision_encoder_s + self.prefix_prefill_s
        self.hits += not first
        self.time_saved_s += saved
        if first:  # this question paid for the prefix: its stats read like a cold run's
            proc = {"processor_s": self._prompt.processor_s, "tokenize_s": tokenize_s}
            ans = dataclasses.replace(ans, prefill_s=self.prefix_prefill_s + ans.prefill_s)
            stats = m.collect_stats(prompt_ids, self._pre, proc, self.vision_encoder_s, ans, self._extra)
        else:
            stats = m.collect_stats(prompt_ids, {}, {"tokenize_s": tokenize_s}, 0.0, ans, self._extra)
        stats["reuse"] = {
            "mode": self.mode, "question": len(self.turns) + 1,
            "prefix_tokens": self.prefix_tokens, "cached_prefix_tokens": self.cached_tokens,
            "prefilled_tokens": len(prompt_ids) - start + (self.cached_tokens if first else 0),
            "hit": not first, "hits": self.hits, "time_saved_s": saved,
        }
        return stats

    @property
    def mode(self) -> str:
        return "conversation" if self.conversation else "independent"

    @property
    def stats(self) -> dict:
        """What the session reused: prefix tokens, reuse hits, time saved against cold prefills."""
        return {
            "media": self.kind, "mode": self.mode, "questions": len(self.turns), "reuse_hits": self.hits,
            "prefix_tokens": self.prefix_tokens, "cached_prefix_tokens": self.cached_tokens,
            "cache_tokens": self._cache.get_seq_length() if self._cache is not None else 0,
            "preprocess_s": sum(self._pre.values()) + self._prompt.processor_s,
            "vision_encoder_s": self.vision_encoder_s, "prefix_prefill_s": self.prefix_prefill_s,
            # what each reuse hit did not pay again: the prefix's vision encoder and prefill
            "time_saved_s": self.time_saved_s,
            "psa": self._psa_config is not None, "closed": self.closed, **self._extra,
        }

    # -- life cycle
    def close(self):
        """Release the KV cache and the media; later asks raise SessionClosedError."""
        if self._cache is not None:
            for layer in self._cache.layers:  # also frees the tensors if someone kept the cache object
                layer.keys = layer.values = None
                layer.is_initialized = False
        self._cache = self._tail = self._rope_deltas = None
        self._prompt.inputs, self._prompt.embeds = {}, None  # pixel tensors, if no question came
        self.closed = True

    def __enter__(self):
        self._check_open()
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        state = "closed" if self.closed else f"{len(self.turns)} questions"
        return f"<MediaSession {self.kind}, {self.mode}, {self.prefix_tokens} prefix tokens, {state}>"

    def _check_open(self):
        if self.closed:
            raise SessionClosedError("this session is closed (its cache was released): open a new one with "
                                     "open_video / open_images")

    def _too_long(self, ids) -> str:
        if self.conversation and self._cache_ids:
            return (f"the conversation is {len(ids)} tokens, over the model's context of {self.model.max_context}: "
                    "reset() it or open a new session")
        return self.model.prompts.too_long(ids, "media plus question")

    @contextlib.contextmanager
    def _attention(self, config):
        """The router's PSA config set to `config` for a block (the model's own restored after)."""
        state = self.model.attention
        saved, state.config = state.config, config
        try:
            yield
        finally:
            state.config = saved
