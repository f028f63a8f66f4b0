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
