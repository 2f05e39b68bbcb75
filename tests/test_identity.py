"""
Splicing an LM's own table changes nothing, on the real SmolLM2 and the tiny Mistral (Gemma 3
and the Llama 3 fixture: in their own test files): the logits stay equal, and the e2e loss of
the LM's own rows is zero, which needs them scaled as the LM scales its own.
"""
import torch
from transformers import AutoModelForCausalLM

from soft_tokenizer.lm import load_lm
from helpers import assert_own_table_changes_nothing, first_windows


def test_smollm2_with_its_own_table():
    lm, tokenizer = load_lm("smollm2")
    assert_own_table_changes_nothing(lm, first_windows(tokenizer))


def test_the_tiny_mistral_with_its_own_table(tiny_mistral, mistral_tokenizer):
    lm = AutoModelForCausalLM.from_pretrained(tiny_mistral.folder, dtype=torch.float32)
    assert_own_table_changes_nothing(lm, first_windows(mistral_tokenizer))
