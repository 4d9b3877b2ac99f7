"""Train edgediff's embedded model: a tiny Stable-Diffusion-architecture text-to-image model (CLIP
text encoder, conditional UNet with cross-attention, KL autoencoder) trained from scratch on CPU
on the procedural "shapes" world (``edgediff.runtime.shapes``).

    python -m edgediff.export.train_shapes OUT            # a diffusers folder at OUT
    python -m edgediff.export.train_shapes OUT --resume   # continue from the last checkpoint

Stages, each checkpointed every ``--checkpoint-every`` steps into ``--workdir`` and resumable:
1. tokenizer: a CLIP byte-level BPE whose merges are learned on the caption vocabulary;
2. VAE (AutoencoderKL, downscale 4: 64x64x3 -> 16x16x4), L1 + MSE reconstruction + a small KL term;
   its ``scaling_factor`` is 1/std of the latents, as Stable Diffusion chose 0.18215;
3. UNet + text encoder, jointly, v-prediction on SD's scaled-linear schedule rescaled to zero terminal SNR, the caption
   dropped (empty prompt) 10% of the time so classifier-free guidance works; EMA weights are kept
   and shipped.
Checkpoints carry the compute seconds spent so far, so ``training.json`` reports the whole
training time across resumes. Data are drawn per step from the seed
(``shapes.dataset(batch, seed=f(seed, stage, step))``), so a resumed run sees exactly the batches an uninterrupted
one would. Held-out combinations of colour, shape and background never appear in training. ``--phrasing`` picks
the caption recipe: v1 (default; shapes-v1 was trained with it, before the option existed) or v2 (more wordings;
``shapes.PHRASINGS``); it changes only the captions and the tokenizer's word list, never the images (so the VAE
stage is the same), and resuming a UNet checkpoint of another recipe is refused. The loss curves, settings and
timings go to ``OUT/training.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import time
from pathlib import Path

import numpy as np

from edgediff.runtime.specs import CLIP_POSITIONS

logger = logging.getLogger("edgediff.train_shapes")

IMAGE_SIZE = 64
UNET = dict(
    sample_size=16, in_channels=4, out_channels=4, block_out_channels=(48, 96, 96), layers_per_block=1,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=64, attention_head_dim=8, norm_num_groups=16,
)  # fmt: skip
VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32, 64), layers_per_block=1,
    down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
    norm_num_groups=16, sample_size=IMAGE_SIZE,
)  # fmt: skip
TEXT = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_hidden_layers=2,
            max_position_embeddings=CLIP_POSITIONS, hidden_act="quick_gelu", projection_dim=64,
            layer_norm_eps=1e-5)  # fmt: skip
# Lin et al. 2023 ("Common Diffusion Noise Schedules and Sample Steps are Flawed"): with SD's own schedule the last
# training step still carries sqrt(alpha_bar) = 0.068 of the image, the model learns to read the object's place
# from that leak instead of from the caption, and at sampling time pure noise then decides where the object
# lands (shapes-v0: position right 26 %). Zero terminal SNR + v-prediction + trailing timesteps removes the leak;
# all three are standard diffusers options (SD 2.x is v-prediction) that the runtime's schedulers implement.
SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                prediction_type="v_prediction", rescale_betas_zero_snr=True, timestep_spacing="trailing")  # fmt: skip


def _batch_seed(seed: int, stage: int, step: int) -> int:
    return (seed * 1_000_003 + stage * 7_919_993 + step) % (2**31)


def _to_tensor(images: np.ndarray):
    import torch

    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


class Checkpoints:
    """One file per stage in the work dir, written atomically (temporary file, then rename)."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)

    def path(self, stage: str) -> Path:
        return self.workdir / f"{stage}.pt"

    def load(self, stage: str):
        import torch

        p = self.path(stage)
        return torch.load(p, map_location="cpu", weights_only=False) if p.exists() else None

    def save(self, stage: str, state: dict) -> None:
        import torch

        tmp = self.path(stage).with_suffix(".tmp")
        torch.save(state, tmp)
        os.replace(tmp, self.path(stage))


