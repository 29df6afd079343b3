"""Seconds per generated poster of the default image generator on this machine.

Samples --posters posters (seeded noise, tokens of the first users of the export) with the
checkpoint's network, --steps denoising steps and --guidance (classifier-free guidance doubles
the UNet batch), then decodes them with the autoencoder; reports the median over --repeats
of (sampling + decoding) / posters. Without --checkpoint an untrained network of the default
shape is timed (the cost does not depend on the weights).

    python bench/bench_image.py --checkpoint saved/ml-100k-mm/ImageGen-cpu \\
        --tokens saved/ml-100k-mm/DPPMG-<time>/tokens
    python bench/bench_image.py --tiny          # seconds, tiny model in pixel space (smoke test)
    python bench/bench_image.py --tiny --device cuda

``--evaluate`` runs the image generator's evaluation instead (``generation/image/evaluate.py``:
Fréchet distance against the untrained network, the mean poster, the autoencoder and the
real-vs-real floor at the same N; own-minus-shuffled retrieval per condition on the test users,
or ``--split valid`` to choose settings):

    python bench/bench_image.py --evaluate -d ml-100k-mm --checkpoint saved/ml-100k-mm/ImageGen-<time> \
        --tokens saved/ml-100k-mm/DPPMG-<time>/tokens [--split valid] [--fd 500]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from recbole_dppmg.devices import resolve_device
from recbole_dppmg.generation.common.settings import load_settings
from recbole_dppmg.generation.image.autoencoder import PixelCodec
from recbole_dppmg.generation.image.generate import generate_posters
from recbole_dppmg.generation.image.model import PosterDiffusion
from recbole_dppmg.generation.image.train import build_codec, load_image_generator


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", help="ImageGen-* run folder (default: untrained default network)")
    parser.add_argument("--posters", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=2.0)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tiny", action="store_true", help="tiny pixel-space network (smoke test)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto (network and autoencoder)")
    parser.add_argument("--evaluate", action="store_true", help="the evaluation of --checkpoint instead of timing")
    parser.add_argument("--dataset", "-d", default="ml-100k-mm", help="--evaluate: dataset")
    parser.add_argument("--tokens", help="--evaluate: the token export the generator was trained on")
    parser.add_argument("--split", default="test", choices=["valid", "test"], help="--evaluate: users scored")
    parser.add_argument("--fd", type=int, default=500, help="--evaluate: posters in the Fréchet distance")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.evaluate:
        from recbole_dppmg.generation.image.evaluate import evaluate_image_generator

        if not (args.checkpoint and args.tokens):
            raise SystemExit("--evaluate needs --checkpoint and --tokens")
        evaluate_image_generator(
            args.dataset, args.tokens, args.checkpoint, {"num_threads": args.threads}, n_fd=args.fd, split=args.split
        )
        return

    if args.tiny:
        settings = load_settings(
            "image",
            {
                "space": "pixel",
                "height": 16,
                "width": 8,
                "unet_channels": [8, 16],
                "attention_head_dim": 4,
                "cross_attention_dim": 8,
                "norm_num_groups": 4,
                "conditioning": "tokens",
            },
        )
        model, codec = PosterDiffusion(settings, torch.randn(24, 4), 6, 3).eval(), PixelCodec()
    elif args.checkpoint:
        model, meta = load_image_generator(args.checkpoint)
        codec, _ = build_codec(load_settings("image", {**meta["train"], **meta["model"]}))
    else:
        settings = load_settings("image")
        model, codec = PosterDiffusion(settings, torch.randn(1536, 64), 6, 32).eval(), build_codec(settings)[0]
    device = resolve_device(args.device, key="--device")
    model.to(device)
    if isinstance(codec, torch.nn.Module):
        codec.to(device)
    positions = torch.randint(
        0,
        len(model.projection.codebook_vectors),
        (args.posters, model.n_slots),
        generator=torch.Generator().manual_seed(0),
    )
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        generate_posters(
            model, codec, positions, steps=args.steps, guidance=args.guidance, batch_size=args.batch, progress=False
        )
        times.append((time.perf_counter() - start) / args.posters)
    c = model.config
    print(
        f"{c['height']}x{c['width']} posters ({c['space']} space, UNet {c['unet_channels']}), {args.steps} steps, "
        f"guidance {args.guidance}, "
        f"batch {args.batch}, {device}, {args.threads} thread(s): {statistics.median(times):.3f} s per poster (median "
        f"of {args.repeats})"
    )


if __name__ == "__main__":
    main()
