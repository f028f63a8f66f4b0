"""Two small models trained on the shapes world, so that attacks and defenses run end to end on a CPU.

- ``TinyCLIP``: a convolutional image encoder (three strided convolutions to an 8x8 grid, then a
  position-aware linear readout) and a small text transformer, trained contrastively (InfoNCE with a learned
  temperature) on (image, caption) pairs, with a CoCa-style captioning loss through the TinyVLM decoder
  added during that stage (``scripts/train_tiny_models.py`` says why). Zero-shot classification as in
  CLIP: logits = ``exp(logit_scale)`` x L2-normalised image features @ class text embeddings (each the
  normalised mean over prompt templates of the normalised template embeddings). The learned scale is used
  instead of a fixed 100, since this model was trained with it.
- ``TinyVLM``: LLaVA-shaped. It contains a TinyCLIP whose vision tower (frozen) gives 4x4 pooled grid
  tokens plus the global feature (the pre-projection embedding); a two-layer MLP projects them to visual tokens, and a small causal
  transformer decoder reads ``[visual tokens, <bos> prompt, target]``. Greedy decoding. ``classify`` is
  zero-shot through its CLIP tower, i.e. exactly ``TinyCLIP.classify`` of the contained CLIP.

Nothing on the image path is non-differentiable (no quantisation, no argmax), so gradient attacks see the
true gradient. Checkpoints are folders with ``config.json``, ``model.safetensors`` and ``vocab.json``;
they are made by ``scripts/train_tiny_models.py``. Weights are read with safetensors only (no pickle).
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from evaluators.vlms.base import VLM, ClassEmbeddings, Turn, check_batch

log = logging.getLogger(__name__)

TRAIN_COMMAND = "python scripts/train_tiny_models.py --data data/shapes --out checkpoints"

#: Prompt templates for zero-shot classification (the text embedding of a class is their mean).
CLASS_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a {} shape.",
    "a picture of a {}.",
    "an image of a {}.",
    "a drawing of a {}.",
    "a big {}.",
    "there is a {} in the image.",
    "the picture shows a {}.",
)
CAPTION_PROMPT = "describe the image ."
VQA_PROMPT = "question : {} answer :"

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIALS = (PAD, BOS, EOS, UNK)


class CheckpointNotFoundError(FileNotFoundError):
    """A tiny-model checkpoint folder is missing or incomplete."""


# ------------------------------------------------------------------------------------------ tokenizer


class WordTokenizer:
    """Lowercase word-level tokenizer: words and single punctuation marks are tokens."""

    _split = re.compile(r"[a-z0-9]+|[^\sa-z0-9]")

    def __init__(self, vocab: dict[str, int]):
        if sorted(vocab.values()) != list(range(len(vocab))):
            raise ValueError("vocab ids must be 0..N-1 without gaps")
        for i, s in enumerate(SPECIALS):
            if vocab.get(s) != i:
                raise ValueError(f"vocab must map {s!r} to {i}")
        self.vocab = dict(vocab)
        self.words = [w for w, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
        self.pad_id, self.bos_id, self.eos_id, self.unk_id = range(4)

    def __len__(self) -> int:
        return len(self.words)

    @classmethod
    def words_of(cls, text: str) -> list[str]:
        return cls._split.findall(text.lower())

    @classmethod
    def build(cls, texts: Iterable[str]) -> WordTokenizer:
        """Vocabulary of every word in ``texts`` (sorted by frequency, then alphabetically)."""
        counts = Counter(w for t in texts for w in cls.words_of(t))
        words = list(SPECIALS) + sorted(counts, key=lambda w: (-counts[w], w))
        return cls({w: i for i, w in enumerate(words)})

    def encode(self, text: str) -> list[int]:
        return [self.vocab.get(w, self.unk_id) for w in self.words_of(text)]

    def decode(self, ids: Iterable[int]) -> str:
        """Words up to the first <eos>, specials dropped."""
        out = []
        for i in ids:
            i = int(i)
            if i == self.eos_id:
                break
            if i >= len(SPECIALS):
                out.append(self.words[i])
        return " ".join(out)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.vocab, indent=0))

    @classmethod
    def load(cls, path: str | Path) -> WordTokenizer:
        return cls(json.loads(Path(path).read_text()))


# ------------------------------------------------------------------------------------------- configs


@dataclass
class TinyCLIPConfig:
    vocab_size: int
    resolution: int = 64
    channels: tuple[int, int, int] = (32, 64, 128)
    readout_channels: int = 32
    embed_dim: int = 128
    text_width: int = 128
    text_layers: int = 2
    text_heads: int = 4
    text_max_len: int = 32
    init_logit_scale: float = math.log(1 / 0.07)
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.25, 0.25, 0.25)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TinyCLIPConfig:
        d = dict(d)
        for k in ("channels", "mean", "std"):
            if k in d:
                d[k] = tuple(d[k])
        return cls(**d)


@dataclass
class TinyVLMConfig:
    clip: TinyCLIPConfig
    d_model: int = 128
    n_layers: int = 3
    n_heads: int = 4
    max_text_len: int = 64
    vis_grid: int = 4
    max_caption_tokens: int = 16
    max_answer_tokens: int = 4
    extra: dict[str, Any] = field(default_factory=dict)  # free-form notes kept in config.json

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TinyVLMConfig:
        d = dict(d)
        d["clip"] = TinyCLIPConfig.from_dict(d["clip"])
        return cls(**d)


# ------------------------------------------------------------------------------------------- modules


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} not divisible by {heads} heads")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out(y.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    """Pre-LayerNorm transformer block; ``mask`` is boolean (B, 1, T, T), True = may attend."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln1(x), mask)
        return x + self.mlp(self.ln2(x))