def train_vae(args, ckpt: Checkpoints, log: dict):
    import torch
    from diffusers import AutoencoderKL

    from edgediff.runtime import shapes

    torch.manual_seed(args.seed)
    vae = AutoencoderKL(**VAE)
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    start, curve, spent = 0, [], 0.0
    state = ckpt.load("vae") if args.resume else None
    if state:
        vae.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        start, curve, spent = state["step"], state["curve"], state.get("seconds", 0.0)
    t0 = time.time()
    for step in range(start, args.vae_steps):
        images, _ = shapes.dataset(args.vae_batch, seed=_batch_seed(args.seed, 1, step), split="train")
        x = _to_tensor(images)
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        kl = posterior.kl().mean() / x[0].numel()
        loss = (recon - x).abs().mean() + ((recon - x) ** 2).mean() + args.vae_kl * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 25 == 0 or step == args.vae_steps - 1:
            curve.append([step, float(loss.detach())])
            logger.info("vae step %d/%d loss %.4f (%.1f s)", step, args.vae_steps, float(loss), time.time() - t0)
        if (step + 1) % args.checkpoint_every == 0 or step == args.vae_steps - 1:
            ckpt.save("vae", {"step": step + 1, "model": vae.state_dict(), "opt": opt.state_dict(), "curve": curve,
                              "seconds": spent + time.time() - t0})  # fmt: skip
    log["vae"] = {"steps": args.vae_steps, "batch": args.vae_batch, "lr": args.vae_lr, "kl_weight": args.vae_kl,
                  "curve": curve, "seconds": spent + time.time() - t0}  # fmt: skip
    vae.eval()
    with torch.no_grad():  # SD's recipe: scale latents to unit variance
        images, _ = shapes.dataset(512, seed=_batch_seed(args.seed, 9, 0), split="train")
        z = vae.encode(_to_tensor(images)).latent_dist.mean
        vae.register_to_config(scaling_factor=float(1.0 / z.std()))
    log["vae"]["scaling_factor"] = vae.config.scaling_factor
    return vae


def _latent_pool(vae, args):
    """(latent mean, std, caption) for a fixed pool of training scenes, encoded once."""
    import torch

    from edgediff.runtime import shapes

    means, stds, captions = [], [], []
    with torch.no_grad():
        for k in range(args.pool // 256):
            images, caps = shapes.dataset(
                256, seed=_batch_seed(args.seed, 2, k), split="train", phrasing=args.phrasing
            )
            dist = vae.encode(_to_tensor(images)).latent_dist
            means.append(dist.mean)
            stds.append(dist.std)
            captions += caps
    return torch.cat(means), torch.cat(stds), captions


def train_unet(args, vae, tokenizer, ckpt: Checkpoints, log: dict):
    import torch
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(args.seed + 1)
    unet = UNet2DConditionModel(**UNET)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, **TEXT,
    ))  # fmt: skip
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=args.unet_lr, weight_decay=0.01)
    ema_unet, ema_text = copy.deepcopy(unet).requires_grad_(False), copy.deepcopy(text_encoder).requires_grad_(False)
    noise_schedule = DDPMScheduler(**SCHEDULE)
    start, curve, spent = 0, [], 0.0
    state = ckpt.load("unet") if args.resume else None
    if state and state.get("phrasing", "v1") != args.phrasing:  # checkpoints from before the option are v1
        raise SystemExit(
            f"error: {ckpt.path('unet')} was trained with --phrasing {state.get('phrasing', 'v1')}, not "
            f"{args.phrasing}: resume with that, or give a fresh --workdir"
        )
    if state:
        unet.load_state_dict(state["unet"])
        text_encoder.load_state_dict(state["text"])
        ema_unet.load_state_dict(state["ema_unet"])
        ema_text.load_state_dict(state["ema_text"])
        opt.load_state_dict(state["opt"])
        start, curve, spent = state["step"], state["curve"], state.get("seconds", 0.0)
    means, stds, captions = _latent_pool(vae, args)
    scale = vae.config.scaling_factor
    empty_ids = tokenizer([""], padding="max_length", max_length=CLIP_POSITIONS, return_tensors="pt").input_ids
    t0 = time.time()
    for step in range(start, args.unet_steps):
        g = torch.Generator().manual_seed(_batch_seed(args.seed, 3, step))
        idx = torch.randint(0, len(captions), (args.batch,), generator=g)
        latents = (means[idx] + stds[idx] * torch.randn(means[idx].shape, generator=g)) * scale
        ids = tokenizer([captions[i] for i in idx.tolist()], padding="max_length", max_length=CLIP_POSITIONS,
                        truncation=True, return_tensors="pt").input_ids  # fmt: skip
        drop = torch.rand(args.batch, generator=g) < args.uncond_prob
        ids[drop] = empty_ids
        noise = torch.randn(latents.shape, generator=g)
        t = torch.randint(0, SCHEDULE["num_train_timesteps"], (args.batch,), generator=g)
        noisy = noise_schedule.add_noise(latents, noise, t)
        lr = (
            args.unet_lr
            * min(1.0, (step + 1) / 200)
            * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / args.unet_steps)))
        )
        for group in opt.param_groups:
            group["lr"] = lr
        pred = unet(noisy, t, text_encoder(ids)[0]).sample
        loss = torch.nn.functional.mse_loss(pred, noise_schedule.get_velocity(latents, noise, t))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for ema, live in ((ema_unet, unet), (ema_text, text_encoder)):
                for pe, pl in zip(ema.parameters(), live.parameters()):
                    pe.mul_(decay).add_(pl.detach(), alpha=1 - decay)
        if step % 25 == 0 or step == args.unet_steps - 1:
            curve.append([step, float(loss.detach())])
            logger.info(
                "unet step %d/%d loss %.4f lr %.2e (%.1f s)", step, args.unet_steps, float(loss), lr, time.time() - t0
            )
        if (step + 1) % args.checkpoint_every == 0 or step == args.unet_steps - 1:
            ckpt.save("unet", {"step": step + 1, "unet": unet.state_dict(), "text": text_encoder.state_dict(),
                               "ema_unet": ema_unet.state_dict(), "ema_text": ema_text.state_dict(),
                               "opt": opt.state_dict(), "curve": curve, "phrasing": args.phrasing,
                               "seconds": spent + time.time() - t0})  # fmt: skip
    log["unet"] = {"steps": args.unet_steps, "batch": args.batch, "lr": args.unet_lr, "ema": args.ema,
                   "uncond_prob": args.uncond_prob, "pool": args.pool, "curve": curve,
                   "seconds": spent + time.time() - t0}  # fmt: skip
    return ema_unet, ema_text


