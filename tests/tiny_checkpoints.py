"""Tiny random-weight checkpoints of the real model classes, saved in the published on-disk layouts, so the
tests load them through exactly the path a user's checkpoint takes (no download, no network)."""

from __future__ import annotations

from pathlib import Path

import torch

#: the chat template shipped by llava-hf/llava-1.5-7b-hf (chat_template.json)
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}"
    "{% endif %}{# Render all images first #}{% for content in message['content'] | selectattr('type', "
    "'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != "
    "'assistant' %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', "
    "'equalto', 'text') %}{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
#: CLIP's normalisation constants (OpenAI)
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

CORPUS = [
    "USER : ASSISTANT : Provide a short caption for this image .",
    "Answer the question using a single word or phrase .",
    "a red circle a blue square a green triangle on the left right top bottom middle of a white black background",
    "what colour is the shape ? how many shapes are there ? is there a circle ? yes no maybe Word 1 2 3 4",
    "a photo of a big small drawing picture shape star cross hexagon",
]


def word_tokenizer(specials: list[str], extra: list[str] = (), bos: bool = True):
    """A word-level fast tokenizer trained in memory (words and punctuation), wrapped as transformers'
    ``PreTrainedTokenizerFast``; ``<s>`` is prepended when ``bos``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(CORPUS, trainers.WordLevelTrainer(special_tokens=["<unk>", "<s>", "</s>", "<pad>"]))
    tok.add_special_tokens(list(specials))
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", additional_special_tokens=list(specials) + list(extra),
                                   model_input_names=["input_ids", "attention_mask"])


def make_tiny_llava(folder: Path, image_size: int = 56, patch: int = 14, seed: int = 0) -> Path:
    """A llava-hf folder: LlavaForConditionalGeneration (tiny CLIP vision tower + tiny Llama), the CLIP image
    processor (resize + centre crop), a fast tokenizer with <image>, and llava-hf's chat template."""
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    tok = word_tokenizer(["<image>"])
    image_token_id = tok.convert_tokens_to_ids("<image>")
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                              image_size=image_size, patch_size=patch, projection_dim=32)
    text = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    config = LlavaConfig(vision_config=vision.to_dict(), text_config=text.to_dict(), image_token_index=image_token_id,
                         vision_feature_layer=-2, vision_feature_select_strategy="default",
                         projector_hidden_act="gelu", pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    ip = CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
                            do_center_crop=True, image_mean=CLIP_MEAN, image_std=CLIP_STD, resample=3)
    processor = LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=patch, vision_feature_select_strategy="default",
                               num_additional_image_tokens=1, chat_template=LLAVA_CHAT_TEMPLATE)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def clip_bpe_files(folder: Path) -> tuple[Path, Path]:
    """CLIP's real BPE vocabulary (vocab.json, merges.txt as in openai/clip-vit-base-patch32), rebuilt from the
    byte-pair file open_clip ships, so the transformers and open_clip tokenizers agree."""
    import gzip
    import json

    import open_clip
    from transformers.models.clip.tokenization_clip import bytes_to_unicode

    merges = gzip.open(open_clip.tokenizer.default_bpe()).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    chars = list(bytes_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return folder / "vocab.json", folder / "merges.txt"


def make_tiny_clip_hf(folder: Path, image_size: int = 32, patch: int = 8, seed: int = 0) -> Path:
    """A folder in the openai/clip-vit-base-patch32 layout: CLIPModel (tiny towers, CLIP's real 49408-token
    vocabulary), CLIP's image processor (resize shortest side + centre crop) and tokenizer."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    vocab, merges = clip_bpe_files(folder)
    tok = CLIPTokenizer(str(vocab), str(merges))
    text = dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  image_size=image_size, patch_size=patch)
    torch.manual_seed(seed)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).eval()
    ip = CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
                            do_center_crop=True, image_mean=CLIP_MEAN, image_std=CLIP_STD, resample=3)
    model.save_pretrained(folder)
    CLIPProcessor(image_processor=ip, tokenizer=tok).save_pretrained(folder)
    return folder


#: an open_clip model config of the ViT-B-32 family at toy size
TINY_OPEN_CLIP = {"embed_dim": 16, "quick_gelu": True,
                  "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16},
                  "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}}


def make_tiny_open_clip(folder: Path, seed: int = 0) -> tuple[Path, Path]:
    """(model-config JSON, state-dict file) of a tiny open_clip CLIP, as open_clip saves checkpoints."""
    import json

    import open_clip

    folder.mkdir(parents=True, exist_ok=True)
    cfg = folder / "tiny-ViT-B-32.json"
    cfg.write_text(json.dumps(TINY_OPEN_CLIP))
    open_clip.add_model_config(cfg)
    torch.manual_seed(seed)
    model = open_clip.create_model("tiny-ViT-B-32", pretrained=None)
    with torch.no_grad():  # a non-trivial learned scale, to show the zero-shot scale is the fixed 100
        model.logit_scale.fill_(2.0)
    weights = folder / "open_clip_pytorch_model.bin"
    torch.save(model.state_dict(), weights)
    return cfg, weights
