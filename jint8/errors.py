"""Every exception jint8 raises on bad input, in one place.

Messages name the parameter path, tensor or file and the offending values.
"""


class Jint8Error(Exception):
    """Base class of jint8's errors."""


class InvalidConfigError(Jint8Error, ValueError):
    """A configuration field has a value outside its domain."""


class QuantizationError(Jint8Error, ValueError):
    """A parameter cannot be quantized (NaN/Inf, wrong dtype, wrong rank)."""


class ShapeError(Jint8Error, ValueError):
    """Arrays passed to an op or layer have incompatible shapes."""


class BackendUnavailableError(Jint8Error, RuntimeError):
    """The requested matmul backend cannot run here (platform, shape or missing package)."""


class UnsupportedArchitectureError(Jint8Error, ValueError):
    """A checkpoint's architecture (model_type) or one of its options has no jint8 model."""


class CheckpointFileError(Jint8Error, ValueError):
    """A checkpoint file given to from_pretrained is missing, truncated or corrupt; the message names
    the file and tensor. (Not CheckpointError below, which is jint8.checkpoint's Orbax format.)"""


class WeightsMismatchError(CheckpointFileError):
    """Checkpoint tensors do not match the model built from its config (names or shapes)."""


class UnsupportedQuantTypeError(CheckpointFileError):
    """A GGUF tensor is stored in a quantization type jint8 cannot dequantize."""


class InsufficientMemoryError(Jint8Error, MemoryError):
    """The model does not fit the max_memory given per device; the message says how much it needs."""


class CheckpointError(Jint8Error):
    """A quantized checkpoint cannot be written or read; the message names the directory."""


class CheckpointExistsError(CheckpointError, FileExistsError):
    """save_quantized would replace an existing path without overwrite=True (or one that is not a jint8 checkpoint)."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """The directory, or one of a checkpoint's items (arrays, metadata), does not exist or was never finalized."""


class CheckpointFormatError(CheckpointError, ValueError):
    """A checkpoint's metadata is unreadable, incomplete, of an unknown format or disagrees with its arrays."""


class CheckpointIntegrityError(CheckpointFormatError):
    """A checkpoint's array bytes do not match the checksums written at save (damaged files)."""


class CheckpointVersionError(CheckpointFormatError):
    """A checkpoint was written with a newer format version than this jint8 reads."""


class CheckpointMismatchError(CheckpointError, ValueError):
    """The target shardings or abstract arrays do not match the checkpoint's tree or shapes."""


class PromptError(Jint8Error, ValueError):
    """generate's input_ids / attention_mask cannot be used as prompts."""


class EmptyPromptError(PromptError):
    """A prompt has no tokens (empty input_ids or an all-zero attention_mask row) or ids outside the vocabulary."""


class PromptPaddingError(PromptError):
    """attention_mask does not match input_ids or is not left padding."""


class ContextLengthError(PromptError):
    """The prompt (plus max_new_tokens) is longer than the model's max_position_embeddings."""


class AssistantMismatchError(Jint8Error, ValueError):
    """The assistant model of speculative decoding does not share the target model's vocabulary."""


class ServeError(Jint8Error):
    """A request to the serving engine cannot be taken."""


class InvalidRequestError(ServeError, ValueError):
    """A request field is out of its domain or the prompt does not fit the context; `param` names
    the field (OpenAI's error body carries it)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class QueueFullError(ServeError, RuntimeError):
    """The engine's waiting queue is at its limit; the request was not taken (HTTP 429/503)."""


class EngineStoppedError(ServeError, RuntimeError):
    """The engine is shutting down or stopped and takes no new requests."""
