"""Candidate shapes CLIPs: train one briefly, then ask whether its attention maps localise.

How the shipped CLIP's recipe was chosen (its model card has the table). Two kinds of run:

* ``train``: a CLIP from scratch with :class:`bicm.shapes.train.TrainConfig` overrides, e.g.

      python benchmarks/shapes_clip_probe.py train c6 '{"steps": 700}'
      python benchmarks/shapes_clip_probe.py train c5 '{"layers": 2, "steps": 700, "crop_scale": 1.0}'

* ``finetune``: continue a checkpoint for a few hundred steps (batch 128) with a change to the
  last block's attention during training only, the model staying a standard open_clip ViT:
  ``--attn-dropout P`` (dropout on its attention weights) or ``--entropy-floor H`` (a penalty
  ``relu(H - entropy)`` on each head's [CLS] attention, in nats), e.g.

      python benchmarks/shapes_clip_probe.py finetune ft-entropy --init c4/m.safetensors --entropy-floor 3.0

Each run writes ``OUT/NAME/...`` and prints one ``RESULT`` line: zero-shot naming, held-out
retrieval, and :func:`bicm.shapes.probe.map_metrics` (pointing game QA/VA, QAM box IoU and
area by kind and size, attention concentration) on 100 ``val`` scenes of each protocol.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["train", "finetune"])
    parser.add_argument("name")
    parser.add_argument("config", nargs="?", default="{}", help="TrainConfig overrides as JSON")
    parser.add_argument("--out", type=Path, default=Path("runs/clip-probes"))
    parser.add_argument("--init", type=Path, help="finetune: the checkpoint to continue")
    parser.add_argument("--steps", type=int, default=300, help="finetune: steps")
    parser.add_argument("--attn-dropout", type=float, default=0.0)
    parser.add_argument("--entropy-floor", type=float, default=0.0)
    parser.add_argument("--map-images", type=int, default=100)
    args = parser.parse_args()

    from bicm.shapes.train import TrainConfig, train_clip

    overrides = {"scenes": 8000, "singles": 4000, **json.loads(args.config)}
    cfg = TrainConfig(**overrides)
    started = time.perf_counter()
    if args.mode == "train":

        def step(i: int, record: dict) -> None:
            if i % 50 == 0 or "i2t" in record:
                print(i, round(time.perf_counter() - started), {k: round(v, 3) for k, v in record.items()}, flush=True)

        card = train_clip(cfg, args.out / args.name / "m.safetensors", on_step=step, save_every=0, map_images=args.map_images)
    else:
        card = finetune(replace(cfg, batch_size=128, scenes=4000, singles=2000, seed=5), args)
    loc = card["localisation"]
    print("RESULT", args.name, json.dumps({
        "zero_shot": card["zero_shot_single_object_30_way"], "retrieval": card["retrieval"],
        **{p: {"attention": loc[p]["attention"], "all": loc[p]["all"], "by_area": loc[p]["by_area"]} for p in loc},
    }), flush=True)


def finetune(cfg, args) -> dict:
    import open_clip
    from safetensors.torch import load_file

    from bicm.checkpoints import save_checkpoint
    from bicm.qam import cls_attention
    from bicm.shapes.train import Batches, clip_metrics, make_pool, model_config, preprocess_spec

    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    model = open_clip.CLIP(**model_config(cfg))
    model.load_state_dict({k: v.float() for k, v in load_file(str(args.init)).items()})
    last = model.visual.transformer.resblocks[-1]
    last.attn.dropout = args.attn_dropout
    entering: dict = {}
    last.register_forward_pre_hook(lambda module, inputs: entering.__setitem__("x", inputs[0]))
    model.train()
    tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=cfg.context_length)
    batches = Batches(make_pool(cfg), cfg, tokenizer, seed=11)
    optim = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1, betas=(0.9, 0.98), eps=1e-6)
    for step in range(args.steps):
        for group in optim.param_groups:
            group["lr"] = 3e-4 * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        images, tokens, _ = batches()
        image_f, text_f, scale = model(images, tokens)
        logits = scale * image_f @ text_f.T
        target = torch.arange(len(images))
        loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
        if args.entropy_floor > 0:
            x = entering["x"]
            x = x if x.shape[0] == len(images) else x.transpose(0, 1)
            att, _ = cls_attention(last, x)
            entropy = -(att * att.clamp_min(1e-9).log()).sum(-1)
            loss = loss + F.relu(args.entropy_floor - entropy).mean()
        optim.zero_grad()
        loss.backward()
        optim.step()
        if step % 50 == 0:
            print(step, round(loss.item(), 3), flush=True)
    model.eval()
    last.attn.dropout = 0.0
    out = args.out / args.name / "m.safetensors"
    out.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(model, out, model_config(cfg), preprocess_spec(cfg))
    return clip_metrics(model, cfg, args.map_images)


if __name__ == "__main__":
    main()
