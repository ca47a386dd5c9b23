"""Prompt building: chat template, processor, vision encoder, mrope positions.

    media = MediaInput.images([pil]) / MediaInput.video(video)    # placeholders + processor kwargs
    text = builder.chat_text(media.content + [{"type": "text", "text": q}])
    prompt = builder.prepare(text, media.processor_kwargs)      # ids [1, L], pixel tensors, context check
    builder.encode_media(prompt)                                  # prompt.embeds [1, L, H]
    pos, deltas = builder.positions(prompt.inputs)                # [3, 1, L] and the decode offset

Sessions tokenise a prompt in parts (a cached media prefix, then each question), so the pieces
are separate public steps; `template_parts` splits the chat template for them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Optional

import paddle

from .errors import InputError
from .generation import Timer


@dataclass
class MediaInput:
    """Loaded media, ready for the processor: what goes in the user turn and what the processor takes."""
    content: list  # chat content placeholders: [{"type": "image"}, ...] or [{"type": "video"}]
    processor_kwargs: dict  # {"images": [PIL]} or {"videos": [uint8 T,H,W,3], "fps": float}
    timings: dict = field(default_factory=dict)  # fetch / decode / resize seconds
    info: dict = field(default_factory=dict)  # what the stats report about the media (frames, size, ...)
    kind: str = "images"

    @classmethod
    def images(cls, pil_images: list, timings: dict) -> MediaInput:
        return cls([{"type": "image"} for _ in pil_images], {"images": list(pil_images)}, timings, {}, "images")

    @classmethod
    def video(cls, v) -> MediaInput:
        """v: a media.Video (sampled, resized frames)."""
        info = {"frames": int(v.frames.shape[0]), "frame_size": [int(v.frames.shape[1]), int(v.frames.shape[2])],
                "sample_fps": float(v.sample_fps), "video_duration_s": float(v.duration_s)}
        return cls([{"type": "video"}], {"videos": [v.frames], "fps": v.sample_fps}, dict(v.timings), info, "video")

    def with_question(self, question: str) -> list:
        return self.content + [{"type": "text", "text": question}]


@dataclass
class Prompt:
    """A chat prompt after the processor: what the prefill needs, and what the stats count."""
    inputs: dict  # processor output: input_ids [1, L], grids (pixel tensors until encode_media ran)
    ids: List[int]  # input_ids as a list
    processor_s: float = 0.0
    embeds: Any = None  # [1, L, H] token embeddings with the vision features in, after encode_media
    vision_s: float = 0.0


class PromptBuilder:
    """The chat template, the processor and the model's embedding side, for one loaded model."""

    def __init__(self, model, processor, dtype: str):
        self.model, self.processor, self.dtype = model, processor, dtype
        self.tokenizer = processor.tokenizer
        self.max_context = int(getattr(model.config.text_config, "max_position_embeddings", 128000))

    def chat_text(self, content: list, history=()) -> str:
        """The chat template as text: the user turn `content` (media placeholders, text) and the
        generation prompt; `history` is earlier messages in front of it."""
        messages = list(history) + [{"role": "user", "content": content}]
        return self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def prepare(self, text: str, processor_kwargs: dict) -> Prompt:
        """Processor over the chat text (media placeholders expanded), then the context check."""
        with Timer() as t:
            inputs = self.encode_text(text, processor_kwargs)
        n_in = inputs["input_ids"].shape[1]
        ids = inputs["input_ids"][0].tolist()
        if n_in + 1 > self.max_context:
            raise InputError(self.too_long(ids, "media plus prompt"))
        return Prompt(inputs, ids, processor_s=t.s)

    def too_long(self, ids: List[int], what: str) -> str:
        """The over-the-context message, naming the part that is long: the text or the media."""
        c = self.count_tokens(ids)
        media = c["image"] + c["video"]
        if c["text"] >= media:
            fix = f"shorten the prompt (its text is {c['text']} tokens)"
        elif c["video"]:
            fix = f"lower --fps, --max-frames or --max-pixels (the video is {c['video']} tokens)"
        else:
            fix = f"lower --max-pixels or pass fewer images (the images are {c['image']} tokens)"
        return f"{what} is {c['total']} tokens, over the model's context of {self.max_context}: {fix}"

    def encode(self, content: list, processor_kwargs: dict) -> dict:
        """chat_text + encode_text: the processor output of one user turn."""
        return self.encode_text(self.chat_text(content), processor_kwargs)

    def encode_text(self, text: str, processor_kwargs: dict) -> dict:
        """Token ids with the media placeholders expanded, and the pixel tensors."""
        # media.py already sampled and resized (multiples of 28 within the pixel limits): the
        # processor must not resize or sample again.
        kw = {"text": [text], "return_tensors": "pd", "do_resize": False}
        if "images" in processor_kwargs:
            kw["images"] = processor_kwargs["images"]
        if "videos" in processor_kwargs:
            kw.update(videos=processor_kwargs["videos"], do_sample_frames=False, fps=processor_kwargs["fps"])
        return dict(self.processor(**kw))

    def encode_media(self, prompt: Prompt) -> None:
        """Run the vision encoder once: prompt.embeds; the pixel tensors are dropped afterwards."""
        with Timer() as t:
            prompt.embeds = self.embed(prompt.inputs)
        prompt.vision_s = t.s
        for key in ("pixel_values", "pixel_values_videos"):
            prompt.inputs.pop(key, None)

    def embed(self, inputs: dict):
        """Token embeddings [1, L, H] with the vision encoder's outputs scattered into the placeholders."""
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

    def embed_ids(self, ids: List[int]):
        """Embeddings [1, n, H] of text tokens (no media placeholders among them)."""
        return self.model.get_input_embeddings()(paddle.to_tensor([ids], dtype="int64"))

    def positions(self, inputs: dict):
        """3-D mrope positions [3, B, L] and the delta that continues them for generated text."""
        return self.model.model.get_rope_index(
            inputs["input_ids"], inputs.get("image_grid_thw"), inputs.get("video_grid_thw"),
            second_per_grid_ts=inputs.get("second_per_grid_ts"), attention_mask=inputs.get("attention_mask"))

    def count_tokens(self, ids: List[int]) -> dict:
        """{text, image, video, total} token counts of a prompt."""
        n_img = sum(1 for i in ids if i == self.model.config.image_token_id)
        n_vid = sum(1 for i in ids if i == self.model.config.video_token_id)
        return {"text": len(ids) - n_img - n_vid, "image": n_img, "video": n_vid, "total": len(ids)}