class VisionTower(nn.Module):
    """Conv stem (R -> R/8 grid, three stride-2 convolutions) and a position-aware readout: a 1x1 squeeze
    then one linear layer over the flattened grid. (Mean or fixed-query attention pooling learns "which
    shape is the largest" far more slowly: the readout must know where each grid cell is.)"""

    def __init__(self, cfg: TinyCLIPConfig):
        super().__init__()
        c1, c2, c3 = cfg.channels
        if cfg.resolution % 8:
            raise ValueError(f"resolution must be a multiple of 8, got {cfg.resolution}")
        self.grid = cfg.resolution // 8

        def gn(c: int) -> nn.GroupNorm:
            return nn.GroupNorm(8, c)

        self.stem = nn.Sequential(
            nn.Conv2d(3, c1, 4, stride=2, padding=1), gn(c1), nn.GELU(),
            nn.Conv2d(c1, c2, 3, stride=2, padding=1), gn(c2), nn.GELU(),
            nn.Conv2d(c2, c2, 3, padding=1), gn(c2), nn.GELU(),
            nn.Conv2d(c2, c3, 3, stride=2, padding=1), gn(c3), nn.GELU(),
            nn.Conv2d(c3, c3, 3, padding=1), gn(c3), nn.GELU(),
        )  # fmt: skip
        self.width = c3
        self.squeeze = nn.Conv2d(c3, cfg.readout_channels, 1)
        self.readout = nn.Linear(cfg.readout_channels * self.grid**2, c3)
        self.ln_global = nn.LayerNorm(c3)
        self.ln_grid = nn.LayerNorm(c3)
        self.proj = nn.Linear(c3, cfg.embed_dim, bias=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised pixels (B,3,R,R) -> (embedding (B,E), tokens (B,1+G*G,C): global feature, then grid)."""
        f = self.stem(x)
        glob = self.ln_global(self.readout(self.squeeze(f).flatten(1)))
        grid = self.ln_grid(f.flatten(2).transpose(1, 2))
        return self.proj(glob), torch.cat([glob[:, None], grid], dim=1)


class TextTower(nn.Module):
    """Bidirectional transformer over ``<bos> words <eos>``, mean-pooled over the sentence. (Reading out
    the <eos> position alone starts out almost blind to the words in so small a model: every sentence
    then has nearly the same embedding and contrastive training stalls.)"""

    def __init__(self, cfg: TinyCLIPConfig):
        super().__init__()
        self.max_len = cfg.text_max_len
        self.tok = nn.Embedding(cfg.vocab_size, cfg.text_width)
        self.pos = nn.Parameter(torch.randn(1, cfg.text_max_len, cfg.text_width) * 0.02)
        self.blocks = nn.ModuleList(Block(cfg.text_width, cfg.text_heads) for _ in range(cfg.text_layers))
        self.ln = nn.LayerNorm(cfg.text_width)
        self.proj = nn.Linear(cfg.text_width, cfg.embed_dim, bias=False)

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        b, t = ids.shape
        valid = torch.arange(t, device=ids.device)[None] < lengths[:, None]
        mask = (valid[:, None, None, :] | torch.eye(t, dtype=torch.bool, device=ids.device)).expand(
            b, 1, t, t
        )
        h = self.tok(ids) + self.pos[:, :t]
        for blk in self.blocks:
            h = blk(h, mask)
        h = self.ln(h)
        m = valid[..., None].to(h.dtype)
        return self.proj((h * m).sum(1) / m.sum(1))


# ------------------------------------------------------------------------------------------ helpers


def _as_dtype(dtype: torch.dtype | str | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).removeprefix("torch.")
    out = getattr(torch, name, None)
    if not isinstance(out, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}")
    return out


def _check_folder(path: str | Path) -> Path:
    p = Path(path)
    missing = [n for n in ("config.json", "model.safetensors", "vocab.json") if not (p / n).is_file()]
    if missing:
        raise CheckpointNotFoundError(
            f"tiny-model checkpoint not found at {p} (missing {', '.join(missing)}); make it with: {TRAIN_COMMAND}"
        )
    return p


def _save(module: nn.Module, path: str | Path, config: dict[str, Any], tokenizer: WordTokenizer) -> Path:
    p = Path(path)
    p.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in module.state_dict().items()}
    save_file(state, str(p / "model.safetensors"), metadata={"format": "pt"})
    (p / "config.json").write_text(json.dumps(config, indent=2))
    tokenizer.save(p / "vocab.json")
    return p


def _load(cls: type, config_cls: type, path: str | Path, device: str | torch.device,
          dtype: torch.dtype | str | None) -> nn.Module:
    """The shared body of both ``from_pretrained``: config, vocabulary and safetensors weights, strictly."""
    p = _check_folder(path)
    model = cls(config_cls.from_dict(json.loads((p / "config.json").read_text())), WordTokenizer.load(p / "vocab.json"))
    model.load_state_dict(load_file(str(p / "model.safetensors")))
    _freeze(model)
    return model.to(device=device, dtype=_as_dtype(dtype))


def _freeze(module: nn.Module) -> None:
    module.eval()
    for prm in module.parameters():
        prm.requires_grad_(False)


# ------------------------------------------------------------------------------------------ TinyCLIP


class TinyCLIP(VLM):
    """Contrastive image-text model; zero-shot classifier over prompt templates."""

    family = "clip"
    capabilities = frozenset({"embed", "zero_shot"})

    def __init__(self, config: TinyCLIPConfig, tokenizer: WordTokenizer):
        super().__init__()
        if config.vocab_size != len(tokenizer):
            raise ValueError(f"config vocab_size {config.vocab_size} != tokenizer size {len(tokenizer)}")
        self.config = config
        self.tokenizer = tokenizer
        self.resolution = config.resolution
        self.visual = VisionTower(config)
        self.text = TextTower(config)
        self.logit_scale = nn.Parameter(torch.tensor(float(config.init_logit_scale)))
        self.register_buffer("mean", torch.tensor(config.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(config.std).view(1, 3, 1, 1), persistent=False)
        self.templates: tuple[str, ...] = CLASS_TEMPLATES
        self._class_embeddings = ClassEmbeddings()

    @property
    def dtype(self) -> torch.dtype:
        return self.logit_scale.dtype

    @property
    def device(self) -> torch.device:
        return self.logit_scale.device

    def encode_image(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pixels in [0, 1] -> (unnormalised embedding (B,E), vision tokens (B,1+G*G,C))."""
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected images (B,3,R,R), got {tuple(x.shape)}")
        x = x.to(device=self.device, dtype=self.dtype)
        return self.visual((x - self.mean) / self.std)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.encode_image(x)[0], dim=-1)

    def tokenize(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``<bos> words <eos>`` ids, right-padded (B,T), and lengths (B,)."""
        tk = self.tokenizer
        seqs = [[tk.bos_id, *tk.encode(t)[: self.config.text_max_len - 2], tk.eos_id] for t in texts]
        t = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), t), tk.pad_id, dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.tensor(s)
        return ids.to(self.device), torch.tensor([len(s) for s in seqs], device=self.device)

    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        """L2-normalised text embeddings (N, E)."""
        return F.normalize(self.text(*self.tokenize(texts)), dim=-1)

    def class_embeddings(self, classnames: Sequence[str], templates: Sequence[str] | None = None) -> torch.Tensor:
        """(C, E): per class, the normalised mean of its normalised template embeddings (cached)."""
        return self._class_embeddings(self.encode_text, classnames, templates or self.templates, self.device)

    def zero_shot_logits(self, x: torch.Tensor, classnames: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
        """exp(logit_scale) * image features @ class embeddings: (B, C), differentiable in x."""
        e = self.class_embeddings(classnames, templates)
        return self.logit_scale.exp() * self.embed(x) @ e.to(self.dtype).T

    def classify(self, x: torch.Tensor, classnames: Sequence[str]) -> torch.Tensor:
        """``zero_shot_logits`` with the templates the model was trained with."""
        return self.zero_shot_logits(x, classnames, self.templates)

    def contrastive_loss(self, x: torch.Tensor, texts: Sequence[str]) -> torch.Tensor:
        """Symmetric InfoNCE of matching (image i, text i) pairs within the batch."""
        return self.contrastive_loss_from_embeddings(self.encode_image(x)[0], texts)

    def contrastive_loss_from_embeddings(self, emb: torch.Tensor, texts: Sequence[str]) -> torch.Tensor:
        """``contrastive_loss`` given the unnormalised image embeddings from ``encode_image``."""
        img = F.normalize(emb, dim=-1)
        txt = self.encode_text(texts)
        logits = self.logit_scale.clamp(max=math.log(100.0)).exp() * img @ txt.T
        target = torch.arange(len(texts), device=logits.device)
        return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))

    def save_pretrained(self, path: str | Path) -> Path:
        return _save(self, path, asdict(self.config), self.tokenizer)

    @classmethod
    def from_pretrained(
        cls, path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | str | None = None
    ) -> TinyCLIP:
        """Load a checkpoint folder made by ``save_pretrained``; frozen and in eval mode."""
        return _load(cls, TinyCLIPConfig, path, device, dtype)


# ------------------------------------------------------------------------------------------- TinyVLM


class TinyVLM(VLM):
    """LLaVA-like captioner / VQA model over a frozen TinyCLIP vision tower. Its prompts are bare word
    sequences (family "tiny": no chat framing), the ones it was trained with."""

    family = "tiny"
    capabilities = frozenset({"generate", "loss", "embed", "zero_shot"})

    def __init__(self, config: TinyVLMConfig, tokenizer: WordTokenizer, clip: TinyCLIP | None = None):
        super().__init__()
        self.config = config
        self.tokenizer = tokenizer
        self.clip = clip if clip is not None else TinyCLIP(config.clip, tokenizer)
        if len(self.clip.tokenizer) != len(tokenizer):
            raise ValueError("the VLM and its CLIP must share one vocabulary")
        _freeze(self.clip)
        self.resolution = config.clip.resolution
        d, cw = config.d_model, config.clip.channels[-1]
        n_vis = 1 + config.vis_grid**2
        self.projector = nn.Sequential(nn.Linear(cw, d), nn.GELU(), nn.Linear(d, d))
        self.vis_pos = nn.Parameter(torch.randn(1, n_vis, d) * 0.02)
        self.tok = nn.Embedding(len(tokenizer), d)
        self.pos = nn.Parameter(torch.randn(1, config.max_text_len, d) * 0.02)
        self.blocks = nn.ModuleList(Block(d, config.n_heads) for _ in range(config.n_layers))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, len(tokenizer), bias=False)

    def train(self, mode: bool = True) -> TinyVLM:
        super().train(mode)
        self.clip.eval()  # the vision tower stays frozen
        return self

    @property
    def dtype(self) -> torch.dtype:
        return self.pos.dtype

    @property
    def device(self) -> torch.device:
        return self.pos.device

    # -- vision
    def vision_features(self, x: torch.Tensor) -> torch.Tensor:
        """Frozen CLIP tokens for the decoder: global feature + grid average-pooled to vis_grid^2 (B, N, C)."""
        return self.pool_vision_tokens(self.clip.encode_image(x)[1])

    def pool_vision_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """CLIP vision tokens (B, 1+G*G, C) -> decoder inputs (B, 1+vis_grid^2, C)."""
        glob, grid = tokens[:, :1], tokens[:, 1:]
        b, n, c = grid.shape
        g = int(round(math.sqrt(n)))
        grid = grid.transpose(1, 2).reshape(b, c, g, g)
        grid = F.adaptive_avg_pool2d(grid, self.config.vis_grid).flatten(2).transpose(1, 2)
        return torch.cat([glob, grid], dim=1)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.clip.embed(x)

    def classify(self, x: torch.Tensor, classnames: Sequence[str]) -> torch.Tensor:
        """Zero-shot through the contained CLIP (identical to ``TinyCLIP.classify``)."""
        return self.clip.classify(x, classnames)

    def zero_shot_logits(self, x: torch.Tensor, classnames: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
        return self.clip.zero_shot_logits(x, classnames, templates)

    # -- the task-agnostic contract
    def format_prompt(self, turns: Sequence[Turn]) -> str:
        """The turns' texts joined by spaces: the model has no chat framing and no image token."""
        parts = []
        for t in turns:
            parts.append(t.user)
            if t.assistant is not None:
                parts.append(t.assistant)
        return " ".join(parts)

    def loss(self, x: torch.Tensor, prompts: Sequence[str], targets: Sequence[str]) -> torch.Tensor:
        check_batch(x, self.resolution, prompts, targets)
        return self.sequence_loss(self.vision_features(x), prompts, targets)

    # -- text layout
    def _layout(
        self, prompts: Sequence[str], targets: Sequence[str] | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Left-padded ``<bos> prompt [target <eos>]`` ids (B,T), valid mask (B,T), target mask (B,T).

        Left padding puts every sample's last token at the end, so greedy decoding appends in lockstep;
        positions count valid tokens only, so a sample's result does not depend on its batch.
        """
        tk = self.tokenizer
        seqs, tgt_lens = [], []
        for i, p in enumerate(prompts):
            s = [tk.bos_id, *tk.encode(p)]
            t = [*tk.encode(targets[i]), tk.eos_id] if targets is not None else []
            room = self.config.max_text_len - len(s)
            if room < 1:
                raise ValueError(f"prompt too long ({len(s)} tokens): {p!r}")
            t = t[:room]
            seqs.append(s + t)
            tgt_lens.append(len(t))
        tmax = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), tmax), tk.pad_id, dtype=torch.long)
        valid = torch.zeros(len(seqs), tmax, dtype=torch.bool)
        tmask = torch.zeros(len(seqs), tmax, dtype=torch.bool)
        for i, s in enumerate(seqs):
            ids[i, tmax - len(s) :] = torch.tensor(s)
            valid[i, tmax - len(s) :] = True
            if tgt_lens[i]:
                tmask[i, tmax - tgt_lens[i] :] = True
        return ids.to(self.device), valid.to(self.device), tmask.to(self.device)

    def decode_logits(self, feats: torch.Tensor, ids: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Next-token logits (B, T, V) at every text position, given vision features (B, N, C)."""
        b, t = ids.shape
        vis = self.projector(feats.to(self.dtype)) + self.vis_pos
        n = vis.shape[1]
        pos_idx = (valid.long().cumsum(1) - 1).clamp(min=0)
        txt = self.tok(ids) + self.pos[0, pos_idx]
        h = torch.cat([vis, txt], dim=1)
        keys = torch.cat([torch.ones(b, n, dtype=torch.bool, device=ids.device), valid], dim=1)
        causal = torch.ones(n + t, n + t, dtype=torch.bool, device=ids.device).tril()
        mask = (causal[None] & keys[:, None, :]) | torch.eye(n + t, dtype=torch.bool, device=ids.device)
        mask = mask[:, None]
        for blk in self.blocks:
            h = blk(h, mask)
        return self.head(self.ln(h[:, n:]))

    def sequence_loss(
        self, feats: torch.Tensor, prompts: Sequence[str], targets: Sequence[str]
    ) -> torch.Tensor:
        """Per-sample mean token cross-entropy of ``targets`` (+ <eos>) given features and prompts (B,)."""
        if not (len(prompts) == len(targets) == feats.shape[0]):
            raise ValueError(f"batch sizes differ: {feats.shape[0]} images, {len(prompts)}, {len(targets)}")
        ids, valid, tmask = self._layout(prompts, targets)
        logits = self.decode_logits(feats, ids, valid)
        # the token at position j is predicted from position j-1
        ce = F.cross_entropy(logits[:, :-1].transpose(1, 2).float(), ids[:, 1:], reduction="none")
        m = tmask[:, 1:].to(ce.dtype)
        return (ce * m).sum(1) / m.sum(1).clamp(min=1)

    def caption_loss(self, x: torch.Tensor, captions: Sequence[str]) -> torch.Tensor:
        return self.sequence_loss(self.vision_features(x), [CAPTION_PROMPT] * len(captions), captions)

    def answer_loss(self, x: torch.Tensor, questions: Sequence[str], answers: Sequence[str]) -> torch.Tensor:
        return self.sequence_loss(self.vision_features(x), [VQA_PROMPT.format(q) for q in questions], answers)

    @torch.no_grad()
    def generate(self, x: torch.Tensor, prompts: Sequence[str], max_new_tokens: int = 16, num_beams: int = 1,
                 do_sample: bool = False, **decoding: Any) -> list[str]:
        """Greedy decoding, batched; stops when every sample has produced <eos>. Only greedy is implemented:
        other decoding settings are refused rather than ignored."""
        if int(num_beams) != 1 or do_sample or decoding:
            raise ValueError(f"TinyVLM decodes greedily only; got num_beams={num_beams}, do_sample={do_sample}, "
                             f"{sorted(decoding)}")
        if x.shape[0] != len(prompts):
            raise ValueError(f"{x.shape[0]} images but {len(prompts)} prompts")
        feats = self.vision_features(x)
        ids, valid, _ = self._layout(prompts, None)
        room = self.config.max_text_len - ids.shape[1]
        out = torch.empty(len(prompts), 0, dtype=torch.long, device=ids.device)
        done = torch.zeros(len(prompts), dtype=torch.bool, device=ids.device)
        for _ in range(min(max_new_tokens, room)):
            nxt = self.decode_logits(feats, ids, valid)[:, -1].argmax(-1)
            out = torch.cat([out, nxt[:, None]], dim=1)
            done |= nxt == self.tokenizer.eos_id
            if bool(done.all()):
                break
            ids = torch.cat([ids, nxt[:, None]], dim=1)
            valid = torch.cat([valid, torch.ones_like(valid[:, :1])], dim=1)
        return [self.tokenizer.decode(row.tolist()) for row in out]

    def caption(self, x: torch.Tensor) -> list[str]:
        return self.generate(x, [CAPTION_PROMPT] * x.shape[0], self.config.max_caption_tokens)

    def answer(self, x: torch.Tensor, questions: Sequence[str]) -> list[str]:
        return self.generate(x, [VQA_PROMPT.format(q) for q in questions], self.config.max_answer_tokens)

    def save_pretrained(self, path: str | Path) -> Path:
        return _save(self, path, asdict(self.config), self.tokenizer)

    @classmethod
    def from_pretrained(
        cls, path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | str | None = None
    ) -> TinyVLM:
        """Load a checkpoint folder made by ``save_pretrained`` (CLIP weights included); frozen, eval mode."""
        return _load(cls, TinyVLMConfig, path, device, dtype)
