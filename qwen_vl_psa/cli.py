"""The command line: `python infer_qwen2_5_vl_psa.py ...`, `qwen-vl-psa ...`, `python -m qwen_vl_psa ...`.

Parsing and the argument checks import no Paddle; the engine (and with it the model stack) is
imported only once the arguments are known to be good.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings
from typing import List

from .errors import InputError, QwenVLError
from .inputs import check_cli_args, guess_media_type, read_prompts_file
from .loading import DEFAULT_MODEL, HUBS
from .options import DEFAULT_FPS, DEFAULT_MAX_TOKENS, GenerationOptions, check_fps, default_prompt, psa_config_from_args
from .report import format_session_stats, format_stats, terminal_safe

_GEN = GenerationOptions()  # the defaults the help text shows


class _Parser(argparse.ArgumentParser):
    """argparse's errors as one `error:` line (exit 2), not a usage block of twenty lines."""

    def error(self, message):
        self.exit(2, f"error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(
        description="Describe images and videos with Qwen2.5-VL on PaddlePaddle (PSA sparse prefill optional).",
        epilog="Try it without a download: python -m qwen_vl_psa.tiny_checkpoint tiny && "
               "python infer_qwen2_5_vl_psa.py --model tiny --type image --input photo.jpg. "
               "Serve it to OpenAI clients: infer_qwen2_5_vl_psa.py serve --model DIR_OR_ID (serve --help)")
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
    ap.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS,
                    help=f"most tokens to generate (default {DEFAULT_MAX_TOKENS})")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"),
                    help="weights and activations (GPU; the CPU always uses float32)")
    ap.add_argument("--fps", type=float, default=DEFAULT_FPS,
                    help=f"video frames sampled per second (default {DEFAULT_FPS})")
    ap.add_argument("--max-frames", type=int, default=None, help="cap on sampled video frames")
    ap.add_argument("--max-pixels", type=int, default=None, help="largest frame/image area in pixels after resize")
    ap.add_argument("--min-pixels", type=int, default=None, help="smallest frame/image area in pixels after resize")
    ap.add_argument("--timeout", type=float, default=None,
                    help="seconds allowed for each media download in total (default 300); a server must also "
                         "answer within 30 s and send at least 1 KB/s")
    g = ap.add_argument_group("generation")
    g.add_argument("--temperature", type=float, default=_GEN.temperature, help="0 = greedy (default)")
    g.add_argument("--top-p", type=float, default=_GEN.top_p)
    g.add_argument("--top-k", type=int, default=_GEN.top_k, help="0 = off")
    g.add_argument("--repetition-penalty", type=float, default=_GEN.repetition_penalty, help="1 = off")
    g.add_argument("--seed", type=int, default=None, help="sampling seed, for repeatable samples")
    g.add_argument("--no-stream", action="store_true", help="print the answer at the end, not as it is generated")
    g.add_argument("--json", action="store_true", help="print one JSON object {answer, stats} and nothing else")
    p = ap.add_argument_group("PSA (Pyramid Sparse Attention) for long prefill")
    p.add_argument("--use-psa", action="store_true", help="sparse prefill attention in the language model")
    p.add_argument("--query-block", type=int, default=None, help="PSA block size (default: AttentionConfig's, 128)")
    p.add_argument("--xattn-stride", type=int, default=None,
                   help="PSA importance-estimate stride (default: AttentionConfig's, 16)")
    p.add_argument("--psa-min-seq-len", type=int, default=None,
                   help="below this many tokens PSA falls back to dense attention (default: AttentionConfig's, 8192)")
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


def infer_type(inputs: List[str]) -> str:
    kinds = {guess_media_type(i) for i in inputs}
    if len(kinds) == 1 and None not in kinds:
        return kinds.pop()
    raise InputError("cannot tell whether the input is an image or a video: pass --type image or --type video")


def collect_prompts(args, kind: str) -> List[str]:
    """--prompt (repeatable) then --prompts-file lines; the default question when none is given."""
    prompts = list(args.prompt or [])
    if args.prompts_file:
        prompts += read_prompts_file(args.prompts_file)  # an empty file is an error, not the default question
    return prompts or [default_prompt(kind)]


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
                print("" if gen["stream"] else terminal_safe(answer), flush=True)
                print(format_stats(model.stats), file=sys.stderr, flush=True)
        summary = session.stats
    if args.json:
        answers = [{"prompt": t["prompt"], "answer": t["answer"], "stats": t["stats"]} for t in session.turns]
        print(json.dumps({"answers": answers, "session": summary}, ensure_ascii=False))
    else:
        print(format_session_stats(summary), file=sys.stderr)
    return 0


def run_cli(args) -> int:
    check_cli_args(args)  # paths, URLs, options, prompt files: in milliseconds, before the model stack
    if args.batch or args.merge:
        from .corpus import run_batch  # the model stack: only now that the arguments are known

        return run_batch(args)
    if not args.input:
        raise InputError("no --input given: pass an image or video path or URL")
    check_fps(args.fps)
    kind = args.type or infer_type(args.input)
    if kind == "video" and len(args.input) != 1:
        raise InputError(f"--type video takes one --input, got {len(args.input)}")
    prompts = collect_prompts(args, kind)
    for i, p in enumerate(prompts, 1):
        if len(prompts) > 1 and not p.strip():
            raise InputError(f"prompt {i} of {len(prompts)} is empty: say what you want to know")
    psa_cfg = psa_config_from_args(args)
    gen = GenerationOptions.from_args(args).as_dict()
    from .engine import QwenVLInference  # the model stack: only now that the arguments are known

    model = QwenVLInference(args.model, dtype=args.dtype, use_psa=args.use_psa, psa_config=psa_cfg,
                            cache_dir=args.cache_dir, hub=args.hub, min_pixels=args.min_pixels,
                            max_pixels=args.max_pixels, verbose=not args.json, timeout=args.timeout)
    stream = not args.no_stream and not args.json
    gen["stream"] = stream
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
    print("" if stream else terminal_safe(answer))
    model.print_stats(file=sys.stderr)
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["serve"]:  # `qwen-vl-psa serve ...`: the OpenAI-compatible server (server.py)
        from .server import main as serve_main

        return serve_main(argv[1:])
    args = build_parser().parse_args(argv)
    if not args.debug:
        warnings.filterwarnings("ignore")
        # The modelscope / aistudio downloaders log every retry (27 s of them without a network);
        # their levels are reset when they load, so filter their records instead.
        os.environ.setdefault("AISTUDIO_LOG", "critical")  # read at its import; a user's setting wins
        for name in ("api", "download", "legacy_api", "openapi", "cache", "compat"):
            logging.getLogger(f"modelscope_hub.{name}").addFilter(lambda r: r.levelno >= logging.ERROR)
    try:
        return run_cli(args)
    except QwenVLError as e:
        if args.debug:
            raise
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)  # always one line
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
