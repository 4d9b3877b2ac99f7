"""edgediff's lean runtime: numpy sampling, tokenizers, engines. Never imports torch."""

from .errors import (
    EdgediffError,
    EngineInputError,
    EngineRunError,
    EngineUnavailableError,
    ExportError,
    ExportValidationError,
    InvalidArgumentError,
    ManifestError,
    ModelConfigError,
    ModelFolderError,
    NonFiniteError,
    OutputPathError,
    ParametersError,
    ResourceError,
    UnknownSchedulerError,
)
from .model_folder import ModelFolder
from .pipeline import GenerationCancelled, GenerationResult, Pipeline
from .rng import TorchCPUGenerator

__all__ = [
    "EdgediffError",
    "EngineInputError",
    "EngineRunError",
    "EngineUnavailableError",
    "ExportError",
    "ExportValidationError",
    "GenerationCancelled",
    "GenerationResult",
    "InvalidArgumentError",
    "ManifestError",
    "ModelConfigError",
    "ModelFolder",
    "ModelFolderError",
    "NonFiniteError",
    "OutputPathError",
    "ParametersError",
    "Pipeline",
    "ResourceError",
    "TorchCPUGenerator",
    "UnknownSchedulerError",
]
