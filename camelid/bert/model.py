"""BERT in plain PyTorch, beside LLaMA: the same building blocks with the opposite choices.

Token + learned absolute position + token-type (segment) embeddings -> LayerNorm -> N x [bidirectional
self-attention (padding mask only) -> residual -> LayerNorm -> GELU feed-forward -> residual -> LayerNorm]
(post-norm, where LLaMA normalises before each sublayer) -> a pooler (tanh of a dense layer on [CLS]).

Heads: `BertForPreTraining` (masked-LM head tied to the token embeddings + next-sentence head) and
`BertForClassification` ([CLS] pooled -> dropout -> linear). Parameter names mirror `camelid.model` where the
concept is the same (tok_embeddings, layers.N.attention.wq, feed_forward.w1 ...); Hugging Face names and
config.json live only in `camelid.interop.bert_hf` (bert_config_from_hf / bert_config_to_hf).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from camelid.errors import CamelidError

ACTIVATIONS = {"gelu": F.gelu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"), "relu": F.relu}


@dataclass
class BertConfig:
    name: str = "custom"
    vocab_size: int = 30522
    dim: int = 768
    n_layers: int = 12
    n_heads: int = 12
    intermediate_size: int = 3072
    max_seq_len: int = 512  # learned absolute positions: the model cannot see further
    type_vocab_size: int = 2  # segments A and B
    norm_eps: float = 1e-12
    hidden_act: str = "gelu"  # exact (erf) GELU, as the original BERT
    dropout: float = 0.1
    attention_dropout: float = 0.1
    pad_token_id: int = 0
    initializer_range: float = 0.02

    def __post_init__(self) -> None:
        if self.dim % self.n_heads:
            raise CamelidError(f"config {self.name!r}: dim {self.dim} is not divisible by n_heads {self.n_heads}")
        if self.hidden_act not in ACTIVATIONS:
            raise CamelidError(f"config {self.name!r}: activation {self.hidden_act!r} is not supported; "
                               f"use one of {', '.join(ACTIVATIONS)}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> BertConfig:
        key = name.lower()
        if key not in BERT_PRESETS:
            raise CamelidError(f"unknown BERT config {name!r}; known: {', '.join(BERT_PRESETS)}")
        return cls(**{**BERT_PRESETS[key], "name": key, **overrides})

    @staticmethod
    def names() -> list[str]:
        return list(BERT_PRESETS)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> BertConfig:
        return dataclasses.replace(self, **changes)


_BERT = dict(vocab_size=30522, max_seq_len=512, type_vocab_size=2)

# Devlin et al. 2019 (base, large); Turc et al. 2019 "Well-Read Students Learn Better" (tiny, mini, small,
# medium: heads = hidden / 64); Wang et al. 2020 MiniLM as used by all-MiniLM-L6-v2.
BERT_PRESETS: dict[str, dict[str, Any]] = {
    "bert-base": dict(_BERT, dim=768, n_layers=12, n_heads=12, intermediate_size=3072),
    "bert-large": dict(_BERT, dim=1024, n_layers=24, n_heads=16, intermediate_size=4096),
    "bert-tiny": dict(_BERT, dim=128, n_layers=2, n_heads=2, intermediate_size=512),
    "bert-mini": dict(_BERT, dim=256, n_layers=4, n_heads=4, intermediate_size=1024),
    "bert-small": dict(_BERT, dim=512, n_layers=4, n_heads=8, intermediate_size=2048),
    "bert-medium": dict(_BERT, dim=512, n_layers=8, n_heads=8, intermediate_size=2048),
    "minilm-l6-h384": dict(_BERT, dim=384, n_layers=6, n_heads=12, intermediate_size=1536),
    # tiny config for tests and demos
    "bert-test": dict(vocab_size=128, dim=32, n_layers=2, n_heads=4, intermediate_size=64, max_seq_len=64),
}


class Embeddings(nn.Module):
    """word + learned position + segment embeddings, then LayerNorm and dropout."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim, padding_idx=config.pad_token_id)
        self.pos_embeddings = nn.Embedding(config.max_seq_len, config.dim)
        self.type_embeddings = nn.Embedding(config.type_vocab_size, config.dim)
        self.norm = nn.LayerNorm(config.dim, eps=config.norm_eps)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, input_ids: Tensor, token_type_ids: Tensor) -> Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.tok_embeddings(input_ids) + self.pos_embeddings(positions) + self.type_embeddings(token_type_ids)
        return self.dropout(self.norm(x))


