"""Execution engines behind ``edgediff.runtime.engine.Engine``. Each backend lives in its own
module and imports its library lazily; nothing here imports torch."""
