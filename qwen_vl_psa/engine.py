"""QwenVLInference: load Qwen2.5-VL once, then answer about images and videos many times.

    m = QwenVLInference("Qwen/Qwen2.5-VL-7B-Instruct", use_psa=True)
    m.inference_video("talk.mp4", "Summarise the talk.", fps=1.0, stream=True)
    m.print_stats()

The public steps behind every entry point (single calls, sessions, corpus mode) are:

    media = m.load_video(src, fps=1.0)                 # or m.load_images([...]): a MediaInput
    opts = m.start_call(gen_options_dict)              # validated GenerationOptions, peak memory reset
    prompt = m.prompts.prepare(m.prompts.chat_text(media.with_question(q)), media.processor_kwargs)
    m.prompts.encode_media(prompt)                     # the vision encoder
    ans = m.answer(prompt.embeds, positions, m.new_cache(), prompt.ids, opts, stream, t_start)
    stats = m.collect_stats(prompt.ids, media.timings, {...}, prompt.vision_s, ans, media.info)

`ask(media, question, **gen)` runs them in order for one cold question; `ask_text(media, text)` does
the same for a prompt the caller rendered with the chat template (the server's conversations). A
stream callback may raise generation.StopGeneration to end an answer early (stop strings, cancel).
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Sequence, Union

import paddle
from paddleformers.transformers.cache_utils import DynamicCache

from psa_paddle import warmup as psa_warmup
from psa_paddle.versions import paddle_problem

from . import cpu_limits
from .errors import InputError, ModelLoadError
from .generation import TextStream, Timer, decode, prefill
from .loading import (
    DEFAULT_MODEL,
    load_model_and_processor,
    peak_memory,
    pick_device_and_dtype,
    quiet_libraries,
    resolve_model_dir,
    stop_token_ids,
)
from .media import Video, load_image, load_video
from .options import DEFAULT_FPS, GenerationOptions, check_prompt
from .prompt import MediaInput, Prompt, PromptBuilder
from .psa_router import apply_psa, install_router
from .report import format_stats, write_answer
from .session import MediaSession
from .vision_attention import install as install_chunked_vision

Stream = Union[bool, Callable[[str], None]]


@dataclass
class Answer:
    """One generated answer and its timings."""
    text: str
    token_ids: List[int]  # without the stop token
    stopped_by: str  # "eos", "max_tokens", or the reason of a generation.StopGeneration
    rope_deltas: Any  # continues the mrope positions for text after the prompt
    prefill_s: float
    decode_s: float
    ttft: float  # seconds from the call's start to the first token


class QwenVLInference:
    """Load Qwen2.5-VL once; describe images, several images and videos many times."""

    def __init__(self, model_name: str = DEFAULT_MODEL, dtype: str = "bfloat16", use_psa: bool = False,
                 psa_config=None, cache_dir: str = "./model_cache", hub: str = "huggingface",
                 min_pixels: Optional[int] = None, max_pixels: Optional[int] = None, verbose: bool = True,
                 timeout: Optional[float] = None):
        self.verbose = verbose
        self.timeout = timeout  # seconds for one media download (fetch.DEFAULT_TIMEOUT when None)
        self.cache_dir = cache_dir
        self.min_pixels, self.max_pixels = min_pixels, max_pixels
        quiet_libraries(verbose)
        problem = paddle_problem(paddle)
        if problem:
            raise ModelLoadError(problem)
        with Timer() as t:
            self.device, self.dtype = pick_device_and_dtype(dtype, self._warn)
            path = resolve_model_dir(model_name, cache_dir, hub)
            self.model_dir = path
            self.model, self.processor, self.checkpoint = load_model_and_processor(path, self.dtype, self.device)
        self.model_name = model_name
        self.prompts = PromptBuilder(self.model, self.processor, self.dtype)
        self.tokenizer = self.processor.tokenizer
        self.stop_ids = stop_token_ids(path, self.model, self.tokenizer)
        self.load_s = t.s
        self.psa_warmup_s = 0.0  # Triton kernel compilation at load (PSA on, GPU), not in any TTFT
        self._psa_warm = False
        self.stats: dict = {}
        self.last_token_ids: List[int] = []
        # The router is in place even without PSA: it gives prefill that continues a cache the
        # right causal offsets, which the model's own sdpa path does not.
        self.attention = install_router(self.model)
        if self.device == "cpu":
            # The eager vision attention builds [heads, N, N] scores per image: chunk it so
            # memory grows linearly with the pixels (vision_attention.py).
            install_chunked_vision(self.model)
        if use_psa or psa_config is not None:
            self.enable_psa(psa_config)

    @property
    def max_context(self) -> int:
        """The model's context length in tokens (the prompt builder holds it)."""
        return self.prompts.max_context

    # -- PSA on and off on the loaded model
    @property
    def psa(self):
        """The PSA state (config and stats) while PSA is on, else None."""
        return self.attention if self.attention.config is not None else None

    def enable_psa(self, psa_config=None):
        state = apply_psa(self.model, psa_config)
        if not self._psa_warm:
            # once per process: compile PSA's kernels for this model now, not in the first prefill
            tc = self.model.config.text_config
            head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
            self.psa_warmup_s = psa_warmup(tc.num_attention_heads, tc.num_key_value_heads, head_dim, self.dtype,
                                           state.config)
            self.load_s += self.psa_warmup_s
            self._psa_warm = True

    def disable_psa(self):
        self.attention.config = None

    # -- single questions
    def inference_image(self, image, prompt: str, **kw) -> str:
        """image: path, file:// or http(s) URL, data: URI or PIL image."""
        return self.inference_multi_image([image], prompt, **kw)

    def inference_multi_image(self, images: Sequence, prompt: str, *, min_pixels=None, max_pixels=None,
                              timeout=None, **kw) -> str:
        media = self.load_images(images, min_pixels=min_pixels, max_pixels=max_pixels, timeout=timeout)
        return self.ask(media, prompt, **kw)

    def inference_video(self, video, prompt: str, fps: float = DEFAULT_FPS, *, min_pixels=None, max_pixels=None,
                        max_frames=None, timeout=None, **kw) -> str:
        """video: file path, http(s) URL, a folder of frame images, or a media.Video already loaded
        (by media.load_video, e.g. in a prefetch thread; then fps and the pixel limits are its own)."""
        media = self.load_video(video, fps, min_pixels=min_pixels, max_pixels=max_pixels, max_frames=max_frames,
                                timeout=timeout)
        return self.ask(media, prompt, **kw)

    # -- several questions about the same media: the media prefix is prefilled once
    def open_video(self, video, fps: float = DEFAULT_FPS, *, conversation: bool = False, min_pixels=None,
                   max_pixels=None, max_frames=None, timeout=None) -> MediaSession:
        """A session over one video: `s.ask(question)` any number of times; see session.py.

        The video is loaded now; its vision encoding and prefill happen once, at the first question,
        and every question reuses them. conversation=True: each question sees the earlier turns.
        """
        media = self.load_video(video, fps, min_pixels=min_pixels, max_pixels=max_pixels, max_frames=max_frames,
                                timeout=timeout)
        return MediaSession(self, media, conversation=conversation)

    def open_images(self, images: Sequence, *, conversation: bool = False, min_pixels=None,
                    max_pixels=None, timeout=None) -> MediaSession:
        """A session over one or more images, as open_video."""
        media = self.load_images(images, min_pixels=min_pixels, max_pixels=max_pixels, timeout=timeout)
        return MediaSession(self, media, conversation=conversation)

    # -- the public steps
    def load_images(self, images: Sequence, *, min_pixels=None, max_pixels=None, timeout=None) -> MediaInput:
        """Fetch, decode and resize images (the engine's pixel limits unless given)."""
        if not images:
            raise InputError("no images given: pass at least one path, URL or PIL image")
        cap, on_downsize, notices = max_pixels or self.max_pixels, None, []
        asked_min = min_pixels or self.min_pixels or 0
        if cap is None and self.device == "cpu" and asked_min <= cpu_limits.CPU_IMAGE_MAX_PIXELS:
            cap = cpu_limits.CPU_IMAGE_MAX_PIXELS
            on_downsize = lambda *a: notices.append(self._notice(cpu_limits.cap_notice(*a)))  # noqa: E731
        with Timer() as t:
            pil = [load_image(im, min_pixels=min_pixels or self.min_pixels, max_pixels=cap,
                              cache_dir=self.media_cache, on_downsize=on_downsize, **self._timeout(timeout))
                   for im in images]
        notices += [self._notice(n) for im in pil for n in im.info.get("notices", ())]
        self.check_fits(sum((im.width // 14) * (im.height // 14) for im in pil), "the image(s)")
        media = MediaInput.images(pil, {"fetch_decode_resize_s": t.s})
        if notices:
            media.info["notices"] = notices  # in the stats, so --json shows them too
        return media

    def load_video(self, video, fps: float = DEFAULT_FPS, *, min_pixels=None, max_pixels=None,
                   max_frames=None, timeout=None) -> MediaInput:
        """Fetch, decode, sample and resize a video (a media.Video is taken as it is)."""
        v = video if isinstance(video, Video) else load_video(
            video, fps=fps, min_pixels=min_pixels or self.min_pixels, max_pixels=max_pixels or self.max_pixels,
            max_frames=max_frames, cache_dir=self.media_cache, progress=self.verbose, **self._timeout(timeout))
        t, h, w = v.frames.shape[:3]
        self.check_fits((t // 2) * (h // 14) * (w // 14), "the video")
        media = MediaInput.video(v)
        if getattr(v, "container_duration_s", None) is not None:
            media.info["container_duration_s"] = float(v.container_duration_s)  # vs video_duration_s: decoded
        if getattr(v, "notices", None):
            media.info["notices"] = [self._notice(n) for n in v.notices]
        return media

    def check_fits(self, patches: int, what: str, text_tokens: int = 256) -> None:
        """On the CPU: one InputError naming --max-pixels when the call's estimated working memory
        (cpu_limits.estimate_bytes) exceeds what the machine has available, before the processor,
        the vision encoder or the prefill allocate anything large."""
        if self.device != "cpu":
            return
        avail = cpu_limits.available_bytes()
        cfg = self.model.config
        need = cpu_limits.estimate_bytes(patches, text_tokens, cfg.vision_config, cfg.text_config)
        if avail is None or need <= avail:
            return
        raise InputError(f"{what} give {patches // 4} visual tokens, which need about {cpu_limits.gib(need)} "
                         f"of memory on the CPU but {cpu_limits.gib(avail)} is available; lower --max-pixels "
                         f"(max_pixels=; e.g. {cpu_limits.CPU_IMAGE_MAX_PIXELS}, the CPU default), or --fps / "
                         f"--max-frames for a video")

    def _timeout(self, timeout) -> dict:
        """timeout= for media.load_*: the call's, else the engine's, else media's default."""
        timeout = timeout if timeout is not None else self.timeout
        return {} if timeout is None else {"timeout": timeout}

    def _notice(self, msg: str) -> str:
        """One line on stderr (when verbose) about a choice made for the user; returned for the stats."""
        if self.verbose:
            print(f"notice: {msg}", file=sys.stderr, flush=True)
        return msg

    def start_call(self, gen: dict) -> GenerationOptions:
        """Validated generation options (seeded), and the per-call peak-memory counter reset."""
        opts = GenerationOptions(**gen).validate()
        if opts.seed is not None:
            paddle.seed(opts.seed)
        if self.device == "gpu":
            paddle.device.cuda.reset_max_memory_allocated()
        else:
            cpu_limits.reset_peak_rss()  # each call reports its own peak, not the process's
        return opts

    def new_cache(self):
        return DynamicCache(config=self.model.config.text_config)

    def ask(self, media: MediaInput, question: str, *, stream: Stream = False, **gen) -> str:
        """One question, cold: the whole prompt prefilled into a fresh cache."""
        check_prompt(question)
        return self.ask_text(media, self.prompts.chat_text(media.with_question(question)), stream=stream, **gen)

    def ask_text(self, media: MediaInput, text: str, *, stream: Stream = False, **gen) -> str:
        """ask() for a prompt already rendered with the chat template (a whole conversation, a
        system turn of its own: what the server builds), its media placeholders in `media`'s order.
        media may be MediaInput([], {}) for a text-only prompt."""
        opts = self.start_call(gen)
        t_start = time.perf_counter()
        prompt = self.prompts.prepare(text, media.processor_kwargs)
        self.prompts.encode_media(prompt)
        self.attention.reset()
        cache = self.new_cache()
        ans = self.answer(prompt.embeds, lambda: self.prompts.positions(prompt.inputs), cache, prompt.ids, opts,
                          stream, t_start)
        del cache
        self.last_token_ids = ans.token_ids
        self.stats = self.collect_stats(prompt.ids, media.timings, {"processor_s": prompt.processor_s},
                                        prompt.vision_s, ans, media.info)
        return ans.text

    def answer(self, embeds, positions, cache, seen: List[int], opts: GenerationOptions, stream: Stream,
               t_start: float) -> Answer:
        """Prefill `embeds` (the tokens after those already in `cache`) at `positions()` -> (pos,
        rope_deltas), then decode until a stop token or max_tokens, streaming the text."""
        callback = write_answer if stream is True else (stream or None)
        text_stream = TextStream(self.tokenizer, callback)
        with Timer() as t_pre:
            pos, rope_deltas = positions()
            logits = prefill(self.model, embeds, pos, cache)
        ttft = time.perf_counter() - t_start
        with Timer() as t_dec:
            out_ids, stopped_by = decode(self.model, logits, cache, rope_deltas, self.stop_ids, opts, text_stream,
                                         seen)
        text = text_stream.end()
        return Answer(text, out_ids, stopped_by, rope_deltas, t_pre.s, t_dec.s, ttft)

    def collect_stats(self, ids: List[int], pre: dict, proc: dict, vis_s: float, ans: Answer, info: dict) -> dict:
        """The stats dict of one answer. pre: media timings; proc: this call's own preprocessing steps."""
        n_out, decode_s = len(ans.token_ids), ans.decode_s
        stats = {
            "model": self.model_name, "device": self.device, "dtype": self.dtype,
            "model_load_s": self.load_s,
            "checkpoint": self.checkpoint,
            "psa_warmup_s": self.psa_warmup_s,
            "preprocess_s": sum(pre.values()) + sum(proc.values()), "preprocess": {**pre, **proc},
            "vision_encoder_s": vis_s,
            "prefill_s": ans.prefill_s,
            # from the call's start (processor, vision encoder, prefill), media already loaded ...
            "time_to_first_token_s": ans.ttft,
            # ... and counting this call's media fetch / decode / resize too (0 for reused media)
            "time_to_first_token_with_media_s": ans.ttft + sum(pre.values()),
            "decode_s": decode_s,
            # the first output token comes from the prefill; decoding makes the rest
            "decode_tokens_per_s": (max(n_out - 1, 0) / decode_s) if decode_s > 0 and n_out > 1 else None,
            "input_tokens": self.prompts.count_tokens(ids),
            "output_tokens": n_out,
            "stopped_by": ans.stopped_by,
            **peak_memory(self.device),
            **({"peak_memory_mb": cpu_limits.peak_rss_mb()} if self.device == "cpu" else {}),
            **info,
        }
        if self.psa is not None:
            stats["psa"] = self.psa.summary()
        return stats

    @property
    def media_cache(self) -> str:
        return os.path.join(self.cache_dir, "media")

    def _warn(self, msg: str):
        if self.verbose:
            print(f"warning: {msg}", file=sys.stderr)

    def print_stats(self, file=None):
        """The last call's numbers, one per line."""
        print(format_stats(self.stats), file=file or sys.stdout)


__all__ = ["QwenVLInference", "Answer", "Prompt"]
