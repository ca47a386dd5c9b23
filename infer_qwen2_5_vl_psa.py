"""Describe images and videos with Qwen2.5-VL on PaddlePaddle, optionally with PSA sparse prefill.

Command line:
    python infer_qwen2_5_vl_psa.py --type image --input photo.jpg --prompt "Describe this image"
    python infer_qwen2_5_vl_psa.py --type video --input clip.mp4 --fps 1 --use-psa

Notebook:
    from infer_qwen2_5_vl_psa import QwenVLInference
    m = QwenVLInference(model_name="Qwen/Qwen2.5-VL-3B-Instruct")
    m.inference_image("photo.jpg", "Describe this image")
    m.print_stats()
    with m.open_video("talk.mp4") as s:      # several questions, one vision encoding and prefill
        s.ask("Summarise"); s.ask("When is the demo?")
"""
import argparse
import json
import os
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Sequence, Union

from errors import InputError, QwenVLError
from loading import (DEFAULT_MODEL, HUBS, load_model_and_processor, peak_memory, pick_device_and_dtype,
                     quiet_libraries, resolve_model_dir, stop_token_ids, writable_model_dir)
from report import format_session_stats, format_stats



# ----------------------------------------------------------------------------- the pipeline's records

@dataclass
class Prompt:
    """A chat prompt after the processor: what the prefill needs, and what the stats count."""
    inputs: dict  # processor output: input_ids [1, L], grids (pixel tensors until the vision encoder ran)
    ids: List[int]  # input_ids as a list
    processor_s: float = 0.0
    embeds: Any = None  # [1, L, H] token embeddings with the vision features in, after _embed_prompt
    vision_s: float = 0.0


@dataclass
class Answer:
    """One generated answer and its timings."""
    text: str
    token_ids: List[int]  # without the stop token
    stopped_by: str  # "eos" or "max_tokens"
    rope_deltas: Any  # continues the mrope positions for text after the prompt
    prefill_s: float
    decode_s: float
    ttft: float  # seconds from the call's start to the first token


# ----------------------------------------------------------------------------- the class

