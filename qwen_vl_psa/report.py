"""The stats dicts of QwenVLInference and MediaSession, formatted for people (one fact per line);
and answer text made safe for a terminal."""
import re
import sys

# C0 controls but tab and newline, DEL and C1 controls: an ESC sequence in a generated answer
# could move the cursor, recolour or retitle the user's terminal.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def terminal_safe(text: str, stream=None) -> str:
    """`text` without control characters when `stream` (default stdout) is a terminal; as is
    otherwise (a pipe or file gets the raw text, and --json always does)."""
    stream = stream or sys.stdout
    isatty = getattr(stream, "isatty", None)
    return _CONTROL.sub("", text) if isatty is not None and isatty() else text


def write_answer(text: str) -> None:
    """Streamed answer text to stdout, terminal-safe."""
    sys.stdout.write(terminal_safe(text))
    sys.stdout.flush()


def format_stats(s: dict) -> str:
    if not s:
        return "no inference has run yet"
    tok = s["input_tokens"]
    rate = f"{s['decode_tokens_per_s']:.1f} tokens/s" if s.get("decode_tokens_per_s") else "n/a (<2 tokens)"
    lines = [
        "---- stats ----",
        f"model           {s['model']} on {s['device']} ({s['dtype']})"
        + (f"; checkpoint: {s['checkpoint']}" if s.get("checkpoint") else ""),
        f"model load      {s['model_load_s']:.2f} s"
        + (f"  (PSA kernel compilation {s['psa_warmup_s']:.2f} s)" if s.get("psa_warmup_s") else ""),
        f"preprocess      {s['preprocess_s']:.3f} s  ({', '.join(f'{k} {v:.3f}' for k, v in s['preprocess'].items())})",
        f"vision encoder  {s['vision_encoder_s']:.3f} s" + ("  (media reused)" if s.get("reuse", {}).get("hit")
                                                          else ""),
        f"prefill         {s['prefill_s']:.3f} s  (time to first token {s['time_to_first_token_s']:.3f} s after "
        f"the media were loaded" + (f", {s['time_to_first_token_with_media_s']:.3f} s with fetch and decode)"
                                    if "time_to_first_token_with_media_s" in s else ")"),
        f"decode          {rate}",
        f"input tokens    {tok['total']}  (text {tok['text']}, image {tok['image']}, video {tok['video']})",
        f"output tokens   {s['output_tokens']}  (stopped by {s['stopped_by']})",
        f"peak memory     {s['peak_memory_mb']:.0f} MiB  ({s['memory_kind'].replace('_', ' ')})",
    ]
    if "frames" in s:
        height, width = s["frame_size"]
        lines.append(f"video           {s['frames']} frames of {width}x{height} "
                     f"at {s['sample_fps']:.2f} fps from {s['video_duration_s']:.1f} s"
                     + (f" (the file claims {s['container_duration_s']:.1f} s)"
                        if s.get("container_duration_s", 0) - s["video_duration_s"] > 0.5 else ""))
    if "reuse" in s:
        lines.append(format_reuse(s["reuse"]))
    if "psa" in s:
        lines.append(format_psa(s["psa"]))
    return "\n".join(lines)


def format_reuse(r: dict) -> str:
    cached = (f"{r['cached_prefix_tokens']} of the {r['prefix_tokens']} prefix tokens"
              if r["cached_prefix_tokens"] != r["prefix_tokens"] else f"the {r['prefix_tokens']} prefix tokens")
    if not r["hit"]:
        return (f"reuse           question {r['question']} ({r['mode']}): prefilled {cached} once for the "
                "questions after it")
    return (f"reuse           question {r['question']} ({r['mode']}): reused {cached}, prefilled "
            f"{r['prefilled_tokens']}; saved {r['time_saved_s']:.3f} s (vision encoder + prefix prefill)")


def format_session_stats(s: dict) -> str:
    """A session's totals (MediaSession.stats), one per line."""
    cached = f" ({s['cached_prefix_tokens']} cached)" if s["cached_prefix_tokens"] != s["prefix_tokens"] else ""
    return "\n".join([
        "---- session ----",
        f"questions       {s['questions']} about the {s['media']} ({s['mode']}), reuse hits {s['reuse_hits']}",
        f"media prefix    {s['prefix_tokens']} tokens{cached}, paid once: preprocess {s['preprocess_s']:.3f} s, "
        f"vision encoder {s['vision_encoder_s']:.3f} s, prefill {s['prefix_prefill_s']:.3f} s",
        f"time saved      {s['time_saved_s']:.3f} s against cold prefills (plus preprocessing the media again)",
    ])


def format_psa(p: dict) -> str:
    if not p.get("calls"):
        return (f"psa             on, not used: the prompt is shorter than min_seq_len ({p['min_seq_len']} tokens), "
                "where dense attention is faster")
    hist = ", ".join(f"x{k}: {v:.0%}" if k != "0" else f"skip: {v:.0%}" for k, v in p["level_fractions"].items())
    return (f"psa             sparsity {p['sparsity']:.1%} over {p['calls']} layer calls at {p['seq_len']} tokens "
            f"({p['backend']}); blocks {hist}\n"
            f"                estimate {p['estimate_s']:.3f} s, mask {p['mask_s']:.3f} s, "
            f"attention {p['attention_s']:.3f} s; {p['decode_calls']} decode calls kept dense")
