"""What a `kleinserve toy train` run is set by: TrainConfig (every stage's step counts, learning rates and
shares; written into the model's model_index.json) and the shares of the transformer's batch kinds. The
stages themselves are in train.py (the module docstring lists them), the transformer's loop in fit.py."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

Log = Callable[[str], None]


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 0
    vae_small_steps: int = 3400  # batches of 8 whole scenes drawn at 64 px
    vae_full_steps: int = 300  # batches of 4 whole scenes drawn at 128 px
    vae_lr: float = 3e-4  # 1e-3 diverges: flat colour fields make GroupNorm statistics nearly singular
    decoder_steps: int = 500  # batches of 8 scenes at 128 px or 2 at 256, decoder only, last
    decoder_lr: float = 2e-4
    decoder_sampled_share: float = 0.5  # fraction of decoder batches decoded from the transformer's samples
    text_steps: int = 1000  # batches of text_batch prompts of every kind
    text_batch: int = 64
    text_lr: float = 1e-3
    transformer_steps: int = 11000  # the committed weights: ~37 min at 0.20 s/step
    transformer_lr: float = 8e-4
    warmup_steps: int = 150
    ema_decay: float = 0.998
    batch_128: int = 8
    batch_256: int = 4
    share_256: float = 0.25  # fraction of transformer batches at 256 px
    schedule_share: float = 0.5  # fraction of noise levels taken from the 4-step schedule
    # Stage 4b, the transformer refined on the inputs its own 4-step sampler gives it (train_on_samples).
    refine_steps: int = 1500
    refine_lr: float = 2e-4
    refine_share: float = 0.6  # fraction of stage-4b batches whose input is sampled; the rest as stage 3
    refine_share_256: float = 0.6  # fraction of stage-4b batches at 256 px
    # Stage 5, the transformer then the decoder fine-tuned for masked edits (train_inpaint).
    inpaint_steps: int = 7000
    inpaint_lr: float = 3e-4
    inpaint_share: float = 0.35  # fraction of stage-5 batches of the "inpaint" kind; the rest as BATCH_KINDS
    inpaint_schedule_share: float = 1.0  # stage 5's noise levels: only those klein's 4-step sampler visits
    inpaint_decoder_steps: int = 500
    inpaint_decoder_share: float = 0.7  # fraction of its sampled batches of the "inpaint" kind
    # Stage 6, the transformer fine-tuned mostly on captions (train_shapes, SHAPES_KINDS).
    shapes_steps: int = 6000
    shapes_lr: float = 3e-4
    shapes_share_256: float = 0.5
    # Stage 7, stage 6 again with caption batches of shape pairs and a loss on their difference (train_pairs).
    pairs_steps: int = 5400
    pairs_lr: float = 2e-4
    pairs_share_256: float = 0.6  # 0.5 or 0.75: one side short of 85 % shapes (train_pairs)
    pairs_weight: float = 10.0  # weight of the pairs' difference loss against the flow loss


# Transformer batch kinds and their shares; a batch holds one kind so that its reference geometry is shared.
BATCH_KINDS: dict[str, float] = {
    "text": 0.45,
    "pair": 0.15,
    "recolour": 0.2,
    "background": 0.08,
    "compose": 0.12,
}


# Stage 6's batch kinds: mostly captions (what draws shapes from words alone), the others enough to keep them.
SHAPES_KINDS: dict[str, float] = {
    "text": 0.6,
    "pair": 0.05,
    "recolour": 0.1,
    "background": 0.025,
    "compose": 0.025,
    "inpaint": 0.2,
}
INPAINT_WARMUP = 50  # warm-up steps of stages 4b, 5, 6 and 7: they start from trained weights