class QwenVLInference:
    """Load Qwen2.5-VL once; describe images, several images and videos many times."""

    def __init__(self, model_name: str = DEFAULT_MODEL, dtype: str = "bfloat16", use_psa: bool = False,
                 psa_config=None, cache_dir: str = "./model_cache", hub: str = "huggingface",
                 min_pixels: Optional[int] = None, max_pixels: Optional[int] = None, verbose: bool = True):
        from generation import Timer

        self.verbose = verbose
        self.cache_dir = cache_dir
        self.min_pixels, self.max_pixels = min_pixels, max_pixels
        quiet_libraries(verbose)
        with Timer() as t:
            self.device, self.dtype = pick_device_and_dtype(dtype, self._warn)
            path = resolve_model_dir(model_name, cache_dir, hub)
            self.model_dir = path
            self.model, self.processor = load_model_and_processor(writable_model_dir(path, cache_dir),
                                                                  self.dtype, self.device)
        self.model_name = model_name
        self.tokenizer = self.processor.tokenizer
        self.stop_ids = stop_token_ids(path, self.model, self.tokenizer)
        self.max_context = int(getattr(self.model.config.text_config, "max_position_embeddings", 128000))
        self.load_s = t.s
        self.stats: dict = {}
        from qwen2_5_vl_psa_attention import install_router

        # The router is in place even without PSA: it gives prefill that continues a cache the
        # right causal offsets, which the model's own sdpa path does not.
        self.attention = install_router(self.model)
        if use_psa or psa_config is not None:
            self.enable_psa(psa_config)

    # -- PSA on and off on the loaded model
    @property
    def psa(self):
        """The PSA state (config and stats) while PSA is on, else None."""
        return self.attention if self.attention.config is not None else None

    def enable_psa(self, psa_config=None):
        from qwen2_5_vl_psa_attention import apply_psa

        apply_psa(self.model, psa_config)

    def disable_psa(self):
        self.attention.config = None

    # -- public entry points
    def inference_image(self, image, prompt: str, **kw) -> str:
        """image: path, file:// or http(s) URL, data: URI or PIL image."""
        return self.inference_multi_image([image], prompt, **kw)

    def inference_multi_image(self, images: Sequence, prompt: str, *, min_pixels=None, max_pixels=None,
                              **kw) -> str:
        content, media, pre, extra = self._load_images(images, min_pixels, max_pixels)
        return self._run(content + [{"type": "text", "text": prompt}], media, pre, extra=extra, **kw)

    def inference_video(self, video, prompt: str, fps: float = 1.0, *, min_pixels=None, max_pixels=None,
                        max_frames=None, **kw) -> str:
        """video: file path, http(s) URL, a folder of frame images, or a media.Video already loaded
        (by media.load_video, e.g. in a prefetch thread; then fps and the pixel limits are its own)."""
        content, media, pre, extra = self._load_video(video, fps, min_pixels, max_pixels, max_frames)
        return self._run(content + [{"type": "text", "text": prompt}], media, pre, extra=extra, **kw)

    # -- several questions about the same media: the media prefix is prefilled once
    def open_video(self, video, fps: float = 1.0, *, conversation: bool = False, min_pixels=None,
                   max_pixels=None, max_frames=None) -> "session.MediaSession":
        """A session over one video: `s.ask(question)` any number of times; see session.py.

        The video is loaded now; its vision encoding and prefill happen once, at the first question,
        and every question reuses them. conversation=True: each question sees the earlier turns.
        """
        from session import MediaSession

        content, media, pre, extra = self._load_video(video, fps, min_pixels, max_pixels, max_frames)
        return MediaSession(self, content, media, pre, extra, conversation=conversation, kind="video")

    def open_images(self, images: Sequence, *, conversation: bool = False, min_pixels=None,
                    max_pixels=None) -> "session.MediaSession":
        """A session over one or more images, as open_video."""
        from session import MediaSession

        content, media, pre, extra = self._load_images(images, min_pixels, max_pixels)
        return MediaSession(self, content, media, pre, extra, conversation=conversation, kind="images")

    # -- media loading: -> (content placeholders, processor media, preprocessing timings, stats extra)
    def _load_images(self, images: Sequence, min_pixels, max_pixels):
        from generation import Timer
        from media import load_image

        if not images:
            raise InputError("no images given: pass at least one path, URL or PIL image")
        with Timer() as t:
            pil = [load_image(im, min_pixels=min_pixels or self.min_pixels,
                              max_pixels=max_pixels or self.max_pixels, cache_dir=self._media_cache())
                   for im in images]
        return [{"type": "image"} for _ in pil], {"images": pil}, {"fetch_decode_resize_s": t.s}, {}

    def _load_video(self, video, fps, min_pixels, max_pixels, max_frames):
        from media import Video, load_video

        v = video if isinstance(video, Video) else load_video(
            video, fps=fps, min_pixels=min_pixels or self.min_pixels, max_pixels=max_pixels or self.max_pixels,
            max_frames=max_frames, cache_dir=self._media_cache(), progress=self.verbose)
        pre = {k: v.timings[k] for k in v.timings}
        extra = {"frames": int(v.frames.shape[0]), "frame_size": [int(v.frames.shape[1]), int(v.frames.shape[2])],
                 "sample_fps": float(v.sample_fps), "video_duration_s": float(v.duration_s)}
        return [{"type": "video"}], {"videos": [v.frames], "fps": v.sample_fps}, pre, extra

    # -- the one pipeline behind all entry points (sessions use the same steps, see session.py):
    #    _prepare (chat template, processor, context check) -> _embed_prompt (vision encoder)
    #    -> _answer (positions, prefill, decode, stream) -> _collect_stats
    def _run(self, content, media, pre_timings, *, extra=None, stream: Union[bool, Callable[[str], None]] = False,
             **gen) -> str:
        """One question, cold: the whole prompt prefilled into a fresh cache."""
        self._check_prompt(content[-1]["text"])
        opts = self._options(gen)
        self._start_call()
        t_start = time.perf_counter()
        prompt = self._prepare(self._chat_text(content), media)
        self._embed_prompt(prompt)
        self.attention.reset()
        cache = self._new_cache()
        ans = self._answer(prompt.embeds, lambda: self._positions(prompt.inputs), cache, prompt.ids, opts,
                           stream, t_start)
        del cache
        self.last_token_ids = ans.token_ids
        self.stats = self._collect_stats(prompt.ids, pre_timings, {"processor_s": prompt.processor_s},
                                         prompt.vision_s, ans, extra or {})
        return ans.text

    def _check_prompt(self, text):
        if not isinstance(text, str) or not text.strip():
            raise InputError("the prompt is empty: say what you want to know, e.g. --prompt 'Describe this image'")

    def _options(self, gen: dict) -> "generation.GenerationOptions":
        """max_tokens, temperature, top_p, top_k, repetition_penalty, seed -> validated options."""
        from generation import GenerationOptions
        import paddle

        opts = GenerationOptions(**gen)
        opts.validate()
        if opts.seed is not None:
            paddle.seed(opts.seed)
        return opts

    def _start_call(self):
        import paddle

        if self.device == "gpu":
            paddle.device.cuda.reset_max_memory_allocated()

    def _new_cache(self):
        from paddleformers.transformers.cache_utils import DynamicCache

        return DynamicCache(config=self.model.config.text_config)

    def _chat_text(self, content, history=()) -> str:
        """The chat template as text: the user turn `content` (media placeholders, text) and the
        generation prompt; `history` is earlier messages in front of it."""
        messages = list(history) + [{"role": "user", "content": content}]
        return self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def _prepare(self, text: str, media) -> "Prompt":
        """Processor over the chat text (media placeholders expanded), then the context check."""
        from generation import Timer

        with Timer() as t:
            inputs = self._encode_text(text, media)
        n_in = inputs["input_ids"].shape[1]
        if n_in + 1 > self.max_context:
            raise InputError(f"media plus prompt is {n_in} tokens, over the model's context of {self.max_context}: "
                             "lower --fps or --max-pixels")
        return Prompt(inputs, inputs["input_ids"][0].tolist(), processor_s=t.s)

    def _embed_prompt(self, prompt: "Prompt"):
        """Run the vision encoder once: prompt.embeds; the pixel tensors are dropped afterwards."""
        from generation import Timer

        with Timer() as t:
            prompt.embeds = self._embed(prompt.inputs)
        prompt.vision_s = t.s
        for key in ("pixel_values", "pixel_values_videos"):
            prompt.inputs.pop(key, None)

    def _answer(self, embeds, positions, cache, seen: List[int], opts, stream, t_start: float) -> "Answer":
        """Prefill `embeds` (the tokens after those already in `cache`) at `positions()` -> (pos,
        rope_deltas), then decode until a stop token or max_tokens, streaming the text."""
        from generation import TextStream, Timer, decode, prefill

        callback = (lambda s: (sys.stdout.write(s), sys.stdout.flush())) if stream is True else (stream or None)
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

    def _encode(self, content, media) -> dict:
        """Chat template + processor: token ids with the media placeholders expanded, pixel tensors."""
        return self._encode_text(self._chat_text(content), media)

    def _encode_text(self, text: str, media) -> dict:
        # media.py already sampled and resized (multiples of 28 within the pixel limits): the
        # processor must not resize or sample again.
        kw = {"text": [text], "return_tensors": "pd", "do_resize": False}
        if "images" in media:
            kw["images"] = media["images"]
        if "videos" in media:
            kw.update(videos=media["videos"], do_sample_frames=False, fps=media["fps"])
        return dict(self.processor(**kw))

    def _embed(self, inputs) -> "paddle.Tensor":
        """Token embeddings with the vision encoder's outputs scattered into the placeholders."""
        import paddle

        core = self.model.model
        ids = inputs["input_ids"]
        embeds = self.model.get_input_embeddings()(ids)
        for kind, pix, grid in (("image", "pixel_values", "image_grid_thw"),
                                ("video", "pixel_values_videos", "video_grid_thw")):
            if inputs.get(pix) is None:
                continue
            feats = getattr(core, f"get_{kind}_features")(inputs[pix].astype(self.dtype), inputs[grid])
            feats = paddle.concat(feats, axis=0).astype(embeds.dtype)
            token = getattr(self.model.config, f"{kind}_token_id")
            mask = (ids == token).unsqueeze(-1).expand_as(embeds)
            embeds = embeds.masked_scatter(mask, feats)
        return embeds

    def _embed_ids(self, ids: List[int]) -> "paddle.Tensor":
        """Embeddings [1, n, H] of text tokens (no media placeholders among them)."""
        import paddle

        return self.model.get_input_embeddings()(paddle.to_tensor([ids], dtype="int64"))

    def _positions(self, inputs):
        """3-D mrope positions [3, B, L] and the delta that continues them for generated text."""
        pos, deltas = self.model.model.get_rope_index(
            inputs["input_ids"], inputs.get("image_grid_thw"), inputs.get("video_grid_thw"),
            second_per_grid_ts=inputs.get("second_per_grid_ts"), attention_mask=inputs.get("attention_mask"))
        return pos, deltas

    def _collect_stats(self, ids: List[int], pre: dict, proc: dict, vis_s: float, ans: "Answer", extra: dict):
        """The stats dict of one answer. pre: media timings; proc: this call's own preprocessing steps."""
        import numpy as np

        arr = np.asarray(ids)
        n_img = int((arr == self.model.config.image_token_id).sum())
        n_vid = int((arr == self.model.config.video_token_id).sum())
        n_all, n_out, decode_s = int(arr.shape[0]), len(ans.token_ids), ans.decode_s
        stats = {
            "model": self.model_name, "device": self.device, "dtype": self.dtype,
            "model_load_s": self.load_s,
            "preprocess_s": sum(pre.values()) + sum(proc.values()), "preprocess": {**pre, **proc},
            "vision_encoder_s": vis_s,
            "prefill_s": ans.prefill_s,
            "time_to_first_token_s": ans.ttft,
            "decode_s": decode_s,
            # the first output token comes from the prefill; decoding makes the rest
            "decode_tokens_per_s": (max(n_out - 1, 0) / decode_s) if decode_s > 0 and n_out > 1 else None,
            "input_tokens": {"text": n_all - n_img - n_vid, "image": n_img, "video": n_vid, "total": n_all},
            "output_tokens": n_out,
            "stopped_by": ans.stopped_by,
            **peak_memory(self.device),
            **extra,
        }
        if self.psa is not None:
            stats["psa"] = self.psa.summary()
        return stats

    def _media_cache(self) -> str:
        return os.path.join(self.cache_dir, "media")

    def _warn(self, msg: str):
        if self.verbose:
            print(f"warning: {msg}", file=sys.stderr)

    def print_stats(self, file=None):
        """The last call's numbers, one per line."""
        print(format_stats(self.stats), file=file or sys.stdout)


