"""A diffusers pipeline folder opened one model at a time, so that exporting a model whose components do not fit in
memory together (SDXL: 14 GB of fp32 weights, its UNet 10.3 GB) needs about one component's weights at a time.

``LazyPipeline(source)`` has what export reads of a diffusers pipeline: the tokenizers and the scheduler (small,
loaded at once), ``config`` (model_index.json), and for every model (``unet``, ``vae``, ``text_encoder``, ...) its
config (with diffusers' or transformers' defaults filled in) until ``hold(name)`` loads that one model and releases
the others. We load with diffusers' and transformers' own ``from_pretrained``; what they lack is loading a
pipeline's models one by one.
"""

from __future__ import annotations

import gc
import json
import shutil
from pathlib import Path
from typing import Any


class _ConfigView:
    """A model that is not loaded: its config, and ``save_config`` (diffusers' models) as the folder has it."""

    def __init__(self, config: Any, folder: Path, diffusers_model: bool):
        self.config = config
        self._folder = folder
        if diffusers_model:
            self.save_config = self._save_config

    def _save_config(self, out: str | Path) -> None:
        Path(out).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self._folder / "config.json", Path(out) / "config.json")


class LazyPipeline:
    def __init__(self, source: Path, tokenizers: tuple[str, ...], device: str = "cpu"):
        import diffusers
        import transformers

        self._source, self._device = Path(source), device
        index = json.loads((self._source / "model_index.json").read_text(encoding="utf-8"))
        self.config = index
        self._entries = {k: tuple(v) for k, v in index.items()
                         if isinstance(v, list) and len(v) == 2 and v[0] in ("diffusers", "transformers")
                         and k not in ("scheduler", *tokenizers)}  # fmt: skip
        self._views: dict[str, _ConfigView] = {}
        self._held: dict[str, Any] = {}
        for name in tokenizers:
            setattr(self, name, transformers.CLIPTokenizer.from_pretrained(self._source / name))
        scheduler_cls = getattr(diffusers, index["scheduler"][1])
        self.scheduler = scheduler_cls.from_pretrained(self._source, subfolder="scheduler")

    def __getattr__(self, name: str):
        entries = self.__dict__.get("_entries", {})
        if name not in entries:
            raise AttributeError(name)
        if name in self._held:
            return self._held[name]
        if name not in self._views:
            self._views[name] = self._view(name, *entries[name])
        return self._views[name]

    def _view(self, name: str, library: str, cls_name: str) -> _ConfigView:
        import diffusers
        import transformers
        from diffusers.configuration_utils import FrozenDict

        folder = self._source / name
        if library == "diffusers":
            cls = getattr(diffusers, cls_name)
            init, _, hidden = cls.extract_init_dict(cls.load_config(folder))
            return _ConfigView(FrozenDict({**hidden, **init}), folder, True)
        return _ConfigView(getattr(transformers, cls_name).config_class.from_pretrained(folder), folder, False)

    def hold(self, name: str):
        """Load model ``name`` (on the pipeline's device, fp32, eval mode) and release every other one."""
        if name in self._held or name not in self._entries:
            return self._held.get(name)
        self._held.clear()
        gc.collect()
        import diffusers
        import torch
        import transformers

        library, cls_name = self._entries[name]
        module = (diffusers if library == "diffusers" else transformers).__dict__[cls_name]
        if library == "diffusers":
            model = module.from_pretrained(self._source, subfolder=name, torch_dtype=torch.float32,
                                           low_cpu_mem_usage=False)  # fmt: skip
        else:
            model = module.from_pretrained(self._source / name, torch_dtype=torch.float32)
        self._held[name] = model.to(self._device).eval()
        return self._held[name]

    def release(self) -> None:
        self._held.clear()
        gc.collect()
