"""Corpus mode: one model, one prompt (or one per item), many inputs; resumable and sharded.

    python infer_qwen2_5_vl_psa.py --batch inputs.jsonl --output results.jsonl [--use-psa ...]
    python -m paddle.distributed.launch --devices 0,1,2,3 infer_qwen2_5_vl_psa.py --batch ... --output ...
    python infer_qwen2_5_vl_psa.py --merge --batch inputs.jsonl --output results.jsonl

The batch file is JSON Lines (one object per line: `input`, and optionally `type`, `prompt`, `id`,
`fps`, `max_pixels`, `min_pixels`, `max_frames`, `timeout`) or plain text (one path or URL per line; blank
lines and lines starting with # are skipped). Ids default to the line number (JSONL) or the path
(plain text) and must be unique.

Output: one JSON line per input, `{"id", "input", "type", "prompt", "answer", "stats"}` or, for an
input that failed, `{"id", "input", "type", "prompt", "error", "error_type"}`. A line is written
with one write() and fsync'd, so a killed run leaves only complete lines (an incomplete last line
is cut off on the next start); running the same command again skips every id already written.

Sharding: PADDLE_TRAINER_ID / PADDLE_TRAINERS_NUM (set by paddle.distributed.launch) pick this
process's share (input k goes to rank k % world); each rank writes OUTPUT.rank<r>-of-<w>. No
collective is initialised. Whichever rank finishes and finds every input id written merges all
results into OUTPUT in input order (completeness is checked on the files' content, so a rank
that died never blocks the others, and stale state from an older run cannot trigger a merge).

Throughput: --prefetch background threads load (download, decode, sample, resize) items ahead of
the one being generated; items are answered as their loads finish, so a slow or stalled download
(which fails at its --timeout / per-item "timeout") holds back no item after it.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import glob
import json
import os
import queue
import re
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple, Union

import paddle
from tqdm import tqdm

from . import cpu_limits
from .engine import QwenVLInference
from .errors import InputError, QwenVLError
from .fetch import user_mode
from .media import guess_media_type, load_image, load_video
from .options import GenerationOptions, check_fps, default_prompt, psa_config_from_args

FIELDS = ("input", "type", "prompt", "id", "fps", "max_pixels", "min_pixels", "max_frames", "timeout")
JSONL_EXTS = (".jsonl", ".ndjson", ".json")
_PART_RE = re.compile(r"\.rank(\d+)-of-(\d+)$")


# ----------------------------------------------------------------------------- the batch file

@dataclass
class Item:
    index: int  # position among the inputs (0-based): the output order and the shard key
    line: int  # 1-based line in the batch file, for messages
    id: Union[int, str]
    input: str
    type: Optional[str] = None
    prompt: Any = None
    fps: Any = None
    max_pixels: Any = None
    min_pixels: Any = None
    max_frames: Any = None
    timeout: Any = None

    @property
    def key(self) -> str:
        return id_key(self.id)


def id_key(value: Any) -> str:
    """Ids compare as text: 3 and "3" are the same id."""
    return str(value)


def _read_lines(path: str) -> List[str]:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise InputError(f"cannot read --batch {path}: {e.strerror or e}") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise InputError(f"--batch {path} is not UTF-8 text (byte {e.start}): save it as UTF-8") from None
    return text.split("\n")


def read_batch_file(path: str, warn: Callable[[str], None] = lambda m: None) -> List[Item]:
    """All inputs of a batch file, in order. Format errors and duplicate ids raise InputError
    naming the line; per-item values (type, fps, pixel limits) are checked when the item runs."""
    lines = _read_lines(path)
    first = next((ln.strip() for ln in lines if ln.strip()), "")
    jsonl = path.lower().endswith(JSONL_EXTS) or first.startswith("{")
    items: List[Item] = []
    unknown: Dict[str, int] = {}
    for lineno, raw in enumerate(lines, 1):
        text = raw.strip()
        if not text or (not jsonl and text.startswith("#")):
            continue
        if not jsonl:
            items.append(Item(len(items), lineno, text, text))
            continue
        items.append(_parse_json_line(path, lineno, text, len(items), unknown))
    if unknown:
        where = ", ".join(f"{k!r} (line {n})" for k, n in list(unknown.items())[:5])
        warn(f"--batch {path}: unknown fields ignored: {where}; known fields: {', '.join(FIELDS)}")
    if not items:
        raise InputError(f"--batch {path} lists no inputs: give one JSON object or one path per line")
    _check_unique_ids(path, items)
    return items


def _parse_json_line(path: str, lineno: int, text: str, index: int, unknown: Dict[str, int]) -> Item:
    where = f"--batch {path} line {lineno}"
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(f"{where} is not valid JSON ({e.msg}, column {e.colno}); each line must be one "
                         f'object like {{"input": "photo.jpg", "prompt": "Describe this image."}}') from None
    if not isinstance(obj, dict):
        raise InputError(f"{where} is a JSON {type(obj).__name__}, not an object like "
                         f'{{"input": "photo.jpg"}}')
    src = obj.get("input")
    if not isinstance(src, str) or not src.strip():
        raise InputError(f'{where} has no "input" (a path or URL as a non-empty string)')
    if "id" in obj and (isinstance(obj["id"], bool) or not isinstance(obj["id"], (int, str))
                        or obj["id"] == ""):
        raise InputError(f'{where}: "id" must be a non-empty string or an integer, got {obj["id"]!r}')
    for k in obj:
        if k not in FIELDS:
            unknown.setdefault(k, lineno)
    return Item(index, lineno, obj.get("id", lineno), src.strip(), type=obj.get("type"), prompt=obj.get("prompt"),
                fps=obj.get("fps"), max_pixels=obj.get("max_pixels"), min_pixels=obj.get("min_pixels"),
                max_frames=obj.get("max_frames"), timeout=obj.get("timeout"))


def _check_unique_ids(path: str, items: List[Item]):
    seen: Dict[str, List[int]] = {}
    for it in items:
        seen.setdefault(it.key, []).append(it.line)
    dups = [(k, ls) for k, ls in seen.items() if len(ls) > 1]
    if dups:
        shown = "; ".join(f"id {k!r} on lines {', '.join(map(str, ls))}" for k, ls in dups[:3])
        more = f" and {len(dups) - 3} more" if len(dups) > 3 else ""
        raise InputError(f"--batch {path} has duplicate ids: {shown}{more}; every input needs its own "
                         '"id" (resuming and merging go by id)')


# ----------------------------------------------------------------------------- ranks and files

def rank_and_world(env=None) -> Tuple[int, int]:
    """This process's rank and the number of processes, from paddle.distributed.launch's
    variables (PADDLE_TRAINER_ID / PADDLE_TRAINERS_NUM); (0, 1) when started alone."""
    env = os.environ if env is None else env
    rank, world = env.get("PADDLE_TRAINER_ID"), env.get("PADDLE_TRAINERS_NUM")
    if rank is None and world is None:
        return 0, 1
    try:
        r, w = int(rank if rank is not None else 0), int(world if world is not None else 1)
    except ValueError:
        raise InputError(f"PADDLE_TRAINER_ID={rank!r} / PADDLE_TRAINERS_NUM={world!r} are not integers") from None
    if w < 1 or not 0 <= r < w:
        raise InputError(f"PADDLE_TRAINER_ID={r} is not a rank of PADDLE_TRAINERS_NUM={w} processes")
    return r, w


def select_device_from_env(launch_env: dict, env=None):
    """One GPU per process: the launcher sets FLAGS_selected_gpus (which paddle.set_device("gpu")
    reads); processes started by hand with only PADDLE_LOCAL_RANK get that GPU of this machine."""
    env = os.environ if env is None else env
    if env.get("FLAGS_selected_gpus") or launch_env.get("PADDLE_LOCAL_RANK") is None:
        return
    if paddle.device.is_compiled_with_cuda():
        count = paddle.device.cuda.device_count()
        if count > 1:
            env["FLAGS_selected_gpus"] = str(int(launch_env["PADDLE_LOCAL_RANK"]) % count)


# What paddle.distributed.launch sets to describe the job. Paddle and paddleformers read them too:
# with PADDLE_TRAINERS_NUM > 1, from_pretrained calls init_parallel_env() and waits on a TCP store
# for every rank. Each corpus process is independent, so it hides them while it runs.
LAUNCH_VARS = ("PADDLE_TRAINER_ID", "PADDLE_TRAINERS_NUM", "PADDLE_GLOBAL_RANK", "PADDLE_GLOBAL_SIZE",
               "PADDLE_LOCAL_RANK", "PADDLE_LOCAL_SIZE", "PADDLE_RANK_IN_NODE", "PADDLE_NNODES",
               "PADDLE_TRAINER_ENDPOINTS", "PADDLE_CURRENT_ENDPOINT", "PADDLE_MASTER", "PADDLE_DISTRI_BACKEND")


@contextlib.contextmanager
def single_process_view():
    """Within: the launcher's job variables are out of os.environ (yielded, for our own use), so
    Paddle sees one process of world size 1 and initialises no collective."""
    saved = {k: os.environ.pop(k) for k in LAUNCH_VARS if k in os.environ}
    _forget_parallel_env()
    try:
        yield saved
    finally:
        os.environ.update(saved)
        _forget_parallel_env()


def _forget_parallel_env():
    """paddle.distributed caches a ParallelEnv (rank, world size) read from the environment on first use."""
    mod = sys.modules.get("paddle.distributed.parallel")
    if mod is not None and getattr(mod, "_global_parallel_env", None) is not None:
        mod._global_parallel_env = None


def part_path(output: str, rank: int, world: int) -> str:
    """Where this rank writes: the output itself for one process, else OUTPUT.rank<r>-of-<w>."""
    return output if world == 1 else f"{output}.rank{rank}-of-{world}"


def part_files(output: str) -> List[str]:
    """Every rank's part file of any world size (from this run or an older one)."""
    found = [p for p in glob.glob(glob.escape(output) + ".rank*-of-*") if _PART_RE.search(p)]
    return sorted(found, key=lambda p: tuple(int(x) for x in _PART_RE.search(p).groups())[::-1])