# ----------------------------------------------------------------------------- command line

def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        description="Describe images and videos with Qwen2.5-VL on PaddlePaddle (PSA sparse prefill optional).",
        epilog="Try it without a download: python -m tools.make_tiny_checkpoint tiny && "
               "python infer_qwen2_5_vl_psa.py --model tiny --type image --input photo.jpg")
    ap.add_argument("--model", default=DEFAULT_MODEL,
                    help=f"hub id or local folder in the Hugging Face layout (default {DEFAULT_MODEL})")
    ap.add_argument("--hub", default="huggingface", choices=HUBS, help="where hub ids are downloaded from")
    ap.add_argument("--cache-dir", default="./model_cache", help="downloads go here (default ./model_cache)")
    ap.add_argument("--type", choices=("image", "video"), help="input kind (default: guessed from --input)")
    ap.add_argument("--input", nargs="+", action="extend",
                    help="image(s): path, file:// or http(s) URL, data: URI; video: file, URL or frame folder")
    ap.add_argument("--prompt", action="append", default=None,
                    help="what to ask (default: 'Describe this image/video.'); give it several times to ask "
                         "several questions about the same input, each answered in turn")
    ap.add_argument("--prompts-file", default=None,
                    help="a text file of questions, one per line, all about the same --input")
    ap.add_argument("--conversation", action="store_true",
                    help="with several prompts: each question sees the earlier questions and answers "
                         "(default: independent questions)")
    ap.add_argument("--max-tokens", type=int, default=512, help="most tokens to generate (default 512)")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"),
                    help="weights and activations (GPU; the CPU always uses float32)")
    ap.add_argument("--fps", type=float, default=1.0, help="video frames sampled per second (default 1.0)")
    ap.add_argument("--max-frames", type=int, default=None, help="cap on sampled video frames")
    ap.add_argument("--max-pixels", type=int, default=None, help="largest frame/image area in pixels after resize")
    ap.add_argument("--min-pixels", type=int, default=None, help="smallest frame/image area in pixels after resize")
    g = ap.add_argument_group("generation")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0, help="0 = off")
    g.add_argument("--repetition-penalty", type=float, default=1.0, help="1 = off")
    g.add_argument("--seed", type=int, default=None, help="sampling seed, for repeatable samples")
    g.add_argument("--no-stream", action="store_true", help="print the answer at the end, not as it is generated")
    g.add_argument("--json", action="store_true", help="print one JSON object {answer, stats} and nothing else")
    p = ap.add_argument_group("PSA (Pyramid Sparse Attention) for long prefill")
    p.add_argument("--use-psa", action="store_true", help="sparse prefill attention in the language model")
    p.add_argument("--query-block", type=int, default=128, help="PSA block size (default 128)")
    p.add_argument("--xattn-stride", type=int, default=16, help="PSA importance-estimate stride (default 16)")
    p.add_argument("--psa-min-seq-len", type=int, default=None,
                   help="below this many tokens PSA falls back to dense attention")
    b = ap.add_argument_group("corpus mode: one prompt over many inputs")
    b.add_argument("--batch", default=None,
                   help="a JSONL file (input, type, prompt, id, fps, max_pixels per line) or a text file "
                        "with one path or URL per line")
    b.add_argument("--output", default=None, help="JSONL results file for --batch (resumable)")
    b.add_argument("--merge", action="store_true",
                   help="only merge the per-rank part files of --output into --output, then exit")
    b.add_argument("--prefetch", type=int, default=2, help="inputs prepared ahead of the GPU (default 2)")
    ap.add_argument("--debug", action="store_true", help="show tracebacks")
    return ap


