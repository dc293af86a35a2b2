"""Generation speed at the shipped instruction studies' settings, and whether a faster setting keeps the completions.

The test prompts of an instruction task (by default the bundled reviews-instruct, 100 prompts, 8 new tokens,
as `instruct-placement` evaluates them) are completed greedily by the base model through peftlab's `generate`
(length-sorted, left-padded batches with the KV cache) under the run's autocast, once per attention kernel and
batch size, after a warm-up. The first setting is the reference: every other prints its tokens/s as a ratio to it and how many of
its completions are identical, token for token. Nothing is trained.

    python benchmarks/generation.py                                  # Gemma 3 270M: eager and sdpa, batch 16 and 100
    python benchmarks/generation.py --kernels sdpa --batch-sizes 16,32,64
"""

from __future__ import annotations

import argparse
import dataclasses

import torch
from common import append_result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gemma-3-270m")
    parser.add_argument("--task", default="reviews-instruct")
    parser.add_argument("--examples", type=int, default=100)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--kernels", default="sdpa,eager", help="attention kernels; the first is the reference")
    parser.add_argument("--batch-sizes", default="16,100", help="the first is the reference")
    parser.add_argument("--precision", default="native")
    args = parser.parse_args()

    from peftlab.config import validate
    from peftlab.models.load import load_model
    from peftlab.resolve.run import resolve_run
    from peftlab.specs import GenerateSpec, RunConfig
    from peftlab.train.context import precision
    from peftlab.train.generation import generate

    config = validate(RunConfig, {
        "model": args.model, "task": {"name": args.task, "max_length": 128, "max_eval_examples": 200},
        "train": {"precision": args.precision},
        "eval": {"generate": {"examples": args.examples, "max_new_tokens": args.max_new_tokens}},
    }, "benchmark")
    run = resolve_run(config)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    mixed = precision(args.precision, device)

    def autocast():
        dtype = torch.float16 if mixed == "fp16" else torch.bfloat16
        return torch.autocast(device, dtype=dtype, enabled=mixed in ("bf16", "fp16"))

    lengths = [len(ids) for ids in run.prompts.ids]
    print(f"{len(lengths)} prompts of {min(lengths)}-{max(lengths)} tokens (mean {sum(lengths) / len(lengths):.1f}), "
          f"{args.max_new_tokens} new tokens at most, autocast {mixed}")
    reference, figures = None, []
    for kernel in args.kernels.split(","):
        model = load_model(config.model, attn_implementation=kernel).to(device)
        warm = dataclasses.replace(run.prompts, ids=run.prompts.ids[:8], texts=run.prompts.texts[:8],
                                   references=run.prompts.references[:8])
        generate(model, warm, GenerateSpec(examples=8, max_new_tokens=2, batch_size=8), run.tokenizer, device, autocast)
        for size in map(int, args.batch_sizes.split(",")):
            spec = GenerateSpec(examples=args.examples, max_new_tokens=args.max_new_tokens, batch_size=size)
            done = generate(model, run.prompts, spec, run.tokenizer, device, autocast)
            reference = reference or (done, kernel, size)
            same = sum(a == b for a, b in zip(done.texts, reference[0].texts))
            ratio = done.tokens_per_second / reference[0].tokens_per_second
            figures.append({"kernel": kernel, "batch_size": size, "seconds": done.seconds,
                            "tokens": sum(done.new_tokens), "tokens_per_second": done.tokens_per_second,
                            "ratio": ratio, "identical": same})
            print(f"{kernel:>6}, batch {size:>3}: {done.seconds:6.2f} s, {sum(done.new_tokens)} tokens, "
                  f"{done.tokens_per_second:6.1f} tokens/s ({ratio:.2f}x the reference), "
                  f"{same} of {len(done.texts)} completions identical to {reference[1]}, batch {reference[2]}")
    append_result("generation", {"model": args.model, "task": args.task, "examples": len(lengths),
                                 "max_new_tokens": args.max_new_tokens, "autocast": mixed, "figures": figures})


if __name__ == "__main__":
    main()
