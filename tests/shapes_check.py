"""The shapes fidelity check shared by the tests of the embedded model and of its optimised and int8
variants: 12 prompts, 20 DPM++ steps, guidance 5, scored by the deterministic analyser."""

import numpy as np

from edgediff.runtime import shapes

# 12 training-split captions (scene and wording seed 7), image seed = index. Measured on the shipped
# model (shapes-v1): colour, background, shape and position all 1.0. A broken tokenizer gives
# colour 0.08 / background 0.25 / shape 0.17 / position 0.17; swapped guidance 0.08 / 0.0 / 0.17 /
# 0.33; an epsilon scheduler on this v-prediction model 0.17 / 0.0 / 0.25 / 0.25. The thresholds
# leave room for float differences between machines, none for a broken runtime.
_rng = np.random.default_rng(7)
CHECK = [shapes.caption(scene, _rng) for scene in shapes.sample_scenes(12, seed=7, split="train")]
MINIMUM = {"colour": 0.9, "background": 0.9, "shape": 0.8, "position": 0.9}


def fidelity(pipe, swap=False, **kwargs):
    images = []
    for seed, prompt in enumerate(CHECK):
        # swapped guidance: the prompt in the unconditional slot, the empty prompt in the conditional one
        text = dict(prompt="", negative_prompt=prompt) if swap else dict(prompt=prompt)
        result = pipe(**text, num_inference_steps=20, guidance_scale=5.0, seed=seed, **kwargs)
        images.append(np.asarray(result.images[0]))
    return shapes.score(CHECK, images)


def passes(result) -> bool:
    return all(result[k] >= v for k, v in MINIMUM.items())