def psa_config_from_args(args):
    if not args.use_psa:
        return None
    from psa_paddle import AttentionConfig

    kw = {"query_block": args.query_block, "xattn_stride": args.xattn_stride}
    if args.psa_min_seq_len is not None:
        kw["min_seq_len"] = args.psa_min_seq_len
    return AttentionConfig(**kw)


def infer_type(inputs: List[str]) -> str:
    from media import guess_media_type

    kinds = {guess_media_type(i) for i in inputs}
    if len(kinds) == 1 and None not in kinds:
        return kinds.pop()
    raise InputError("cannot tell whether the input is an image or a video: pass --type image or --type video")


def collect_prompts(args, kind: str) -> List[str]:
    """--prompt (repeatable) then --prompts-file lines; the default question when none is given."""
    prompts = list(args.prompt or [])
    if args.prompts_file:
        try:
            with open(args.prompts_file, encoding="utf-8") as f:
                prompts += [ln.strip() for ln in f if ln.strip()]
        except OSError as e:
            raise InputError(f"cannot read --prompts-file {args.prompts_file}: {e.strerror}") from e
    return prompts or [f"Describe this {kind}."]


def run_questions(model, args, kind, prompts, gen) -> int:
    """Several questions about one input: the media prefix is prefilled once (see session.py).

    Each question is printed as a header line, its answer follows (streamed unless --no-stream),
    its stats go to stderr; the session's totals come last. --json: one object
    {"answers": [{"prompt", "answer", "stats"}...], "session": {...}} and nothing else."""
    if kind == "video":
        session = model.open_video(args.input[0], fps=args.fps, max_frames=args.max_frames,
                                   conversation=args.conversation)
    else:
        session = model.open_images(args.input, conversation=args.conversation)
    with session:
        for i, prompt in enumerate(prompts, 1):
            if not args.json:
                print(f"### question {i}/{len(prompts)}: {prompt}", flush=True)
            answer = session.ask(prompt, **gen)
            if not args.json:
                print("" if gen["stream"] else answer, flush=True)
                print(format_stats(model.stats), file=sys.stderr, flush=True)
        summary = session.stats
    if args.json:
        answers = [{"prompt": t["prompt"], "answer": t["answer"], "stats": t["stats"]} for t in session.turns]
        print(json.dumps({"answers": answers, "session": summary}, ensure_ascii=False))
    else:
        print(format_session_stats(summary), file=sys.stderr)
    return 0


