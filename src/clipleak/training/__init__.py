"""Training: one loop (:mod:`.loop`) for contrastive pretraining of targets, the learned priors and the
clients' (DP) fine-tuning (:mod:`.finetune`)."""

from ..seeding import derive_seed
from .finetune import (
    ContrastiveConfig,
    FinetuneConfig,
    FinetuneRun,
    accuracy_from_raw,
    contrastive_dp,
    contrastive_finetune,
    finetune,
    finetune_dp,
)
from .loop import Budget, LoopState, train_loop
from .pretrain import EVAL_PROMPT, PretrainConfig, checkpoint_dir, load_caption_csv, lr_at, pretrain
from .priors import (
    DEFAULT_CNN_STEPS,
    DEFAULT_DECODER_STEPS,
    DEFAULT_VAE_STEPS,
    PriorCheckpoints,
    build_prior,
    cnn_quality,
    prior_quality,
    train_cnn,
    train_decoder,
    train_vae,
)

__all__ = [
    "DEFAULT_CNN_STEPS", "DEFAULT_DECODER_STEPS", "DEFAULT_VAE_STEPS", "EVAL_PROMPT", "Budget", "ContrastiveConfig",
    "FinetuneConfig", "FinetuneRun", "LoopState", "PretrainConfig", "PriorCheckpoints", "accuracy_from_raw",
    "build_prior",
    "checkpoint_dir", "cnn_quality", "contrastive_dp", "contrastive_finetune", "derive_seed", "finetune", "finetune_dp",
    "load_caption_csv", "lr_at", "pretrain", "prior_quality", "train_cnn", "train_decoder", "train_loop", "train_vae",
]