def iter_results(path: str) -> Iterator[Tuple[str, bytes, dict]]:
    """(id key, line bytes with its newline, record) for each complete, valid line of a results
    file; an unterminated last line (a write cut short) is not a result."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return
    end = data.rfind(b"\n") + 1
    for raw in data[:end].split(b"\n")[:-1]:
        try:
            rec = json.loads(raw)
        except ValueError:
            continue
        if isinstance(rec, dict) and "id" in rec:
            yield id_key(rec["id"]), raw + b"\n", rec


def cut_partial_line(path: str) -> int:
    """Truncate a trailing unterminated line (left by a kill mid-write); returns the bytes cut."""
    try:
        with open(path, "r+b") as f:
            data = f.read()
            end = data.rfind(b"\n") + 1
            if end < len(data):
                f.truncate(end)
                f.flush()
                os.fsync(f.fileno())
                return len(data) - end
    except FileNotFoundError:
        pass
    return 0


def done_keys(output: str) -> set:
    keys = set()
    for path in [output] + part_files(output):
        keys.update(k for k, _, _ in iter_results(path))
    return keys


def _json_default(o):
    if hasattr(o, "item"):  # numpy / paddle scalars
        return o.item()
    if hasattr(o, "tolist"):
        return o.tolist()
    return str(o)


def encode_line(record: dict) -> bytes:
    try:
        return (json.dumps(record, ensure_ascii=False, default=_json_default) + "\n").encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate in decoded text: escape everything
        return (json.dumps(record, ensure_ascii=True, default=_json_default) + "\n").encode("ascii")


class LineWriter:
    """Appends whole lines: one write() per line, then fsync, so a kill never leaves half a line
    (apart from a crash inside that one write, which the next start cuts off)."""

    def __init__(self, path: str):
        folder = os.path.dirname(os.path.abspath(path))
        try:
            os.makedirs(folder, exist_ok=True)
            self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        except OSError as e:
            raise InputError(f"cannot write --output {path}: {e.strerror or e}") from None
        self.path = path

    def write(self, record: dict):
        view = memoryview(encode_line(record))
        try:
            while view:
                view = view[os.write(self.fd, view):]
            os.fsync(self.fd)
        except OSError as e:  # disk full, quota, a vanished network mount
            raise InputError(f"cannot write to {self.path}: {e.strerror or e}; free space and run the same "
                             "command again to continue") from None

    def close(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


# ----------------------------------------------------------------------------- merge

@dataclass
class MergeResult:
    written: int  # results in the merged file that belong to the batch file
    missing: List[Item]
    extra: int  # results whose id is not in the batch file (kept at the end)
    merged: bool  # whether OUTPUT was (re)written


def merge_results(items: List[Item], output: str, complete_only: bool = False) -> MergeResult:
    """OUTPUT := every result from OUTPUT and all part files, in batch-file order (results whose
    id is no longer in the batch file follow, so nothing is lost). Written to a temporary file and
    renamed into place; part files are removed only once OUTPUT holds every input.

    Safe to run concurrently (two ranks finishing together): a merger only replaces OUTPUT with a
    complete set, or (complete_only=False, the --merge command) with what exists while keeping
    the part files, so no result is ever dropped."""
    parts = part_files(output)
    lines: Dict[str, bytes] = {}
    failed: set = set()
    for path in [output] + parts:
        for key, line, rec in iter_results(path):
            # first seen wins, except that an answer replaces an error
            if key not in lines or (key in failed and "error" not in rec):
                lines[key] = line
                (failed.add if "error" in rec else failed.discard)(key)
    missing = [it for it in items if it.key not in lines]
    if (complete_only and missing) or not lines:
        return MergeResult(len(items) - len(missing), missing, 0, False)
    wanted = {it.key for it in items}
    extra = [k for k in lines if k not in wanted]
    folder = os.path.dirname(os.path.abspath(output))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(output) + ".merge-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            for it in items:
                if it.key in lines:
                    f.write(lines[it.key])
            for k in extra:
                f.write(lines[k])
            f.flush()
            os.fsync(f.fileno())
        if missing and not all(os.path.exists(p) for p in parts):
            # a concurrent complete merge removed parts we read: its OUTPUT is the one to keep
            os.unlink(tmp)
            return merge_results(items, output, complete_only)
        os.chmod(tmp, user_mode())  # mkstemp makes 0600: the results get the user's umask
        os.replace(tmp, output)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(folder)
    if not missing:
        for p in parts:
            try:
                os.unlink(p)
            except FileNotFoundError:
                pass
    return MergeResult(len(items) - len(missing), missing, len(extra), True)


def _fsync_dir(folder: str):
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------- loading (any thread)

@dataclass
class Loaded:
    item: Item
    kind: Optional[str]
    media: Any = None  # PIL image or media.Video
    error: Optional[BaseException] = None
    start: float = 0.0  # perf_counter at the start / end of loading
    end: float = 0.0


def item_kind(item: Item, default_type: Optional[str]) -> str:
    kind = item.type if item.type is not None else default_type or guess_media_type(item.input)
    if kind is None:
        raise InputError(f"cannot tell whether {item.input} is an image or a video: add "
                         '"type": "image" or "type": "video" to its line (or pass --type)')
    if kind not in ("image", "video"):
        raise InputError(f'"type" must be "image" or "video", got {kind!r}')
    return kind


def load_item(item: Item, kind: str, opts: BatchOptions) -> Any:
    """PIL image or media.Video: download, decode, sample and resize. Pure: safe in a thread."""
    pick = lambda v, d: d if v is None else v  # noqa: E731
    min_px, max_px = pick(item.min_pixels, opts.min_pixels), pick(item.max_pixels, opts.max_pixels)
    timeout = pick(item.timeout, opts.timeout)
    extra = {} if timeout is None else {"timeout": timeout}
    if kind == "video":
        return load_video(item.input, fps=pick(item.fps, opts.fps), min_pixels=min_px, max_pixels=max_px,
                                max_frames=pick(item.max_frames, opts.max_frames), cache_dir=opts.media_cache,
                                progress=False, **extra)
    notes = []
    if max_px is None and (min_px or 0) <= (opts.image_max_pixels or 0):
        max_px = opts.image_max_pixels  # the CPU's default image cap (cpu_limits.py), with its notice
        extra["on_downsize"] = lambda *a: notes.append(cpu_limits.cap_notice(*a))
    image = load_image(item.input, min_pixels=min_px, max_pixels=max_px, cache_dir=opts.media_cache, **extra)
    image.info["notices"] = notes + list(image.info.get("notices", ()))  # printed and kept in the stats
    return image


def _load(item: Item, opts: BatchOptions) -> Loaded:
    start, kind = time.perf_counter(), None
    try:
        kind = item_kind(item, opts.type)  # set first: a load error still reports the kind
        media = load_item(item, kind, opts)
        return Loaded(item, kind, media, None, start, time.perf_counter())
    except Exception as e:  # any input problem becomes this item's error line
        return Loaded(item, kind, None, e, start, time.perf_counter())


class Prefetcher:
    """Yields Loaded items. With depth >= 1, `depth` threads load items ahead of the consumer and
    items are yielded as their loads finish (results are merged in input order later), so one
    slow download never holds back the items after it; at most `depth` loads run or wait at
    once. depth 0 loads in the caller's thread, in order."""

    def __init__(self, items: List[Item], opts: BatchOptions, depth: int):
        self.items, self.opts, self.depth = items, opts, depth
        self.wait_s = 0.0  # consumer time spent waiting for an item
        if depth > 0:
            # Daemon threads, not a ThreadPoolExecutor: its workers are joined at exit, so Ctrl-C
            # during a stalled download would wait for the download's deadline.
            self.jobs: queue.Queue = queue.Queue()
            for i in range(depth):
                threading.Thread(target=self._work, name=f"corpus-prefetch-{i}", daemon=True).start()

    def _work(self):
        while True:
            job = self.jobs.get()
            if job is None:
                return
            future, item = job
            if future.set_running_or_notify_cancel():
                future.set_result(_load(item, self.opts))  # _load returns errors, never raises

    def _submit(self, item: Item) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        self.jobs.put((future, item))
        return future

    def __iter__(self) -> Iterator[Tuple[Loaded, float]]:
        """(loaded item, seconds the consumer waited for it)."""
        if self.depth <= 0:
            for item in self.items:
                loaded = _load(item, self.opts)
                yield loaded, loaded.end - loaded.start
            return
        todo, pending = iter(self.items), {}

        def fill():
            while len(pending) < self.depth:
                item = next(todo, None)
                if item is None:
                    return
                pending[self._submit(item)] = item.index

        fill()
        while pending:
            t0 = time.perf_counter()
            done, _ = concurrent.futures.wait(pending, return_when=concurrent.futures.FIRST_COMPLETED)
            waited = time.perf_counter() - t0
            future = min(done, key=pending.get)  # of those ready, the first in input order
            del pending[future]
            fill()  # the next load starts while this item is generated
            yield future.result(), waited

    def close(self):
        if self.depth > 0:
            # Loads still running end at their download deadline; nobody waits for them here.
            while True:
                try:
                    job = self.jobs.get_nowait()
                except queue.Empty:
                    break
                if job is not None:
                    job[0].cancel()
            for _ in range(self.depth):
                self.jobs.put(None)