# ----------------------------------------------------------------------------- template parts for sessions

# Stand-ins for the texts, to split the rendered chat template around them.
_Q1, _A1, _Q2 = "\x00QUESTION_ONE\x00", "\x00ANSWER_ONE\x00", "\x00QUESTION_TWO\x00"


@dataclass
class TemplateParts:
    prefix: str  # everything before the first question: system turn, user header, media placeholders
    question_tail: str  # after a question: "<|im_end|>\n<|im_start|>assistant\n"
    turn_separator: Optional[str]  # between an answer and the next question: "<|im_end|>\n<|im_start|>user\n"


def template_parts(builder: PromptBuilder, media_content: list) -> TemplateParts:
    """Split the model's chat template into the parts a session tokenises apart."""
    one = builder.chat_text(media_content + [{"type": "text", "text": _Q1}])
    prefix, tail = one.split(_Q1)
    two = builder.chat_text([{"type": "text", "text": _Q2}],
                            history=[{"role": "user", "content": media_content + [{"type": "text", "text": _Q1}]},
                                     {"role": "assistant", "content": _A1}])
    head, rest = two.split(_A1)
    sep, tail2 = rest.split(_Q2)
    # the conversation must render as the first turn's prompt, the answer, then the next turn
    separator = sep if head == prefix + _Q1 + tail and tail2 == tail else None
    return TemplateParts(prefix, tail, separator)


__all__ = ["MediaInput", "Prompt", "PromptBuilder", "TemplateParts", "template_parts"]
