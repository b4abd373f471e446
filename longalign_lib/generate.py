"""Long-context generation with the evaluated model's own chat template.

Usage:
    from longalign_lib.generate import generate_reply
    text = generate_reply(model, tokenizer, [{"role": "user", "content": "Hi"}], max_new_tokens=64)
"""
from __future__ import annotations


def generate_reply(model, tokenizer, messages: list[dict], max_new_tokens: int = 64, do_sample: bool = False,
                   seed: int = 0, **gen_kwargs) -> str:
    """Render `messages` with the chat template (generation prompt on), generate, return the new text only."""
    import torch

    torch.manual_seed(seed)
    enc = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    enc = {k: v.to(model.device) for k, v in enc.items()}
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=do_sample,
                             pad_token_id=tokenizer.pad_token_id, **gen_kwargs)
    return tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()
