"""A tiny OpenFlamingo saved in the published layouts, for tests: an open_clip model-config JSON and weights
file for the vision encoder, a transformers language-model folder with its tokenizer, and ``checkpoint.pt``
written as open_flamingo writes it (trainable weights only, via the package's own filter), plus a whole-model
variant. Gated cross-attention starts at 0 in open_flamingo; the gates are set to 1 so the image matters."""

from __future__ import annotations

import contextlib
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from open_flamingo.src.factory import create_model_and_transforms
from open_flamingo.train.train_utils import filter_state_dict_to_trainable
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, MptConfig, MptForCausalLM, PreTrainedTokenizerFast

from evaluators.vlms.openflamingo import OpenFlamingoVLM

#: open_flamingo's zero-shot captioning and VQA prompts (the image, then the instruction)
CAPTION = "<image>Output:"
VQA = "<image>Question:What colour is the square? Short answer:"
CORPUS = ["Output: a red circle on a blue background", "Question: What colour is the square? Short answer: red",
          "two green triangles and one yellow square", "Answer: blue, small, large, left, right"] * 4

VISION_CFG = {"embed_dim": 16, "vision_cfg": {"image_size": 224, "layers": 2, "width": 32, "head_width": 16,
                                              "patch_size": 32},
              "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1}}


@dataclass
class TinyFlamingo:
    root: Path
    vision_json: Path
    vision_weights: Path
    lm: Path
    trained_ckpt: Path      # plain state dict of the trained weights (the published checkpoint.pt)
    training_ckpt: Path     # open_flamingo's training checkpoint: model_state_dict with DDP's "module." prefix
    whole_ckpt: Path        # every weight, vision encoder included
    published_ckpt: Path    # trained weights with no lm_head key, as MosaicML's MPT (no lm_head module) saved them
    reference: torch.nn.Module
    image_processor: object
    tokenizer: object

    def kwargs(self, checkpoint: Path | None = None, **over: object) -> dict:
        """from_pretrained keyword arguments, as the config passes them."""
        base = dict(clip_vision_encoder_path=str(self.vision_json), clip_vision_encoder_pretrained=str(self.vision_weights),
                    lang_encoder_path=str(self.lm), tokenizer_path=str(self.lm), cross_attn_every_n_layers=1,
                    checkpoint=str(checkpoint or self.trained_ckpt), resolution=224)
        base.update(over)
        return base


def save_tokenizer(folder: Path) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>")
    fast.save_pretrained(folder)
    return fast


def save_lm(folder: Path, kind: str) -> None:
    """A tied-embedding causal LM (like MPT-7B): 'llama' or 'mpt'."""
    tok = save_tokenizer(folder)
    torch.manual_seed(1)
    if kind == "llama":
        cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
                          tie_word_embeddings=True, initializer_range=0.5)
        LlamaForCausalLM(cfg).save_pretrained(folder)
        return
    cfg = MptConfig(d_model=32, n_heads=2, n_layers=2, expansion_ratio=2, max_seq_len=512, vocab_size=len(tok),
                    attn_config={"attn_impl": "torch", "alibi": True}, initializer_range=0.5)
    MptForCausalLM(cfg).save_pretrained(folder)


def add_remote_code_map(folder: Path) -> None:
    """Make ``folder``'s config.json name remote code, as the published MPT-7B's does (the files are absent)."""
    path = folder / "config.json"
    raw = json.loads(path.read_text())
    raw.update(architectures=["MPTForCausalLM"],
               auto_map={"AutoConfig": "configuration_mpt.MPTConfig", "AutoModelForCausalLM": "modeling_mpt.MPTForCausalLM"})
    path.write_text(json.dumps(raw))


def build(root: Path, kind: str = "llama") -> TinyFlamingo:
    root.mkdir(parents=True, exist_ok=True)
    vision_json = root / "TinyFlamingoViT.json"
    vision_json.write_text(json.dumps(VISION_CFG))
    open_clip.add_model_config(vision_json)
    torch.manual_seed(0)
    vision_weights = root / "tiny_vit.pt"
    torch.save(open_clip.create_model("TinyFlamingoViT").state_dict(), vision_weights)
    lm = root / f"lm_{kind}"
    save_lm(lm, kind)
    with contextlib.redirect_stdout(io.StringIO()):
        model, image_processor, tokenizer = create_model_and_transforms(
            "TinyFlamingoViT", str(vision_weights), str(lm), str(lm), cross_attn_every_n_layers=1,
            use_local_files=True)
    if kind == "mpt":
        add_remote_code_map(lm)  # from now on only transformers' native MPT class can load it
    torch.manual_seed(2)
    with torch.no_grad():
        for block in model.lang_encoder.gated_cross_attn_layers:
            block.attn_gate.fill_(1.0)
            block.ff_gate.fill_(1.0)
        emb = model.lang_encoder.get_input_embeddings().weight
        emb[-3:] = torch.randn_like(emb[-3:]) * 0.02  # the added <|endofchunk|>, <image>, <PAD> rows: trained
    whole = root / "whole" / "checkpoint.pt"
    trained = root / "trained" / "checkpoint.pt"
    training = root / "training" / "checkpoint.pt"
    published = root / "published" / "checkpoint.pt"
    for p in (whole, trained, training, published):
        p.parent.mkdir(exist_ok=True)
    torch.save(model.state_dict(), whole)
    state = filter_state_dict_to_trainable(model, model.state_dict())
    torch.save(state, trained)
    torch.save({"epoch": 0, "model_state_dict": {f"module.{k}": v for k, v in state.items()},
                "optimizer_state_dict": {}, "lr_scheduler_state_dict": {}}, training)
    torch.save({k: v for k, v in state.items() if not k.startswith("lang_encoder.lm_head.")}, published)
    return TinyFlamingo(root, vision_json, vision_weights, lm, trained, training, whole, published, model.eval(),
                        image_processor, tokenizer)


def images(n: int = 2) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (200 + 40 * i, 300, 3), dtype=np.uint8)) for i in range(n)]


def package_inputs(tiny: TinyFlamingo, ims: list[Image.Image], texts: list[str], side: str) -> tuple:
    """What open_flamingo's evaluation feeds its model: its image processor (normalisation included) and the
    tokenizer padded on ``side``."""
    vision_x = torch.stack([tiny.image_processor(im) for im in ims])[:, None, None]
    tiny.tokenizer.padding_side = side
    enc = tiny.tokenizer(texts, padding="longest", return_tensors="pt")
    return vision_x, enc["input_ids"], enc["attention_mask"]


# Fixtures ``tiny`` (one model per language-model family) and ``vlm`` (the adapter on it) for the test modules
# that import ``tiny_fixture`` and ``vlm_fixture``; module scope: each such module builds its own pair.
@pytest.fixture(scope="module", params=["llama", "mpt"], name="tiny")
def tiny_fixture(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> TinyFlamingo:
    return build(tmp_path_factory.mktemp(f"of_{request.param}"), request.param)


@pytest.fixture(scope="module", name="vlm")
def vlm_fixture(tiny: TinyFlamingo) -> OpenFlamingoVLM:
    return OpenFlamingoVLM.from_pretrained(**tiny.kwargs())