# ----------------------------------------------------------------------------- the run

@dataclass
class BatchOptions:
    type: Optional[str]
    fps: float
    min_pixels: Optional[int]
    max_pixels: Optional[int]
    max_frames: Optional[int]
    media_cache: str
    prompt: Optional[str]
    gen: dict
    timeout: Optional[float] = None  # seconds per download (--timeout; an item's "timeout" wins)
    image_max_pixels: Optional[int] = None  # the engine's default image cap (the CPU's), set once it loads


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    if isinstance(e, QwenVLError):
        return text or type(e).__name__
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _check_args(args) -> BatchOptions:
    if not args.batch:
        raise InputError("--merge needs --batch (the inputs file, for the order) and --output")
    if not args.output:
        raise InputError("--batch needs --output: the JSONL file results are written to (and resumed from)")
    if os.path.abspath(args.output) == os.path.abspath(args.batch):
        raise InputError(f"--output {args.output} is the --batch file itself: write the results to another file")
    if os.path.isdir(args.output):
        raise InputError(f"--output {args.output} is a folder: give a file name like results.jsonl")
    if args.input:
        raise InputError("--input and --batch do not combine: list every input in the --batch file")
    if args.prompts_file or args.conversation or (args.prompt and len(args.prompt) > 1):
        raise InputError("--batch takes one --prompt for every item (a per-item prompt goes in the batch "
                         'file as "prompt"); --prompts-file and --conversation do not apply')
    if args.prefetch < 0:
        raise InputError(f"--prefetch must be >= 0, got {args.prefetch}")
    check_fps(args.fps)
    gen = GenerationOptions.from_args(args).as_dict()
    return BatchOptions(type=args.type, fps=args.fps, min_pixels=args.min_pixels, max_pixels=args.max_pixels,
                        max_frames=args.max_frames, media_cache=os.path.join(args.cache_dir, "media"),
                        prompt=args.prompt[0] if args.prompt else None, gen=gen, timeout=getattr(args, "timeout", None))


