"""User-facing errors: each carries one line that says what is wrong and what to do.

The CLI prints `error: <message>` and exits with code 2 for any of these; the API raises them.
They subclass ValueError / FileNotFoundError so callers can catch the usual built-in types.
"""


class QwenVLError(Exception):
    """Base of every error that is the user's input, not a bug."""


class InputError(QwenVLError, ValueError):
    """A bad argument or option (type, fps, pixel limits, prompt length...)."""


class MediaError(QwenVLError, ValueError):
    """An image or video that cannot be fetched, opened or decoded."""


class MediaNotFoundError(QwenVLError, FileNotFoundError):
    """A local image, video or frame folder that does not exist."""


class ModelLoadError(QwenVLError, ValueError):
    """A model folder or hub id that does not give a usable checkpoint."""


class SessionClosedError(QwenVLError, RuntimeError):
    """A question to a MediaSession after close(): its KV cache is gone."""