class Attention(nn.Module):
    """Bidirectional multi-head attention: every token sees every non-padding token; no RoPE, biases on."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.n_heads, self.head_dim = config.n_heads, config.head_dim
        self.wq = nn.Linear(config.dim, config.dim)
        self.wk = nn.Linear(config.dim, config.dim)
        self.wv = nn.Linear(config.dim, config.dim)
        self.wo = nn.Linear(config.dim, config.dim)
        self.attention_dropout = config.attention_dropout

    def forward(self, x: Tensor, mask: Tensor | None) -> Tensor:
        B, T, D = x.shape
        q, k, v = (w(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2) for w in (self.wq, self.wk, self.wv))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                           dropout_p=self.attention_dropout if self.training else 0.0)
        return self.wo(y.transpose(1, 2).reshape(B, T, D))


class FeedForward(nn.Module):
    """w2(act(w1 x)): HF's intermediate.dense and output.dense."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.w1 = nn.Linear(config.dim, config.intermediate_size)
        self.w2 = nn.Linear(config.intermediate_size, config.dim)
        self.act = ACTIVATIONS[config.hidden_act]

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(self.act(self.w1(x)))


class Block(nn.Module):
    """Post-norm block: h = norm(x + attn(x)); out = norm(h + ffn(h))."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.attention = Attention(config)
        self.attention_norm = nn.LayerNorm(config.dim, eps=config.norm_eps)
        self.feed_forward = FeedForward(config)
        self.ffn_norm = nn.LayerNorm(config.dim, eps=config.norm_eps)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor, mask: Tensor | None) -> Tensor:
        h = self.attention_norm(x + self.dropout(self.attention(x, mask)))
        return self.ffn_norm(h + self.dropout(self.feed_forward(h)))


class Pooler(nn.Module):
    """tanh(dense(hidden state of [CLS])): the sentence vector BERT's NSP and classification heads read."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.dim, config.dim)

    def forward(self, hidden: Tensor) -> Tensor:
        return torch.tanh(self.dense(hidden[:, 0]))


class Bert(nn.Module):
    """The encoder (HF's BertModel): returns last hidden states [B, T, dim] and the pooled [CLS] vector [B, dim]."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = Embeddings(config)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.pooler = Pooler(config)
        self.apply(lambda m: init_bert_weights(m, config.initializer_range))

    def forward(self, input_ids: Tensor, token_type_ids: Tensor | None = None,
                attention_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """input_ids [B, T]; token_type_ids [B, T] (0 = sentence A, 1 = B); attention_mask [B, T] (1 = real token)."""
        T = input_ids.shape[1]
        if T > self.config.max_seq_len:
            raise CamelidError(f"sequence of {T} tokens exceeds BERT's {self.config.max_seq_len} learned positions; "
                               "truncate the input (max_len)")
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        # [B, 1, 1, T] boolean: queries may attend to every real key; None lets SDPA skip the mask entirely
        mask = None if attention_mask is None else attention_mask.bool()[:, None, None, :]
        x = self.embeddings(input_ids, token_type_ids)
        for block in self.layers:
            x = block(x, mask)
        return x, self.pooler(x)

    def sentence_embedding(self, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Tensor | None = None,
                           normalize: bool = True) -> Tensor:
        """Mean of the real tokens' last hidden states, L2-normalised: sentence-transformers' recipe."""
        hidden, _ = self(input_ids, token_type_ids, attention_mask)
        m = attention_mask.to(hidden.dtype).unsqueeze(-1)
        emb = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
        return F.normalize(emb, p=2, dim=-1) if normalize else emb

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def init_bert_weights(module: nn.Module, std: float = 0.02) -> None:
    """BERT's init: N(0, 0.02) for linear and embedding weights, zero biases, LayerNorm at identity."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, mean=0.0, std=std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
        if isinstance(module, nn.Embedding) and module.padding_idx is not None:
            with torch.no_grad():
                module.weight[module.padding_idx].zero_()
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class MLMHead(nn.Module):
    """Masked-LM head: LayerNorm(act(dense(h))) @ E^T + bias, with E the (tied) token embedding matrix."""

    def __init__(self, config: BertConfig, embedding: nn.Embedding) -> None:
        super().__init__()
        self.dense = nn.Linear(config.dim, config.dim)
        self.norm = nn.LayerNorm(config.dim, eps=config.norm_eps)
        self.act = ACTIVATIONS[config.hidden_act]
        self.decoder = nn.Linear(config.dim, config.vocab_size, bias=False)
        self.decoder.weight = embedding.weight  # tied: one matrix reads tokens in and writes them out
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, hidden: Tensor) -> Tensor:
        return self.decoder(self.norm(self.act(self.dense(hidden)))) + self.bias


