"""Every error a user can cause, in one place.

The CLI prints ``error: <message>`` and exits with status 2 for any GenArmError; the Python API raises these
specific classes so applications can catch what they can handle. Messages name the file or value at fault and,
where there is one, what to do about it.
"""


class GenArmError(Exception):
    """Base class: bad input or an environment problem the user can fix."""


class InputNotFoundError(GenArmError, FileNotFoundError):
    """A path given by the user does not exist."""


class NotACheckpointError(GenArmError, ValueError):
    """A directory or file is not the kind of model or adapter the command expects."""


class UnsupportedArchitectureError(GenArmError, ValueError):
    """The model's architecture has no converter or runtime support."""


class AdapterMismatchError(GenArmError, ValueError):
    """A LoRA adapter does not fit the base model it is applied to."""


class CorruptModelError(GenArmError, ValueError):
    """A GGUF file is truncated, corrupt, or of the wrong kind for the operation."""


class OutputExistsError(GenArmError, FileExistsError):
    """The output file exists and --force was not given."""


class OutputWriteError(GenArmError):
    """An output file cannot be written: no permission, a full disk."""


class InvalidOptionError(GenArmError, ValueError):
    """An option has a value outside what it accepts."""


class NumericalError(GenArmError, ValueError):
    """Logits hold NaN or +inf, or leave no token to sample."""


class MissingDependencyError(GenArmError, ImportError):
    """An optional dependency (an extra such as ``train``) is not installed."""


def require(module: str, extra: str):
    """Import an optional heavy dependency, or explain which extra installs it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingDependencyError(
            f"{module} is not installed; install it with: pip install 'genarm-local[{extra}]'"
        ) from exc


class VocabularyMismatchError(GenArmError, ValueError):
    """An ARM's token table differs from the base's: guidance needs one shared vocabulary."""


class ContextOverflowError(GenArmError, ValueError):
    """A prompt, or a prompt plus max_tokens, does not fit the context window."""


class PreferenceDataError(GenArmError, ValueError):
    """A preference data file or row is malformed, of an unknown format, or leaves nothing to train on."""


class TokenizerMismatchError(GenArmError, ValueError):
    """Preference data was rendered for another model's chat template, or needs a template the model lacks."""


class BatchInputError(GenArmError, ValueError):
    """A batch input file cannot be read as JSONL or repeats an id, or an output file holds lines that are not ours."""


class ChatTemplateError(InvalidOptionError):
    """A chat template is unknown, not valid Jinja, refused by the sandbox, or exceeded its time or memory limit."""


class UnknownModelError(InvalidOptionError):
    """A request names a model (or preset) that the server does not serve."""


class ModelClosedError(GenArmError):
    """The model was closed: it takes no more work."""


class ServerBusyError(GenArmError):
    """Every slot is taken and the waiting queue is full: try again later."""