def run_cli(args) -> int:
    if args.batch or args.merge:
        from corpus import run_batch

        return run_batch(args)
    if not args.input:
        raise InputError("no --input given: pass an image or video path or URL")
    if args.fps <= 0:
        raise InputError(f"--fps must be > 0, got {args.fps}")
    kind = args.type or infer_type(args.input)
    if kind == "video" and len(args.input) != 1:
        raise InputError(f"--type video takes one --input, got {len(args.input)}")
    prompts = collect_prompts(args, kind)
    for i, p in enumerate(prompts, 1):
        if len(prompts) > 1 and not p.strip():
            raise InputError(f"prompt {i} of {len(prompts)} is empty: say what you want to know")
    psa_cfg = psa_config_from_args(args)
    model = QwenVLInference(args.model, dtype=args.dtype, use_psa=args.use_psa, psa_config=psa_cfg,
                            cache_dir=args.cache_dir, hub=args.hub, min_pixels=args.min_pixels,
                            max_pixels=args.max_pixels, verbose=not args.json)
    stream = not args.no_stream and not args.json
    gen = dict(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
               repetition_penalty=args.repetition_penalty, seed=args.seed, stream=stream)
    if len(prompts) > 1:
        return run_questions(model, args, kind, prompts, gen)
    if kind == "video":
        answer = model.inference_video(args.input[0], prompts[0], fps=args.fps, max_frames=args.max_frames,
                                       **gen)
    else:
        answer = model.inference_multi_image(args.input, prompts[0], **gen)
    if args.json:
        print(json.dumps({"answer": answer, "stats": model.stats}, ensure_ascii=False))
        return 0
    print("" if stream else answer)
    model.print_stats(file=sys.stderr)
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if not args.debug:
        warnings.filterwarnings("ignore")
    quiet_libraries(verbose=not args.json)  # before media.py imports paddleformers
    from psa_paddle import ConfigError

    try:
        return run_cli(args)
    except (QwenVLError, ConfigError) as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