class BertForPreTraining(nn.Module):
    """BERT with its two pre-training heads: masked-LM logits [B, T, vocab] and next-sentence logits [B, 2]."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.config = config
        self.bert = Bert(config)
        self.mlm = MLMHead(config, self.bert.embeddings.tok_embeddings)
        self.nsp = nn.Linear(config.dim, 2)  # 0 = B follows A, 1 = B is a random sentence (HF's convention)
        self.mlm.dense.apply(lambda m: init_bert_weights(m, config.initializer_range))
        init_bert_weights(self.nsp, config.initializer_range)

    def tie_weights(self) -> None:
        self.mlm.decoder.weight = self.bert.embeddings.tok_embeddings.weight

    def forward(self, input_ids: Tensor, token_type_ids: Tensor | None = None,
                attention_mask: Tensor | None = None, masked: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """masked: bool [B, T]; when given, the MLM logits are computed only there ([n_masked, vocab]): the
        vocabulary projection is the costliest layer, and pre-training reads ~15% of its outputs."""
        hidden, pooled = self.bert(input_ids, token_type_ids, attention_mask)
        return self.mlm(hidden if masked is None else hidden[masked]), self.nsp(pooled)


IGNORE = -100  # the label of positions that carry no MLM loss (PyTorch's cross_entropy default ignore_index)


def pretraining_loss(mlm_logits: Tensor, nsp_logits: Tensor, mlm_labels: Tensor, nsp_labels: Tensor) -> Tensor:
    """Mean MLM cross-entropy over the chosen positions + mean NSP cross-entropy (transformers'
    BertForPreTraining loss). mlm_logits/labels: [B, T, vocab]/[B, T] with IGNORE where nothing was chosen, or
    [n, vocab]/[n] for the chosen positions only."""
    mlm = F.cross_entropy(mlm_logits.reshape(-1, mlm_logits.shape[-1]).float(), mlm_labels.reshape(-1),
                          ignore_index=IGNORE)
    return mlm + F.cross_entropy(nsp_logits.float(), nsp_labels)


class BertForClassification(nn.Module):
    """[CLS] -> pooler -> dropout -> linear: HF's BertForSequenceClassification."""

    def __init__(self, config: BertConfig, num_labels: int, classifier_dropout: float | None = None) -> None:
        super().__init__()
        self.config = config
        self.num_labels = num_labels
        self.bert = Bert(config)
        self.dropout = nn.Dropout(config.dropout if classifier_dropout is None else classifier_dropout)
        self.classifier = nn.Linear(config.dim, num_labels)
        init_bert_weights(self.classifier, config.initializer_range)

    def forward(self, input_ids: Tensor, token_type_ids: Tensor | None = None,
                attention_mask: Tensor | None = None) -> Tensor:
        _, pooled = self.bert(input_ids, token_type_ids, attention_mask)
        return self.classifier(self.dropout(pooled))


__all__ = ["IGNORE", "Bert", "BertConfig", "BertForClassification", "BertForPreTraining", "MLMHead", "pretraining_loss"]
