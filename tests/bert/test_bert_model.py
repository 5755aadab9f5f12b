"""camelid.Bert against transformers: real all-MiniLM-L6-v2 weights, and random weights for every head."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

from camelid import Bert, BertConfig, CamelidError
from camelid.bert.data import mask_tokens
from camelid.bert.model import BertForClassification, BertForPreTraining, pretraining_loss
from camelid.interop.bert_hf import bert_config_from_hf, bert_config_to_hf, load_bert_hf_dir, save_bert_hf_dir
from camelid.tokenizer.wordpiece import WordPiece

SENTENCES = [
    "This is an example sentence.",
    "Each sentence is converted to a vector; llamas and camels are related.",
    "Héllo, WORLD!!! 3.14 naïve café",
    "short",
]


def tiny_hf_config(**kw) -> transformers.BertConfig:
    return transformers.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                   intermediate_size=48, max_position_embeddings=40, type_vocab_size=2, **kw)


def random_batch(vocab: int = 99, B: int = 3, T: int = 12) -> dict[str, torch.Tensor]:
    ids = torch.randint(5, vocab, (B, T))
    types = torch.zeros(B, T, dtype=torch.long)
    types[:, T // 2:] = 1
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, -4:] = 0  # right padding
    mask[2, -7:] = 0
    ids[mask == 0] = 0
    return {"input_ids": ids, "token_type_ids": types, "attention_mask": mask}


def _randomize(model: torch.nn.Module) -> None:
    """Non-trivial LayerNorm/bias values so that a swapped weight could not go unnoticed."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)


@pytest.fixture(scope="module")
def minilm(minilm_dir):
    config, model, _ = load_bert_hf_dir(minilm_dir)
    return model


@pytest.fixture(scope="module")
def minilm_ref(minilm_dir):
    return transformers.BertModel.from_pretrained(str(minilm_dir)).eval()


def test_minilm_last_hidden_state_matches_transformers(minilm, minilm_ref, minilm_dir):
    assert isinstance(minilm, Bert) and minilm.config.n_layers == 6 and minilm.config.dim == 384
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(minilm_dir))
    ref_batch = hf_tok(SENTENCES, padding=True, return_tensors="pt")
    ours = WordPiece.from_dir(minilm_dir)(SENTENCES)
    for k in ("input_ids", "token_type_ids", "attention_mask"):
        assert torch.equal(ours[k], ref_batch[k]), k
    with torch.no_grad():
        ref = minilm_ref(**ref_batch)
        hidden, pooled = minilm(**ours)
    real = ours["attention_mask"].bool()
    assert (hidden - ref.last_hidden_state)[real].abs().max() < 1e-5
    assert (pooled - ref.pooler_output).abs().max() < 1e-5


def test_minilm_sentence_embeddings(minilm, minilm_ref, minilm_dir):
    """sentence-transformers' all-MiniLM-L6-v2 = mean pooling over real tokens, then L2 normalisation."""
    batch = WordPiece.from_dir(minilm_dir)(SENTENCES)
    with torch.no_grad():
        h = minilm_ref(**batch).last_hidden_state
        m = batch["attention_mask"].unsqueeze(-1).float()
        expected = torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1)
        got = minilm.sentence_embedding(batch["input_ids"], batch["attention_mask"])
        # the same sentence alone (no padding) gives the same vector as inside the padded batch
        alone = WordPiece.from_dir(minilm_dir)([SENTENCES[3]])
        got_alone = minilm.sentence_embedding(alone["input_ids"], alone["attention_mask"])
    assert (got - expected).abs().max() < 1e-5
    assert torch.allclose(got.norm(dim=-1), torch.ones(len(SENTENCES)), atol=1e-5)
    assert (got_alone[0] - got[3]).abs().max() < 1e-5
    sims = got @ got.T  # a paraphrase-free sanity check: every sentence is closest to itself
    assert torch.equal(sims.argmax(-1), torch.arange(len(SENTENCES)))


@pytest.mark.parametrize("direction", ["hf_to_camelid", "camelid_to_hf"])
def test_pretraining_heads_match_transformers(tmp_path, direction):
    batch = random_batch()
    if direction == "hf_to_camelid":
        ref = transformers.BertForPreTraining(tiny_hf_config())
        _randomize(ref)
        ref.eval().save_pretrained(tmp_path)
        _, ours, _ = load_bert_hf_dir(tmp_path)
        assert isinstance(ours, BertForPreTraining)
    else:
        ours = BertForPreTraining(bert_config_from_hf(tiny_hf_config().to_dict()))
        _randomize(ours)
        # the MLM decoder is tied: randomising the embeddings changed it too
        assert ours.mlm.decoder.weight is ours.bert.embeddings.tok_embeddings.weight
        save_bert_hf_dir(ours.eval(), tmp_path)
        ref = transformers.BertForPreTraining.from_pretrained(str(tmp_path)).eval()
    with torch.no_grad():
        out = ref(**batch)
        mlm, nsp = ours.eval()(**batch)
    real = batch["attention_mask"].bool()
    assert (mlm - out.prediction_logits)[real].abs().max() < 1e-5
    assert (nsp - out.seq_relationship_logits).abs().max() < 1e-5


