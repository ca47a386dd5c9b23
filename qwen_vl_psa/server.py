"""`qwen-vl-psa serve`: the model behind a local OpenAI-compatible API (chat completions).

    python infer_qwen2_5_vl_psa.py serve --model Qwen/Qwen2.5-VL-3B-Instruct --port 8000
    # then any OpenAI client: base_url="http://127.0.0.1:8000/v1"

Routes: POST /v1/chat/completions (text, image_url and video_url parts; stream=true answers as
server-sent events), GET /v1/models, GET /health, GET /stats (queue, prefix cache, counters).
The application itself (FastAPI on uvicorn, the generation worker, the prefix cache) is in
server_app.py; this module parses the command line and imports nothing heavy before that, so
`serve --help` and bad arguments answer at once.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings

from .errors import InputError, QwenVLError
from .loading import DEFAULT_MODEL, HUBS
from .options import DEFAULT_FPS, DEFAULT_MAX_TOKENS, check_fps, psa_config_from_args

API_KEY_ENV = "QWEN_VL_PSA_API_KEY"


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="qwen-vl-psa serve",
        description="Serve Qwen2.5-VL (PaddlePaddle, PSA sparse prefill optional) through an OpenAI-compatible "
                    "API: POST /v1/chat/completions, GET /v1/models, GET /health.",
        epilog="Try it without a download: python -m qwen_vl_psa.tiny_checkpoint tiny && "
               "python infer_qwen2_5_vl_psa.py serve --model tiny --port 8000")
    ap.add_argument("--model", default=DEFAULT_MODEL,
                    help=f"hub id or local folder in the Hugging Face layout (default {DEFAULT_MODEL})")
    ap.add_argument("--served-model-name", default=None,
                    help="the name clients pass as `model` (default: --model as given)")
    ap.add_argument("--host", default="127.0.0.1",
                    help="address to bind (default 127.0.0.1: this machine only; 0.0.0.0 exposes the server "
                         "to the network, use --api-key then)")
    ap.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    ap.add_argument("--api-key", default=None,
                    help=f"require `Authorization: Bearer KEY` on /v1 routes and /stats (default: the "
                         f"{API_KEY_ENV} environment variable, else no key)")
    ap.add_argument("--allowed-local-media-path", default=None, metavar="DIR",
                    help="let requests name local files (file:// URLs or paths) inside DIR; without it the "
                         "server never reads its own files for a client")
    ap.add_argument("--hub", default="huggingface", choices=HUBS, help="where hub ids are downloaded from")
    ap.add_argument("--cache-dir", default="./model_cache", help="model downloads go here (default ./model_cache)")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"),
                    help="weights and activations (GPU; the CPU always uses float32)")
    d = ap.add_argument_group("defaults for requests (a request can set fps, min_pixels, max_pixels, max_frames)")
    d.add_argument("--fps", type=float, default=DEFAULT_FPS,
                   help=f"video frames sampled per second (default {DEFAULT_FPS})")
    d.add_argument("--max-frames", type=int, default=None, help="cap on sampled video frames")
    d.add_argument("--max-pixels", type=int, default=None, help="largest frame/image area in pixels after resize")
    d.add_argument("--min-pixels", type=int, default=None, help="smallest frame/image area in pixels after resize")
    d.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS,
                   help=f"tokens generated when a request gives no max_tokens (default {DEFAULT_MAX_TOKENS})")
    lim = ap.add_argument_group("limits")
    lim.add_argument("--max-queue", type=int, default=8,
                     help="requests that may wait while one generates; more get 429 (default 8)")
    lim.add_argument("--max-request-mb", type=float, default=64,
                     help="largest request body, data: URIs included (default 64 MiB); larger get 413")
    lim.add_argument("--max-media-mb", type=float, default=256,
                     help="largest image or video a request may name (default 256 MiB)")
    lim.add_argument("--media-timeout", type=float, default=30,
                     help="seconds to fetch one media URL, redirects included (default 30); slower get 504")
    lim.add_argument("--prefix-cache-mb", type=float, default=2048,
                     help="memory for cached media prefixes (KV cache of the media's tokens, least recently "
                          "used evicted first; default 2048 MiB; 0 turns the cache off)")
    p = ap.add_argument_group("PSA (Pyramid Sparse Attention) for long prefill")
    p.add_argument("--use-psa", action="store_true",
                   help="PSA on by default (a request can still set use_psa true or false)")
    p.add_argument("--query-block", type=int, default=None, help="PSA block size (default: AttentionConfig's, 128)")
    p.add_argument("--xattn-stride", type=int, default=None,
                   help="PSA importance-estimate stride (default: AttentionConfig's, 16)")
    p.add_argument("--psa-min-seq-len", type=int, default=None,
                   help="below this many tokens PSA falls back to dense attention (default: AttentionConfig's, 8192)")
    ap.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    ap.add_argument("--debug", action="store_true", help="show tracebacks of start-up errors")
    return ap


def check_args(args) -> None:
    """The argument checks that need no model: before anything heavy is imported."""
    if not 0 <= args.port <= 65535:
        raise InputError(f"--port must be 0..65535, got {args.port}")
    check_fps(args.fps)
    for name in ("max_request_mb", "max_media_mb", "media_timeout"):
        if getattr(args, name) <= 0:
            raise InputError(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    if args.max_queue < 0:
        raise InputError(f"--max-queue must be >= 0, got {args.max_queue}")
    if args.prefix_cache_mb < 0:
        raise InputError(f"--prefix-cache-mb must be >= 0 (0 = off), got {args.prefix_cache_mb}")
    if args.max_tokens < 1:
        raise InputError(f"--max-tokens must be at least 1, got {args.max_tokens}")
    if args.allowed_local_media_path is not None and not os.path.isdir(args.allowed_local_media_path):
        raise InputError(f"--allowed-local-media-path {args.allowed_local_media_path} is not a folder")


def settings_from_args(args):
    from .server_media import MediaLimits
    from .server_protocol import ServeSettings

    psa_cfg = psa_config_from_args(args)  # None when --use-psa is off
    return ServeSettings(
        served_model_name=args.served_model_name or args.model,
        api_key=args.api_key if args.api_key is not None else (os.environ.get(API_KEY_ENV) or None),
        max_queue=args.max_queue,
        max_request_bytes=int(args.max_request_mb * (1 << 20)),
        media=MediaLimits(max_bytes=int(args.max_media_mb * (1 << 20)), timeout_s=args.media_timeout,
                          allowed_local_dir=args.allowed_local_media_path),
        prefix_cache_bytes=int(args.prefix_cache_mb * (1 << 20)),
        default_max_tokens=args.max_tokens,
        fps=args.fps, min_pixels=args.min_pixels, max_pixels=args.max_pixels, max_frames=args.max_frames,
        use_psa=args.use_psa, psa_config=psa_cfg)


def serve(args) -> int:
    check_args(args)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = settings_from_args(args)
    log = logging.getLogger("qwen_vl_psa.server")
    log.info("loading %s ...", args.model)
    import uvicorn  # the server stack and the model: only now that the arguments are known

    from .engine import QwenVLInference
    from .server_app import create_app

    engine = QwenVLInference(args.model, dtype=args.dtype, use_psa=args.use_psa, psa_config=settings.psa_config,
                             cache_dir=args.cache_dir, hub=args.hub, verbose=False)
    app = create_app(engine, settings)
    if args.host not in ("127.0.0.1", "localhost", "::1") and settings.api_key is None:
        log.warning("listening on %s without --api-key: anyone who can reach this port can use the model",
                    args.host)
    log.info("serving %s as %r on http://%s:%d/v1 (PSA %s, prefix cache %.0f MiB, queue %d)", args.model,
             settings.served_model_name, args.host, args.port, "on" if args.use_psa else "off",
             settings.prefix_cache_bytes / (1 << 20), settings.max_queue)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=5)
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if not args.debug:
        warnings.filterwarnings("ignore")
    try:
        return serve(args)
    except QwenVLError as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def __getattr__(name):
    # create_app / ServeSettings on first use: importing this module stays light.
    if name in ("create_app", "ServeSettings"):
        from . import server_app
        return getattr(server_app, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if __name__ == "__main__":
    sys.exit(main())
