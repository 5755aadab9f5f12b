"""BERT beside LLaMA: the encoder, its heads, and its pre-training data."""

from camelid.bert.model import Bert, BertConfig, BertForClassification, BertForPreTraining

__all__ = ["Bert", "BertConfig", "BertForClassification", "BertForPreTraining"]
