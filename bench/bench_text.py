"""Text generation speed: new tokens per second of the text backbone, per batch size.

Each user's prompt holds preference tokens (a synthetic export of the same shape as
ml-100k-mm's: 2 modalities x 3 levels x 256 codes), goes through the same injection and
``generate_texts`` path as the real stage, and is forced to write exactly ``--new-tokens``
tokens (greedy, no early stop), so tokens/s = users x new tokens / seconds.

    python bench/bench_text.py                               # SmolLM2-135M, batch sizes 1, 8, 16
    python bench/bench_text.py --backbone tiny --users 4     # a 2-layer model built from config (quick)
    python bench/bench_text.py --backbone path/to/hf_model --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # the tiny model builders


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="smollm2-135m-instruct", help="backbone name/path, or 'tiny'")
    parser.add_argument("--batch-sizes", default="1,8,16")
    parser.add_argument("--users", type=int, default=16, help="texts per batch-size setting")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from text_tiny import FakeTokens, tiny_lm, tiny_tokenizer

    from recbole_dppmg.generation.common.vocabulary import PreferenceVocabulary
    from recbole_dppmg.generation.text.generate import TokenConditioner, generate_texts
    from recbole_dppmg.generation.text.injection import inject_preference_tokens

    if args.backbone == "tiny":
        from recbole_dppmg.devices import resolve_device

        tokenizer = tiny_tokenizer()
        model = tiny_lm(tokenizer).to(resolve_device(args.device, key="--device"))
        tokens = FakeTokens(n_users=args.users)
    else:
        from recbole_dppmg.generation.text.backbone import load_backbone

        model, tokenizer = load_backbone(args.backbone, args.dtype, args.device)
        tokens = FakeTokens(n_users=args.users, levels=3, codebook_size=256, dim=64)
    vocabulary = PreferenceVocabulary(tokens)
    lm = inject_preference_tokens(model, tokenizer, vocabulary, backbone=args.backbone)
    conditioner = TokenConditioner(lm, vocabulary)
    model.generation_config.min_new_tokens = args.new_tokens  # no early stop: an exact token count
    users = tokens.users[: args.users]
    print(
        f"backbone {args.backbone}, device {lm.device}, {torch.get_num_threads()} threads, {len(users)} texts x "
        f"{args.new_tokens} new tokens"
    )
    print("| batch size | seconds | new tokens/s | texts/s |\n|---|---|---|---|")
    for batch_size in [int(b) for b in args.batch_sizes.split(",")]:
        generate_texts(
            lm.model,
            lm.tokenizer,
            conditioner,
            users[:batch_size],
            batch_size=batch_size,
            max_new_tokens=2,
            progress=False,
        )  # warm-up
        start = time.perf_counter()
        generate_texts(
            lm.model,
            lm.tokenizer,
            conditioner,
            users,
            batch_size=batch_size,
            max_new_tokens=args.new_tokens,
            do_sample=False,
            suppress_ids=lm.token_ids,
            progress=False,
        )
        seconds = time.perf_counter() - start
        print(
            f"| {batch_size} | {seconds:.2f} | {len(users) * args.new_tokens / seconds:.1f} | "
            f"{len(users) / seconds:.2f} |"
        )


if __name__ == "__main__":
    main()