def _warn(msg: str):
    print(f"warning: {msg}", file=sys.stderr)


def run_batch(args, model=None) -> int:
    """The --batch / --merge command. `model`: an already loaded QwenVLInference (tests, notebooks)."""
    opts = _check_args(args)
    items = read_batch_file(args.batch, warn=_warn)
    if args.merge:
        return _merge_command(items, args.output)
    rank, world = rank_and_world()
    with single_process_view() as launch_env:
        return _run_share(args, opts, items, rank, world, launch_env, model)


def _run_share(args, opts: BatchOptions, items: List[Item], rank: int, world: int, launch_env: dict, model) -> int:
    who = f"rank {rank}/{world}: " if world > 1 else ""
    mine = [it for it in items if it.index % world == rank]
    own = part_path(args.output, rank, world)
    cut = cut_partial_line(own)
    if cut:
        _warn(f"{who}cut an incomplete last line ({cut} bytes) from {own}; that item runs again")
    done = done_keys(args.output)
    todo = [it for it in mine if it.key not in done]
    writer = LineWriter(own)  # fails here, before the model loads, if OUTPUT is not writable
    counts = {"answered": 0, "failed": 0, "skipped": len(mine) - len(todo)}
    t0 = time.perf_counter()
    try:
        if todo:
            if model is None:
                model = _load_model(args, launch_env)
            t0 = time.perf_counter()
            _process(model, todo, len(mine), opts, args.prefetch, writer, counts, who, args.debug)
    except KeyboardInterrupt:
        _summary(who, counts, time.perf_counter() - t0,
                 f"interrupted; results so far are in {own}: run the same command again to continue")
        raise
    finally:
        writer.close()
    elapsed = time.perf_counter() - t0
    result = merge_results(items, args.output, complete_only=True)
    if result.merged:
        tail = f"all {len(items)} results merged into {args.output}"
    else:
        tail = (f"{len(result.missing)} of {len(items)} inputs still have no result (other ranks running or "
                f"stopped); the last rank to finish merges them, or run again with --merge")
    _summary(who, counts, elapsed, tail)
    return 0


