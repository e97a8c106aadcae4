"""`bloombee run --config examples/finetune.toml`: a whole swarm of SmolLM2, a fine-tuning run through it,
a peft adapter saved — with LoRA as the file says, and with prompt tuning by changing its one line.

A few steps with short sequences (environment overrides of the example's settings) keep it quick; the
adapter must load with peft on the local transformers model and change its greedy reply, and LoRA's
reply through the swarm must equal peft's.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from .test_swarm_cli import run_swarm_toml

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "finetune.toml"
LORA_LINE = 'tuning = { name = "lora", r = 8, alpha = 16 }'
PROMPT_LINE = 'tuning = { name = "prompt", num_virtual_tokens = 8 }'
NEW_TOKENS = 8


def local_reply(model: torch.nn.Module, tokenizer, prompt: str) -> str:  # noqa: ANN001
    ids = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=NEW_TOKENS, do_sample=False)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True).strip()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("method", "peft_type", "steps"), [("lora", "LORA", 3), ("prompt", "PROMPT_TUNING", 2)]
)
def test_finetune_job_trains_saves_a_peft_adapter_and_changes_the_reply(
    tmp_path, method: str, peft_type: str, steps: int
):
    text = EXAMPLE.read_text()
    assert text.count(LORA_LINE) == 1 and f"# {PROMPT_LINE}" in text
    if method == "prompt":  # the one line the example says to change
        text = text.replace(LORA_LINE, PROMPT_LINE, 1)
    toml = tmp_path / "finetune.toml"
    toml.write_text(text)
    output = tmp_path / "adapter"
    overrides = {
        "BLOOMBEE_FINETUNE__DATA": str(ROOT / "examples" / "data" / "finetune.txt"),
        "BLOOMBEE_FINETUNE__OUTPUT": str(output),
        "BLOOMBEE_FINETUNE__STEPS": str(steps),
        "BLOOMBEE_FINETUNE__BATCH_SIZE": "2",
        "BLOOMBEE_FINETUNE__SEQ_LEN": "16",
        "BLOOMBEE_FINETUNE__LR": "0.02",  # high: a few steps must surely change the greedy reply
        "BLOOMBEE_JOB__MAX_NEW_TOKENS": str(NEW_TOKENS),
    }
    result = run_swarm_toml(toml, env=overrides)  # exit status 0, and no process of it is left

    losses = [float(x) for x in re.findall(r"^step \d+/\d+  loss (\S+) ", result.stderr, re.M)]
    assert len(losses) == steps and all(math.isfinite(x) for x in losses), result.stderr[-2000:]
    summary = re.search(r"^loss: (\S+) .* -> (\S+) ", result.stdout, re.M)
    assert summary and all(math.isfinite(float(x)) for x in summary.groups()), result.stdout
    config = json.loads((output / "adapter_config.json").read_text())
    assert config["peft_type"] == peft_type and (output / "adapter_model.safetensors").is_file()

    from bloombee_core.model_files import resolve_model

    folder = resolve_model("smollm2")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    prompt = re.search(r"^prompt: '(.*)'$", result.stdout, re.M).group(1)
    base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    untuned = local_reply(base, tokenizer, prompt)
    tuned_model = PeftModel.from_pretrained(base, output).eval()
    tuned = local_reply(tuned_model, tokenizer, prompt)
    assert tuned != untuned
    assert f"untuned: {untuned!r}" in result.stdout  # the swarm's reply before training is the model's
    if method == "lora":
        assert f"tuned:   {tuned!r}" in result.stdout  # ... and after: peft's with the saved adapter