def caption_words(phrasing: str = "v1") -> list[str]:
    from edgediff.runtime import shapes

    if phrasing != "v1":
        return sorted(shapes.phrasing_words(phrasing))
    words = set()  # v1: exactly the list shapes-v1's tokenizer was learned on
    for t in shapes.TEMPLATES:
        words.update(w for w in t.replace(",", " ").split() if "{" not in w)
    words.update(shapes.COLOURS + shapes.SHAPES + shapes.SIZES + ("left", "right", "top", "bottom", "centre", "an"))
    return sorted(words)


def main(argv: list[str] | None = None) -> None:
    import torch
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    from edgediff.export.random_model import write_clip_tokenizer

    p = argparse.ArgumentParser(description="Train edgediff's embedded shapes model on CPU.")
    p.add_argument("out", type=Path)
    p.add_argument("--workdir", type=Path, default=Path.home() / ".cache" / "edgediff" / "train-shapes")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--vae-steps", type=int, default=2400)
    p.add_argument("--vae-batch", type=int, default=32)
    p.add_argument("--vae-lr", type=float, default=1e-3)
    p.add_argument("--vae-kl", type=float, default=1e-4)
    p.add_argument("--unet-steps", type=int, default=3600)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--unet-lr", type=float, default=1e-3)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--uncond-prob", type=float, default=0.1)
    p.add_argument("--pool", type=int, default=16384)
    p.add_argument("--checkpoint-every", type=int, default=100)
    p.add_argument("--phrasing", choices=("v1", "v2"), default="v1",
                   help="caption recipe (shapes.PHRASINGS): v1 trained shapes-v1; v2 adds synonyms, spellings, "
                        "articles, word orders and extra words")  # fmt: skip
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # CPU training slows several-fold once weights/grads hit denormals
    ckpt = Checkpoints(args.workdir)
    log: dict = {"command": "python -m edgediff.export.train_shapes " + " ".join(argv or []), "settings": vars(args)}
    log["settings"] = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    log["architecture"] = {"unet": UNET, "vae": VAE, "text": TEXT, "schedule": SCHEDULE, "image_size": IMAGE_SIZE}
    tok_dir = args.workdir / "tokenizer"
    write_clip_tokenizer(tok_dir, num_merges=400, words=caption_words(args.phrasing))
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir)
    t0 = time.time()
    vae = train_vae(args, ckpt, log)
    unet, text_encoder = train_unet(args, vae, tokenizer, ckpt, log)
    scheduler = DPMSolverMultistepScheduler(**SCHEDULE, steps_offset=1)
    pipe = StableDiffusionPipeline(
        unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    pipe.save_pretrained(args.out)
    log["seconds_this_run"] = time.time() - t0
    (args.out / "training.json").write_text(json.dumps(log, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