def _load_model(args, launch_env: dict):
    select_device_from_env(launch_env)
    return QwenVLInference(args.model, dtype=args.dtype, use_psa=args.use_psa, psa_config=psa_config_from_args(args),
                           cache_dir=args.cache_dir, hub=args.hub, min_pixels=args.min_pixels,
                           max_pixels=args.max_pixels, verbose=True, timeout=getattr(args, "timeout", None))


def _process(model, todo: List[Item], total: int, opts: BatchOptions, depth: int, writer: LineWriter,
             counts: dict, who: str, debug: bool):
    bar = tqdm(total=total, initial=total - len(todo), unit="item", desc=who.rstrip(": ") or "batch",
               file=sys.stderr, dynamic_ncols=True, mininterval=0.1 if sys.stderr.isatty() else 5.0)
    bar.set_postfix(failed=0, refresh=False)
    if model.device == "cpu":
        opts = dataclasses.replace(opts, image_max_pixels=cpu_limits.CPU_IMAGE_MAX_PIXELS)
    loader = Prefetcher(todo, opts, depth)
    try:
        for loaded, waited in loader:
            rec = _answer(model, loaded, waited, opts, debug)
            writer.write(rec)
            counts["failed" if "error" in rec else "answered"] += 1
            bar.set_postfix(failed=counts["failed"], refresh=False)
            bar.update(1)
    finally:
        loader.close()
        bar.close()


