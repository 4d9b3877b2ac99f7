"""Exception types. Each names the problem and the fix; the CLI prints them as one line.

Every user-facing error is an ``EdgediffError`` and also subclasses the builtin that fits
(``ValueError``, ``FileNotFoundError``, ...) so callers can catch either.
"""

from __future__ import annotations


class EdgediffError(Exception):
    """Base class of every error edgediff raises on purpose."""


class ModelFolderError(EdgediffError, FileNotFoundError):
    """The model folder is missing, incomplete, truncated or does not match its manifest."""


class ModelConfigError(ModelFolderError, ValueError):
    """A model folder's own config files (manifest, scheduler, tokenizer, component configs) hold
    values that cannot work; the message lists every problem found, each with its file."""


class ManifestError(ModelConfigError):
    """``edgediff.json`` cannot be read or is not a valid manifest."""


class InvalidArgumentError(EdgediffError, ValueError):
    """A generation argument is out of range (size, steps, prompt list, latents shape ...)."""


class ParametersError(InvalidArgumentError):
    """An image or parameters file holds no generation parameters, or ones that cannot be read or used."""


class UnknownSchedulerError(EdgediffError, ValueError):
    """A scheduler name or ``_class_name`` that edgediff does not implement."""


class EngineInputError(EdgediffError, ValueError):
    """A feed given to an engine has a wrong name, dtype or rank."""


class ResourceError(EdgediffError, MemoryError):
    """A request needs more memory than this machine has (estimated before running, or an
    allocation that failed inside an engine); the message says what to reduce."""


class EngineRunError(EdgediffError, RuntimeError):
    """An engine failed while running a component (the library's own message, in one line)."""


class NonFiniteError(EdgediffError, FloatingPointError):
    """Latents, embeddings or the decoded image stopped being finite (NaN or infinity): the
    result would be a black or noise image, so nothing is written."""


class OutputPathError(EdgediffError, OSError):
    """An output file cannot be written there (a folder, an empty name, no permission, disk full)."""


class EngineUnavailableError(EdgediffError, RuntimeError):
    """The requested engine or execution provider is not installed / not usable here."""


class ExportError(EdgediffError, RuntimeError):
    """The export source cannot be exported (not a supported diffusers model, OUT exists ...)."""


class ExportValidationError(ExportError):
    """Exported components disagree with their PyTorch originals; lists every mismatch."""

    def __init__(self, failures: list[str]):
        self.failures = list(failures)
        lines = "; ".join(self.failures)
        super().__init__(f"{len(self.failures)} validation failure(s), nothing was written: {lines}")


class PlanError(EngineUnavailableError):
    """No TensorRT plan can serve the request: none built, built for another TensorRT version, GPU
    or model file (stale), damaged, or no plan's optimisation profile fits the shapes asked for."""


class BuildError(EdgediffError, RuntimeError):
    """``edgediff build`` cannot build a TensorRT plan (parser or builder failure, wrong precision)."""
