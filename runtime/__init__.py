"""edgediff's lean runtime: numpy sampling, tokenizers, engines. Never imports torch."""

from .errors import (
    EdgediffError,
    EngineInputError,
    EngineUnavailableError,
    ExportError,
    ExportValidationError,
    InvalidArgumentError,
    ManifestError,
    ModelFolderError,
    UnknownSchedulerError,
)
from .model_folder import ModelFolder
from .pipeline import GenerationCancelled, GenerationResult, Pipeline
from .rng import TorchCPUGenerator

__all__ = [
    "EdgediffError",
    "EngineInputError",
    "EngineUnavailableError",
    "ExportError",
    "ExportValidationError",
    "GenerationCancelled",
    "GenerationResult",
    "InvalidArgumentError",
    "ManifestError",
    "ModelFolder",
    "ModelFolderError",
    "Pipeline",
    "TorchCPUGenerator",
    "UnknownSchedulerError",
]
