"""Build a tiny LLaMA, save it in the Hugging Face format, load it back and generate from it."""

import tempfile

import torch

import camelid

torch.manual_seed(0)
config = camelid.LlamaConfig.from_name("tiny-gqa")
model = camelid.Llama(config).eval()
print(f"built {config.name}: {model.num_params():,} parameters")

with tempfile.TemporaryDirectory() as tmp:
    camelid.LLM(model=model, config=config).save_pretrained(tmp)
    llm = camelid.load(tmp)
    tokens = camelid.generate(llm.model, [1, 17, 42], max_new_tokens=16)
    print("greedy tokens from the reloaded model:", tokens)
    assert tokens == camelid.generate(model, [1, 17, 42], max_new_tokens=16)