@pytest.mark.parametrize("direction", ["hf_to_camelid", "camelid_to_hf"])
def test_classification_head_matches_transformers(tmp_path, direction):
    batch = random_batch()
    labels = ["neg", "neu", "pos"]
    if direction == "hf_to_camelid":
        ref = transformers.BertForSequenceClassification(
            tiny_hf_config(id2label=dict(enumerate(labels)), label2id={n: i for i, n in enumerate(labels)}))
        _randomize(ref)
        ref.eval().save_pretrained(tmp_path)
        _, ours, raw = load_bert_hf_dir(tmp_path)
        assert isinstance(ours, BertForClassification) and ours.num_labels == 3
    else:
        ours = BertForClassification(bert_config_from_hf(tiny_hf_config().to_dict()), num_labels=3)
        _randomize(ours)
        save_bert_hf_dir(ours.eval(), tmp_path, labels=labels)
        ref = transformers.BertForSequenceClassification.from_pretrained(str(tmp_path)).eval()
        assert ref.config.id2label == dict(enumerate(labels))
    with torch.no_grad():
        expected = ref(**batch).logits
        got = ours.eval()(**batch)
    assert (got - expected).abs().max() < 1e-5


def test_base_model_round_trip_and_fresh_classifier(tmp_path):
    ours = Bert(BertConfig.from_name("bert-test"))
    _randomize(ours)
    save_bert_hf_dir(ours.eval(), tmp_path)
    ref = transformers.BertModel.from_pretrained(str(tmp_path)).eval()
    batch = random_batch(vocab=128)
    with torch.no_grad():
        h, pooled = ours(**batch)
        out = ref(**batch)
    assert (h - out.last_hidden_state)[batch["attention_mask"].bool()].abs().max() < 1e-5
    assert (pooled - out.pooler_output).abs().max() < 1e-5
    # fine-tuning starts from an encoder: the encoder is loaded, the classification head is new
    _, clf, _ = load_bert_hf_dir(tmp_path, task="classification", num_labels=5)
    assert clf.classifier.out_features == 5
    assert torch.equal(clf.bert.layers[1].attention.wq.weight, ours.layers[1].attention.wq.weight)


@pytest.mark.parametrize("name", ["bert-base", "bert-large", "bert-tiny", "minilm-l6-h384"])
def test_presets_have_the_published_sizes(name):
    """Parameter counts equal those of transformers.BertModel built from our exported config.json."""
    config = BertConfig.from_name(name)
    with torch.device("meta"):
        ours = Bert(config)
        ref = transformers.BertModel(transformers.BertConfig(**bert_config_to_hf(config)))
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters())
    if name == "bert-base":
        assert sum(p.numel() for p in ours.parameters()) == 109_482_240  # bert-base-uncased, as published


def test_config_json_round_trip():
    c = BertConfig.from_name("minilm-l6-h384")
    back = bert_config_from_hf(json.loads(json.dumps(bert_config_to_hf(c))))
    assert back.replace(name=c.name) == c


def test_bad_inputs_are_one_line_errors(tmp_path):
    with pytest.raises(CamelidError, match="unknown BERT config"):
        BertConfig.from_name("bert-gigantic")
    with pytest.raises(CamelidError, match="not BERT"):
        bert_config_from_hf({"model_type": "llama", "hidden_size": 8})
    with pytest.raises(CamelidError, match="missing required field 'num_hidden_layers'"):
        bert_config_from_hf({"model_type": "bert", "vocab_size": 10, "hidden_size": 8, "num_attention_heads": 2})
    # weights that do not match config.json
    save_bert_hf_dir(Bert(BertConfig.from_name("bert-test")), tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["hidden_size"] = 64
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CamelidError, match="has shape"):
        load_bert_hf_dir(tmp_path)
    model = Bert(BertConfig.from_name("bert-test"))
    with pytest.raises(CamelidError, match="learned positions"):
        model(torch.zeros(1, 65, dtype=torch.long))


def test_loss_matches_transformers_bert_for_pretraining(tmp_path):
    config = BertConfig.from_name("bert-test")
    ours = BertForPreTraining(config).eval()
    save_bert_hf_dir(ours, tmp_path)
    ref = transformers.BertForPreTraining.from_pretrained(str(tmp_path)).eval()
    ids = torch.randint(5, config.vocab_size, (4, 20))
    special = torch.zeros_like(ids, dtype=torch.bool)
    special[:, 0] = True
    corrupted, labels = mask_tokens(ids, special, config.vocab_size, mask_id=4, prob=0.3)
    nsp = torch.tensor([0, 1, 1, 0])
    with torch.no_grad():
        expected = ref(input_ids=corrupted, labels=labels, next_sentence_label=nsp).loss
        mlm, nsp_logits = ours(corrupted)
        got = pretraining_loss(mlm, nsp_logits, labels, nsp)
    assert abs(float(got) - float(expected)) < 1e-5
