"""Fine-tuning a loaded LLaMA: supervised fine-tuning (SFT) with LoRA, QLoRA or every weight, through the one
training loop. `camelid finetune CONFIG --set ...` on the command line; from Python:

    from camelid.finetune import FinetuneConfig, finetune
    finetune(FinetuneConfig(model="smollm2-135m-instruct", data="train.jsonl", max_steps=200))

The adapters themselves (apply_lora, merge_lora, save_adapter, load_adapter) live in camelid.variants.lora.
"""

from camelid.finetune.config import FinetuneConfig, load_finetune_config
from camelid.finetune.objective import SFT, finetune

__all__ = ["SFT", "FinetuneConfig", "finetune", "load_finetune_config"]
