"""The training loop of the bundled default model; what it does and its flags: train_config.py."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace

import torch
from tqdm import tqdm

from llava_serve.default_model.batches import by_length, collate, examples, image_batches, prefetched, vision_targets
from llava_serve.default_model.build import ModelSize, build_model, build_processor, count_parameters, save_checkpoint
from llava_serve.default_model.resize import grow_tower, resize_model, resize_processor
from llava_serve.default_model.tokenizer import build_tokenizer
from llava_serve.default_model.train_config import TrainConfig, parse_args, parse_weights
from llava_serve.default_model.vision_aux import FeatureTap, VisionHeads


def learning_rate(peak: float, step: int, total: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to ``min_lr_ratio`` of the peak."""
    if step < cfg.warmup:
        return peak * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, total - cfg.warmup)
    return peak * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


@dataclass
class Trainer:
    cfg: TrainConfig
    size: ModelSize
    heads: VisionHeads | None = field(default=None, init=False)  # from the vision stage, if it ran
    tap: FeatureTap | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        torch.set_num_threads(self.cfg.threads)
        if self.cfg.init_from is not None:
            from transformers import LlavaForConditionalGeneration, LlavaProcessor

            self.processor = LlavaProcessor.from_pretrained(self.cfg.init_from)
            model = LlavaForConditionalGeneration.from_pretrained(self.cfg.init_from, dtype=torch.float32)
            vision = model.config.vision_config
            wanted = (self.cfg.image_size or vision.image_size, self.cfg.patch_size or vision.patch_size)
            if wanted != (vision.image_size, vision.patch_size):
                old = f"{vision.image_size} px, patch {vision.patch_size}"
                print(f"converting the tower: {old} -> {wanted[0]} px, patch {wanted[1]}")
                resize_model(model, *wanted)
                resize_processor(self.processor, *wanted)
            if self.cfg.grow_tower:
                depth = vision.num_hidden_layers
                print(f"growing the tower: {depth} -> {depth + self.cfg.grow_tower} layers")
                grow_tower(model, self.cfg.grow_tower)
            self.size = replace(self.size, image_size=vision.image_size, patch_size=vision.patch_size,
                                vision_hidden=vision.hidden_size)  # fmt: skip
            self.model = model.to(self.cfg.device)
        else:
            if self.cfg.image_size:
                self.size = replace(self.size, image_size=self.cfg.image_size, patch_size=self.cfg.patch_size)
            self.processor = build_processor(self.size, build_tokenizer())
            self.model = build_model(self.size, self.processor.tokenizer, self.cfg.seed).to(self.cfg.device)
        print(f"parameters: {count_parameters(self.model):,}; image tokens: {self.size.image_tokens}")

    def vision_stage(self) -> None:
        """The tower alone, supervised per patch and per shape (see vision_aux)."""
        cfg, tower = self.cfg, self.model.model.vision_tower
        if cfg.vision_steps == 0:
            return
        self.heads = heads = VisionHeads(self.size.vision_hidden).to(cfg.device)
        self.tap = tap = FeatureTap(self.model)
        optimizer = _optimizer([tower, heads], cfg)
        batches = prefetched(
            image_batches(cfg.seed + 1, self.processor, self.size, cfg.vision_batch_size, cfg.easy_steps)
        )
        bar = tqdm(range(cfg.vision_steps), desc="vision", mininterval=2.0)
        for step in bar:
            pixels, *targets = (t.to(cfg.device) for t in next(batches))
            with self._autocast():
                tower(pixel_values=pixels)
                out = heads.losses(tap.features, *self._head_targets(targets))
            loss = vision_loss(out, cfg.count_weight, cfg.density_weight)
            _step(optimizer, loss, learning_rate(cfg.vision_lr, step, cfg.vision_steps, cfg))
            bar.set_postfix(kind=f"{out['kind_acc']:.3f}", shape=f"{out['shape_acc']:.3f}")
            if step % 100 == 0 or step == cfg.vision_steps - 1:
                accuracies = "  ".join(f"{k} {v.item():.3f}" for k, v in out.items() if k.endswith("acc"))
                tqdm.write(f"vision step {step:5d}  {accuracies}")

    def dialogue_stage(self) -> None:
        """Projector and decoder on the dialogues; the tower frozen (as in LLaVA) unless aux_weight > 0."""
        cfg = self.cfg
        heads = self.heads if cfg.aux_weight > 0 else None  # the tower trains on only with its heads
        self.model.model.vision_tower.requires_grad_(heads is not None)
        modules = [self.model] if heads is None else [self.model, heads]
        optimizer = _optimizer(modules, cfg, [p for m in modules for p in m.parameters() if p.requires_grad])
        weights = parse_weights(cfg.question_weights)
        stream = examples(cfg.seed, weights, cfg.text_only, cfg.varied_greetings, cfg.same_scenes)
        batches = prefetched(self._dialogue_batches(stream, with_targets=heads is not None))
        bar = tqdm(range(cfg.steps), desc="dialogue", mininterval=2.0)
        ema = None
        for step in bar:
            batch, targets = next(batches)
            with self._autocast():
                loss = self.model(**{k: v.to(cfg.device) for k, v in batch.items()}).loss
                total = loss
                if heads is not None and self.tap is not None and self.tap.features is not None and targets is not None:
                    aux = heads.losses(self.tap.features, *self._head_targets([t.to(cfg.device) for t in targets]))
                    total = loss + cfg.aux_weight * vision_loss(aux, cfg.count_weight, cfg.density_weight)
            _step(optimizer, total, learning_rate(cfg.lr, step, cfg.steps, cfg))
            ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
            bar.set_postfix(loss=f"{ema:.4f}")
            if step % 100 == 0 or step == cfg.steps - 1:
                tqdm.write(f"dialogue step {step:5d}  answer loss {loss.item():.4f} (ema {ema:.4f})")
            if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < cfg.steps:
                save_checkpoint(self.model.eval(), self.processor, cfg.out.with_name(f"{cfg.out.name}-step{step + 1}"))
                self.model.train()
        self.model.model.vision_tower.requires_grad_(True)
        if self.tap is not None:
            self.tap.close()

    def _head_targets(self, targets: list[torch.Tensor]) -> tuple:
        """vision_targets' tensors as VisionHeads.losses takes them: counts and densities only when weighted."""
        labels, regions, centres, counts, densities = targets
        return (labels, regions, centres, counts if self.cfg.count_weight else None,
                densities if self.cfg.density_weight else None)  # fmt: skip

    def _autocast(self):
        """bfloat16 matmuls (weights, optimizer state and losses stay float32): a quarter faster on a
        CPU with bfloat16 instructions."""
        return torch.autocast(torch.device(self.cfg.device).type, torch.bfloat16, enabled=self.cfg.precision == "bf16")

    def _dialogue_batches(self, stream, with_targets: bool):
        """(model inputs, the tower's targets for the batch's pictures or None), forever."""
        for chunk in by_length(stream, self.cfg.batch_size, self.cfg.seed + 2):
            scenes = [ex.scene for ex in chunk if ex.scene is not None]
            targets = vision_targets(scenes, self.size) if with_targets and scenes else None
            yield collate(chunk, self.processor), targets


