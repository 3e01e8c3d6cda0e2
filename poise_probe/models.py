"""Policy loading and the bundled tiny reasoner's tokenizer and architecture."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

#: Where the bundled tiny reasoner lives (saved with `save_pretrained`).
TINY_REASONER_PATH = Path(__file__).parent / "assets" / "tiny-reasoner"

#: Names `load_policy` resolves without a path.
ALIASES = {"tiny-reasoner": TINY_REASONER_PATH}

SPECIAL_TOKENS = ["<|pad|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>"]
THINK_TOKENS = ["<think>", "</think>", "<answer>", "</answer>"]

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def build_char_tokenizer():
    """A character-level `PreTrainedTokenizerFast` with think/answer tags and a chat template.

    Every printable ASCII character and newline is one token; the four tags are single
    (non-special, so decoding keeps them) tokens, as in Qwen3's own tokenizer.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [chr(i) for i in range(32, 127)] + ["\n", "\t"]
    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS + THINK_TOKENS + chars)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    core.add_special_tokens([AddedToken(t, special=True, normalized=False)
                             for t in SPECIAL_TOKENS])
    core.add_tokens([AddedToken(t, special=False, normalized=False) for t in THINK_TOKENS])
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<|pad|>",
                                  eos_token="<|im_end|>", unk_token="<unk>",
                                  bos_token=None, padding_side="left",
                                  model_max_length=512)
    tok.chat_template = CHAT_TEMPLATE
    return tok


def build_tiny_config(vocab_size: int, hidden_size: int = 256, num_layers: int = 6,
                      intermediate_size: int = 768, num_heads: int = 4, num_kv_heads: int = 2,
                      max_positions: int = 320, pad_token_id: int = 0, eos_token_id: int = 3):
    """A small `Qwen3Config`: the real architecture (GQA, q/k-norm, RoPE) at a CPU-friendly size."""
    from transformers import Qwen3Config

    return Qwen3Config(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads, head_dim=hidden_size // num_heads,
        max_position_embeddings=max_positions, rope_theta=10000.0, tie_word_embeddings=True,
        pad_token_id=pad_token_id, eos_token_id=eos_token_id, bos_token_id=None,
        attention_dropout=0.0, use_cache=True)


def resolve_model_path(path_or_name: str | Path) -> Path:
    """Map an alias (``tiny-reasoner``) to its path; a local path passes through."""
    key = str(path_or_name)
    return Path(ALIASES.get(key, key)).expanduser()


def load_policy(path_or_name: str | Path = "tiny-reasoner", *, device: str | torch.device = "cpu",
                dtype: torch.dtype | None = None):
    """Load a local Hugging Face causal LM and its tokenizer; refuse anything else clearly.

    Returns `(model, tokenizer)` with the model in eval mode on `device`. The tokenizer pads on
    the left (generation) and has a pad token (the EOS token if it had none).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    path = resolve_model_path(path_or_name)
    if not path.exists():
        raise FileNotFoundError(
            f"model path {str(path)!r} does not exist; pass a local directory saved with "
            f"save_pretrained (config.json + weights), or one of {sorted(ALIASES)}. Hub names "
            f"are not downloaded.")
    if not (path / "config.json").is_file():
        raise ValueError(f"model path {str(path)!r} has no config.json, so it is not a Hugging "
                         f"Face model directory; point at the folder save_pretrained wrote.")
    try:
        config = AutoConfig.from_pretrained(path)
    except (ValueError, KeyError, OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"model path {str(path)!r}: config.json could not be read ({exc}); "
                         f"re-save the model with save_pretrained.") from exc
    if not _is_causal_lm(config, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES):
        raise ValueError(
            f"model path {str(path)!r} holds a {config.model_type!r} model "
            f"({', '.join(config.architectures or ['no architectures'])}), which is not a causal "
            f"LM; POISE needs a decoder that generates text (AutoModelForCausalLM), e.g. Qwen3.")
    if not any((path / f).is_file() for f in _TOKENIZER_FILES):
        raise ValueError(f"model path {str(path)!r} has no usable tokenizer (none of "
                         f"{', '.join(_TOKENIZER_FILES)}); save the tokenizer next to the model "
                         f"with tokenizer.save_pretrained(path).")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (ValueError, OSError) as exc:
        raise ValueError(f"model path {str(path)!r} has no usable tokenizer ({exc}); save the "
                         f"tokenizer next to the model with tokenizer.save_pretrained.") from exc
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or torch.float32)
    except MemoryError:
        raise
    except Exception as exc:  # safetensors/torch errors of a truncated or corrupted file
        raise ValueError(f"model path {str(path)!r}: the weights could not be loaded "
                         f"({type(exc).__name__}: {str(exc)[:200]}); a weights file is "
                         f"truncated or corrupted: save the model again (save_pretrained) or "
                         f"copy it anew.") from exc
    model.to(device).eval()
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.chat_template is None:
        logger.warning("tokenizer at %s has no chat template; prompts are used as plain text",
                       path)
    return model, tokenizer


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def _is_causal_lm(config, causal_mapping: dict) -> bool:
    """A model type with a causal-LM class, saved as that class (not e.g. a bare `BertModel`)."""
    allowed = causal_mapping.get(config.model_type)
    if allowed is None:
        return False
    archs = config.architectures or []
    if not archs:
        return True  # nothing saved says otherwise; AutoModelForCausalLM will build the head
    names = {allowed} if isinstance(allowed, str) else set(allowed)
    return any(a in names or a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs)