def _answer(model, loaded: Loaded, waited: float, opts: BatchOptions, debug: bool) -> dict:
    it = loaded.item
    prompt = it.prompt if it.prompt is not None else opts.prompt or (loaded.kind and default_prompt(loaded.kind))
    rec = {"id": it.id, "input": it.input, "type": loaded.kind, "prompt": prompt}
    error = loaded.error
    if error is None:
        try:
            if loaded.kind == "video":
                answer = model.inference_video(loaded.media, prompt, stream=False, **opts.gen)
            else:
                # The image is already sized; the reference resize rule is not idempotent (an image
                # it shrank below min_pixels would grow again), so pin both limits to its area.
                area = loaded.media.width * loaded.media.height
                answer = model.inference_multi_image([loaded.media], prompt, stream=False, min_pixels=area,
                                                     max_pixels=area, **opts.gen)
            stats = dict(model.stats)
            stats["prefetch"] = {"load_s": loaded.end - loaded.start, "wait_s": waited}
            rec.update(answer=answer, stats=stats)
            return rec
        except Exception as e:  # a bad item never stops the run
            error = e
    if debug and not isinstance(error, QwenVLError):
        traceback.print_exception(type(error), error, error.__traceback__, file=sys.stderr)
    rec.update(error=_one_line(error), error_type=type(error).__name__)
    return rec


def _summary(who: str, counts: dict, elapsed: float, tail: str):
    n = counts["answered"] + counts["failed"]
    rate = n / elapsed if elapsed > 0 and n else 0.0
    print(f"{who}done {counts['answered']}, failed {counts['failed']}, skipped {counts['skipped']} "
          f"(already written), {rate:.2f} items/s over {elapsed:.1f} s; {tail}", file=sys.stderr)


def _merge_command(items: List[Item], output: str) -> int:
    result = merge_results(items, output)
    if not result.merged:
        raise InputError(f"nothing to merge: no results for --output {output} or its part files "
                         f"({os.path.basename(output)}.rank*-of-*) yet")
    extra = f" (and {result.extra} results whose id is not in the batch file, at the end)" if result.extra else ""
    if result.missing:
        first = ", ".join(repr(it.id) for it in result.missing[:5])
        print(f"merged {result.written} of {len(items)} results into {output}{extra}; {len(result.missing)} "
              f"inputs have no result yet (ids {first}{', ...' if len(result.missing) > 5 else ''}): run the "
              f"batch again to finish them (part files are kept)", file=sys.stderr)
        return 1
    print(f"merged all {len(items)} results into {output}{extra}", file=sys.stderr)
    return 0