def vision_loss(out: dict[str, torch.Tensor], count_weight: float = 0.0, density_weight: float = 0.0) -> torch.Tensor:
    loss = out["colour"] + out["kind"] + out["centre"] + out["shape"] + out["region"]
    loss = loss + count_weight * out["count"] if "count" in out else loss
    return loss + density_weight * out["density"] if "density" in out else loss


def _step(optimizer: torch.optim.Optimizer, loss: torch.Tensor, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], 1.0)
    optimizer.step()


def train(cfg: TrainConfig, size: ModelSize | None = None, save: bool = True):
    start = time.monotonic()
    trainer = Trainer(cfg, size or ModelSize())
    trainer.model.train()
    trainer.vision_stage()
    trainer.dialogue_stage()
    model = trainer.model.eval()
    print(f"trained {cfg.vision_steps} + {cfg.steps} steps in {time.monotonic() - start:.0f} s")
    if save:
        save_checkpoint(model.cpu(), trainer.processor, cfg.out)
        print(f"saved to {cfg.out}")
    return model, trainer.processor


def _optimizer(modules: list[torch.nn.Module], cfg: TrainConfig, only: list | None = None) -> torch.optim.Optimizer:
    keep = {id(p) for p in only} if only is not None else None
    named = [(n, p) for m in modules for n, p in m.named_parameters() if keep is None or id(p) in keep]
    decay = [p for n, p in named if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in named if p.ndim < 2 or "embed" in n]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.98))


def main(argv: list[str] | None = None) -> None:
    train(parse_args(argv))


if __name__ == "__main__":
    main()
